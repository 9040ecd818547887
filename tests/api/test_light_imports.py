"""The API process stays light: importing and building the app never loads torch or worker code."""

import subprocess
import sys


def test_import_api_does_not_load_torch_or_worker():
    code = (
        "import sys; import api.app; api.app.create_app(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'worker')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shared_does_not_import_api_worker_or_torch():
    code = (
        "import sys, pkgutil, importlib, shared; "
        "[importlib.import_module('shared.' + m.name) for m in pkgutil.iter_modules(shared.__path__)]; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'api', 'worker')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
