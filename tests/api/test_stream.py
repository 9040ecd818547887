"""GET /v1/jobs/{id}/stream: server-sent events of one job. In-process (FastAPI's TestClient, for a
job that has ended: its whole stream) and over real HTTP against real `ldmq api` processes (slow):
live events in order, resumed exactly after Last-Event-ID across an API restart."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from shared import jobstate
from shared.db import session_scope
from shared.models import JobStatus


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def messages(lines):
    """SSE messages from lines, written here by the book (not the client's parser, which is tested
    against this server elsewhere): dicts of id/event/data, and {"comment": ...} for ':' lines."""
    msg: dict = {}
    for line in lines:
        if line == "":
            if msg:
                yield msg
            msg = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            msg[name] = msg[name] + "\n" + value if name == "data" and name in msg else value
    if msg:
        yield msg


def whole_stream(client, job_id, key, **kw) -> list[dict]:
    r = client.get(f"/v1/jobs/{job_id}/stream", headers=auth(key) | kw.pop("headers", {}), **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["cache-control"] == "no-cache"
    return list(messages(r.text.splitlines()))


def play(settings, job_id, *, progress=(0.25, 0.5), final=JobStatus.succeeded):
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 30)
    for p in progress:
        with session_scope(settings) as s:
            jobstate.set_progress(s, job_id, claim.attempt, p, {"step": int(p * 100), "total_steps": 100, "loss": 1 - p})
    with session_scope(settings) as s:
        jobstate.set_checkpoint(s, job_id, claim.attempt, "k/step-50-a1", {"step": 50, "metrics": {"mse": 0.1}})
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, final)
    return claim


def test_a_finished_jobs_stream_is_its_events_then_end(client, settings, make_tenant):
    _, key = make_tenant()
    job_id = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5}).json()["id"]
    play(settings, job_id)
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=auth(key)).json()["items"]
    msgs = whole_stream(client, job_id, key)

    assert msgs[0] == {"retry": "1000"}
    job = [m for m in msgs if m.get("event") == "job"]
    assert len(job) == 1 and "id" not in job[0] and json.loads(job[0]["data"])["status"] == "succeeded"
    events = [m for m in msgs if "id" in m]
    # Every event of the job, in order, each with id: = its id and the listing's JSON as data.
    assert [int(m["id"]) for m in events] == [e["id"] for e in listed]
    assert [m["event"] for m in events] == ["started", "progress", "progress", "checkpoint", "succeeded"]
    assert [json.loads(m["data"]) for m in events] == listed
    assert json.loads(events[3]["data"])["data"] == {"step": 50, "metrics": {"mse": 0.1}, "key": "k/step-50-a1",
                                                     "attempt": 1}
    assert msgs[-1] == {"event": "end", "data": '{"reason":"final","status":"succeeded"}'}

    # Resumed after an event: exactly the ones after it. The header wins over the query.
    second = listed[1]["id"]
    resumed = whole_stream(client, job_id, key, headers={"Last-Event-ID": str(second)}, params={"last_event_id": "0"})
    assert [int(m["id"]) for m in resumed if "id" in m] == [e["id"] for e in listed[2:]]
    resumed = whole_stream(client, job_id, key, params={"last_event_id": str(listed[-1]["id"])})
    assert [m.get("event") for m in resumed if "event" in m] == ["job", "end"]  # nothing left, and it ends


def test_bad_resume_ids_other_tenants_and_the_per_tenant_bound(client, settings, make_tenant):
    tid, key = make_tenant()
    job_id = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": "builtin:digits", "steps": 5}).json()["id"]
    for bad in ("-1", "x", "1.5", str(2**64)):
        r = client.get(f"/v1/jobs/{job_id}/stream", headers=auth(key) | {"Last-Event-ID": bad})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "Last-Event-ID", bad
    r = client.get(f"/v1/jobs/{job_id}/stream", headers=auth(key), params={"last_event_id": "abc"})
    assert r.status_code == 422 and "last_event_id" in r.json()["error"]["message"]

    _, other = make_tenant()
    r = client.get(f"/v1/jobs/{job_id}/stream", headers=auth(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get(f"/v1/jobs/{job_id}/stream").status_code == 401

    slots = client.app.state.stream_slots
    for _ in range(settings.stream_max_per_tenant):  # streams this tenant holds open elsewhere
        slots.acquire(tid)
    r = client.get(f"/v1/jobs/{job_id}/stream", headers=auth(key))
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams" and r.headers["retry-after"]
    slots.release(tid)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))  # queued -> canceled: the stream ends
    msgs = whole_stream(client, job_id, key)
    assert [m.get("event") for m in msgs if "event" in m] == ["job", "canceled", "end"]
    assert slots.count(tid) == settings.stream_max_per_tenant - 1  # its slot was given back


# -- over real HTTP: live, and across an API restart --------------------------------------------------

class Reader:
    """One open stream over HTTP, read message by message (each read bounded by the client's timeout)."""

    def __init__(self, url, job_id, key, last_event_id=None):
        headers = auth(key) | ({"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {})
        self.http = httpx.Client(timeout=httpx.Timeout(15, connect=5))
        self.cm = self.http.stream("GET", f"{url}/v1/jobs/{job_id}/stream", headers=headers)
        self.response = self.cm.__enter__()
        assert self.response.status_code == 200
        self.it = messages(self.response.iter_lines())

    def next_event(self) -> dict:
        """The next message that is an event (not a comment, not the `retry:` advice)."""
        for m in self.it:
            if "event" in m:
                return m
        raise EOFError("the stream ended")

    def rest(self) -> list[dict]:
        return [m for m in self.it if "event" in m]

    def close(self):
        try:
            self.cm.__exit__(None, None, None)
        except httpx.HTTPError:
            pass  # the server was killed under it
        self.http.close()


@pytest.mark.slow
def test_live_stream_resumes_exactly_across_an_api_restart(stack, settings, make_tenant, wait_until):
    stack.env.update(LDMQ_STREAM_POLL_S="0.2", LDMQ_STREAM_HEARTBEAT_S="0.5")
    api = stack.start_api()
    _, key = make_tenant()
    job_id = httpx.post(f"{stack.url}/v1/jobs/train", headers=auth(key),
                        json={"dataset": "builtin:digits", "steps": 5}).json()["id"]
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 60)

    def progress(p):
        with session_scope(settings) as s:
            jobstate.set_progress(s, job_id, claim.attempt, p, {"step": int(p * 100), "total_steps": 100})

    first = Reader(stack.url, job_id, key)
    seen = []
    assert first.next_event()["event"] == "job"
    assert first.next_event()["event"] == "started"  # written before the stream opened
    for p in (0.1, 0.2, 0.3):  # each written while the stream is open, and read live
        progress(p)
        m = first.next_event()
        assert m["event"] == "progress" and json.loads(m["data"])["data"]["progress"] == p
        seen.append(int(m["id"]))
    # A quiet stream gets comment lines (heartbeats), and stays open.
    assert any(m.get("comment") == "keep-alive" for _, m in zip(range(20), first.it))

    api.signal(signal.SIGKILL)  # the API process dies with the stream open
    api.p.wait(10)
    first.close()
    for p in (0.4, 0.5):  # written while no API runs
        progress(p)
    stack.start_api()
    second = Reader(stack.url, job_id, key, last_event_id=seen[-1])
    assert second.next_event()["event"] == "job"
    for _ in range(2):
        seen.append(int(second.next_event()["id"]))
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded)
    rest = second.rest()  # the final event, `end`, then the server closes the stream
    second.close()
    assert [m.get("event") for m in rest] == ["succeeded", "end"]
    seen.append(int(rest[0]["id"]))

    listed = httpx.get(f"{stack.url}/v1/jobs/{job_id}/events", headers=auth(key)).json()["items"]
    assert seen == [e["id"] for e in listed[1:]]  # none lost, none repeated, in order
    assert [e["type"] for e in listed[1:]] == ["progress"] * 5 + ["succeeded"]


@pytest.mark.slow
def test_sigterm_closes_open_streams_so_the_api_exits_at_once(stack, settings, make_tenant, wait_until):
    """uvicorn waits for open responses before it exits, and a stream ends only with its job: the
    streams close when the process is told to stop (without `end`: the client resumes elsewhere)."""
    stack.env.update(LDMQ_STREAM_POLL_S="0.2")
    api = stack.start_api()
    _, key = make_tenant()
    job_id = httpx.post(f"{stack.url}/v1/jobs/train", headers=auth(key),
                        json={"dataset": "builtin:digits", "steps": 5}).json()["id"]
    with session_scope(settings) as s:
        jobstate.claim(s, job_id, "w", 60)
    reader = Reader(stack.url, job_id, key)
    assert [reader.next_event()["event"] for _ in range(2)] == ["job", "started"]
    api.signal(signal.SIGTERM)
    wait_until(lambda: api.p.poll() is not None, 15, "the API to exit with a stream open")
    rest = list(reader.it)
    reader.close()
    # uvicorn ends a graceful shutdown by raising the signal again: the default SIGTERM exit.
    assert api.p.returncode == -signal.SIGTERM and "Traceback" not in api.output(), api.output()
    assert {"comment": "the API process is stopping; reconnect with Last-Event-ID"} in rest
    assert not any(m.get("event") == "end" for m in rest)
