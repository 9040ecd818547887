"""deploy/k8s/multigpu: the overlay that adds a multi-GPU train worker to the base stack (see
docs/distributed-training.md), checked as tests/deploy/test_manifests.py checks the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "deploy" / "k8s" / "multigpu"
K8S_VERSIONS = ["1.29.0", "1.37.0"]  # as tests/deploy/test_manifests.py
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def documents() -> list[dict]:
    kust = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    return [d for name in kust["resources"] if name != ".."
            for d in yaml.safe_load_all((OVERLAY / name).read_text()) if d is not None]


def worker() -> dict:
    (dep,) = [d for d in documents() if d["kind"] == "Deployment"]
    return dep


def quantity(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_matches_the_kubernetes_schema(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)


def test_overlay_builds_on_the_base_and_lists_its_one_file():
    kust = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization" and kust["namespace"] == "ldmq"
    assert kust["resources"] == ["..", "worker-multigpu.yaml"]
    assert {p.name for p in OVERLAY.glob("*.yaml")} == {"kustomization.yaml", "worker-multigpu.yaml"}
    base = yaml.safe_load((OVERLAY.parent / "kustomization.yaml").read_text())
    assert "ldmq-worker-cuda" in {i["name"] for i in base["images"]}  # the base sets this overlay's image


def test_the_worker_trains_on_every_gpu_it_requests():
    from shared.queue import QUEUE_FOR_TYPE
    from shared.settings import Settings

    dep = worker()
    assert dep["metadata"]["namespace"] == "ldmq"
    assert dep["spec"]["replicas"] == 0, "scaled by hand where multi-GPU nodes exist"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    spec = dep["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 300  # time to stop every rank and checkpoint
    (c,) = spec["containers"]
    assert "command" not in c and c["args"][:2] == ["ldmq", "worker"]
    assert c["image"] == "ldmq-worker-cuda"
    assert c["args"][c["args"].index("--queues") + 1] == QUEUE_FOR_TYPE["train"]
    assert c["args"][c["args"].index("--concurrency") + 1] == "1", "one job takes every GPU"
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 2 and int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LDMQ_WORKER_DEVICE"] == "cuda"
    devices = Settings(train_devices=env["LDMQ_TRAIN_DEVICES"]).train_devices  # a value the worker accepts
    assert devices in ("auto", gpus)
    assert {"configMapRef": {"name": "ldmq-config"}} in c["envFrom"]
    assert {"secretRef": {"name": "ldmq-secrets"}} in c["envFrom"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])


def test_dev_shm_is_memory_sized_for_nccl():
    spec = worker()["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    size = quantity(volume["emptyDir"]["sizeLimit"])
    assert size >= 1 * 2**30  # NCCL's buffers between the ranks of the pod
    assert size < quantity(c["resources"]["limits"]["memory"])  # it counts against the pod's memory


def test_its_pods_are_not_the_base_workers():
    """Its selector must not pick the base Deployments' pods, nor KEDA's target's."""
    base = [d for p in sorted((OVERLAY.parent).glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d is not None and d["kind"] == "Deployment"]
    mine = worker()["spec"]["selector"]["matchLabels"]
    for dep in base:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert not mine.items() <= labels.items(), dep["metadata"]["name"]
        assert dep["metadata"]["name"] != worker()["metadata"]["name"]
