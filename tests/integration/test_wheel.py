"""The wheel builds, passes auditwheel, installs into a fresh venv and runs."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_manylinux_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    built = subprocess.run(["./wheels/build.sh"], cwd=ROOT, capture_output=True, text=True,
                           env={"PYTHON": sys.executable, "PATH": str(Path(sys.executable).parent)
                                + ":/usr/bin:/bin"})
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = Path(ROOT / built.stdout.strip().splitlines()[-1])
    assert "manylinux" in wheel.name and wheel.exists()
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run([env_dir / "bin/pip", "install", "-q", str(wheel)], capture_output=True,
                         text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    version = subprocess.run([env_dir / "bin/pyhv", "--version"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.strip() == "pyhv 0.1.0"
    # The compiled core is importable from the installed wheel (not from the source tree).
    probe = subprocess.run([env_dir / "bin/python", "-c",
                            "import hvcore.kvm, hvcore.uart; print(hvcore.kvm.__file__); "
                            "from importlib.resources import files; "
                            "assert files('pyhv.guest').joinpath('init.sh').is_file()"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert str(env_dir) in probe.stdout
