"""The import graph of the project: no circle, and every arrow points the way docs/architecture.md
draws it (api → shared ← worker; inside worker, tasks → runtime → jobs → model).

Every import counts, those inside functions (and under ``if TYPE_CHECKING``) included: a lazy
import is still a dependency, only a later one. And no module imports another's private
(underscored) names: what two modules share is public where it lives.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "shared", "worker", "ldmq", "migrations")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    names = {_module_name(p): p for p in files}

    def resolve(n: str) -> str | None:
        while n and n not in names:
            n = n.rpartition(".")[0]
        return n or None

    graph = {}
    for name, path in names.items():
        targets = {resolve(i) for i in _imports(path, name)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def _external(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Per project module, the imports (project or third-party) that start with one of ``prefixes``."""
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    return {_module_name(p): {i for i in _imports(p, _module_name(p))
                              if any(i == x or i.startswith(x + ".") for x in prefixes)} for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return comps


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_graph_sees_imports_inside_functions():
    # A guard on the test itself: the executor child imports the jobs inside a function.
    assert "worker.jobs.sample" in _graph()["worker.runtime.executor"]


# (layer, what it must never import): the worker's layers in their one-way order, then the rest.
WORKER_LAYERS = ("worker.tasks", "worker.celery_app", "worker.runtime", "worker.jobs", "worker.model")
FORBIDDEN = {
    "worker.model": ("worker.jobs", "worker.runtime", "worker.tasks", "worker.celery_app",
                     # no database, no storage, no broker
                     "shared.db", "shared.models", "shared.jobstate", "shared.storage", "shared.registry",
                     "shared.queue", "shared.processes", "shared.webhooks", "sqlalchemy", "boto3", "botocore",
                     "celery", "kombu", "redis", "psycopg"),
    "worker.jobs": ("worker.runtime", "worker.tasks", "worker.celery_app", "celery", "kombu"),
    "worker.runtime": ("worker.tasks", "worker.celery_app"),
    "worker": ("ldmq",),  # the command line and the benchmarks use the worker, never the reverse
    "shared": ("api", "worker", "ldmq", "torch", "diffusers", "transformers"),
    "api": ("worker", "ldmq", "torch", "diffusers", "transformers"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_one_way(layer):
    found = _external(FORBIDDEN[layer])
    bad = {m: sorted(v) for m, v in found.items() if (m == layer or m.startswith(layer + ".")) and v}
    assert bad == {}


def _private_imports(path: Path) -> list[str]:
    """``from m import _name`` (or ``import m._sub``) where ``m`` is a project module: a leading
    underscore says "not for other modules", so what two modules share gets a public name."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
            out += [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] in PACKAGES
                    and any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    return out


def test_no_module_imports_another_modules_private_names():
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    found = {_module_name(p): _private_imports(p) for p in files}
    assert {m: v for m, v in found.items() if v} == {}


def test_the_private_import_check_sees_one():
    # A guard on the test itself, on the import the benchmarks' move removed.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.py"
        path.write_text("from ldmq.bench.sample import _free_port, wait_healthy\nfrom os import _exit\n")
        assert _private_imports(path) == ["ldmq.bench.sample._free_port"]


def test_the_worker_process_never_loads_torch():
    """The worker process claims, heartbeats and supervises; the model runs in its spawned executor."""
    code = (
        "import sys; import worker.celery_app; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
