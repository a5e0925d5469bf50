"""Project invariants: the `platform` folder never shadows the standard library."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_platform_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_wins_with_repo_root_first_on_path():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), env_path])
               if (env_path := os.environ.get("PYTHONPATH")) else str(ROOT))
    code = "import platform, torch; print(platform.system(), platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    system, path = out.stdout.split()
    assert system and not path.startswith(str(ROOT / "platform"))


def test_import_compresszoo_is_light():
    code = "import sys, compresszoo, compresszoo.models; print(sorted(m for m in ('ray', 'mlflow', 'boto3') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
