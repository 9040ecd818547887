"""Outbound requests to tenant URLs: refused addresses, one DNS lookup, the connection pinned to it.

No test here sends traffic beyond loopback: public addresses are only ever resolved by a fake
resolver and "connected" through httpx's MockTransport.
"""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest

from shared.netguard import PinnedTransport, RefusedDestination, address_refusal, pinned_post, resolve_pinned


@pytest.mark.parametrize("address, word", [
    ("127.0.0.1", "loopback"),
    ("127.9.9.9", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("fe80::1", "link-local"),
    ("100.64.0.1", "shared address space"),
    ("100.127.255.254", "shared address space"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.10", "private"),  # TEST-NET-1 (documentation)
    ("198.18.0.1", "private"),  # benchmarking
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
])
def test_refused_addresses_say_why(address, word):
    reason = address_refusal(address)
    assert reason is not None and word in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "100.128.0.1"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def _resolver(table: dict[str, list[list[str]]]):
    """A fake resolver: each lookup of a host returns its next answer; counts the lookups."""
    calls: list[str] = []

    def resolve(host: str, _port: int) -> list[str]:
        calls.append(host)
        answers = table[host]
        return answers[min(len(calls) - 1, len(answers) - 1)]

    return resolve, calls


def test_one_bad_address_among_several_refuses_the_url():
    resolve, _ = _resolver({"mixed.test": [["93.184.216.34", "10.0.0.5"]]})
    with pytest.raises(RefusedDestination, match="non-public address 10.0.0.5 .10.0.0.5 is a private"):
        resolve_pinned("https://mixed.test/hook", resolver=resolve)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost", "gopher://a/"])
def test_only_http_urls_with_a_host(url):
    with pytest.raises(RefusedDestination):
        resolve_pinned(url, resolver=lambda h, p: ["93.184.216.34"])


def test_a_host_that_does_not_resolve_is_refused_without_the_error_text():
    def fail(host, port):
        raise OSError("[Errno -2] Name or service not known: secret detail")

    with pytest.raises(RefusedDestination) as info:
        resolve_pinned("https://nowhere.test/", resolver=fail)
    assert "secret detail" not in str(info.value)


def test_dns_rebinding_cannot_move_the_connection():
    """Public on the check, loopback on a second lookup: there is no second lookup, and the request
    goes to the address that was checked, with the original Host and SNI."""
    resolve, calls = _resolver({"rebind.test": [["93.184.216.34"], ["127.0.0.1"]]})
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    r = pinned_post("https://rebind.test:8443/hook", content=b"{}", headers={"X-Test": "1"}, timeout_s=5,
                    resolver=resolve, inner=httpx.MockTransport(handler))
    assert r.status_code == 204
    assert calls == ["rebind.test"]
    (req,) = seen
    assert req.url.host == "93.184.216.34" and req.url.port == 8443
    assert req.headers["Host"] == "rebind.test:8443"
    assert req.extensions["sni_hostname"] == "rebind.test"


def test_a_host_that_was_not_checked_is_refused_by_the_transport():
    transport = PinnedTransport({"checked.test": "93.184.216.34"}, httpx.MockTransport(lambda r: httpx.Response(200)))
    with httpx.Client(transport=transport) as client:
        with pytest.raises(RefusedDestination):
            client.get("http://other.test/")


def test_redirects_are_not_followed():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    r = pinned_post("http://redirect.test/", content=b"", headers={}, timeout_s=5,
                    resolver=lambda h, p: ["93.184.216.34"], inner=httpx.MockTransport(handler))
    assert r.status_code == 302  # returned as is: the caller records a failed delivery


def test_a_real_connection_goes_to_the_pinned_loopback_address_when_allowed():
    """With the block off (an operator's choice), a real request reaches the pinned address with the
    URL's host in the Host header."""
    got: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got["host"] = self.headers["Host"]
            got["body"] = self.rfile.read(int(self.headers["Content-Length"])).decode()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        resolve, calls = _resolver({"receiver.test": [["127.0.0.1"], ["127.0.0.2"]]})
        r = pinned_post(f"http://receiver.test:{port}/hook", content=b"hello", headers={}, timeout_s=5,
                        block_private=False, resolver=resolve)
        assert r.status_code == 200 and got == {"host": f"receiver.test:{port}", "body": "hello"}
        assert calls == ["receiver.test"]
        with pytest.raises(RefusedDestination, match="loopback"):
            pinned_post(f"http://receiver.test:{port}/hook", content=b"", headers={}, timeout_s=5, resolver=resolve)
    finally:
        server.shutdown()
        server.server_close()
