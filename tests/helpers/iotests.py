"""QEMU's own qcow2 tests (qemu-iotests) run against `pyhv img`: the source comes from the
Debian package of the installed qemu-utils (scripts/fetch-qemu-iotests.sh, cached), and
`./check` runs with QEMU_IMG_PROG pointing at a `qemu-img` wrapper of pyhv img; every
other program (qemu-io, qemu-nbd, qemu-storage-daemon) is the real one.

The wrapper is a Python script named `qemu-img`: pyhv img names itself after the program
it was started as (as qemu-img does), which is the one thing the tests' filters do not map."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FETCH = ROOT / "scripts" / "fetch-qemu-iotests.sh"
# "NNN   pass   [start] [end]   0.2s   detail" (after the progress columns)
RESULT = re.compile(r"(\S+)\s+(pass|fail|not run)\s+\[[^]]*\]\s+\[[^]]*\]\s+\S+\s*(.*)$")


@dataclass
class IotestResult:
    status: str                 # pass, fail, not run
    detail: str                 # the diff against the expected output, or the reason


def iotests_dir() -> Path:
    done = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"fetching qemu-iotests failed: {done.stderr.strip()[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def wrapper(directory: Path, qemu_img: str | None = None) -> Path:
    """A `qemu-img` in `directory` that runs pyhv img (or execs `qemu_img` when given)."""
    path = directory / "qemu-img"
    if qemu_img:
        path.write_text(f"#!/bin/sh\nexec {qemu_img} \"$@\"\n")
    else:
        path.write_text(f"#!{sys.executable}\nimport sys\nfrom pyhv.cli import main\n"
                        "sys.exit(main(['img', *sys.argv[1:]]))\n")
    path.chmod(0o755)
    return path


def run_iotests(names: list[str], work: Path, qemu_img: str | None = None,
                timeout: float = 3000) -> dict[str, IotestResult]:
    """Run `./check -qcow2 NAMES` once; the outcome of each test by name."""
    source = iotests_dir()
    bindir = work / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, QEMU_IMG_PROG=str(wrapper(bindir, qemu_img)),
               QEMU_IO_PROG="/usr/bin/qemu-io", QEMU_NBD_PROG="/usr/bin/qemu-nbd",
               QSD_PROG="/usr/bin/qemu-storage-daemon",
               QEMU_PROG="/usr/bin/qemu-system-x86_64",
               TEST_DIR=str(work / "scratch"), SOCK_DIR=str(work / "sock"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    done = subprocess.run(["./check", "-qcow2", *names], cwd=source, env=env,
                          capture_output=True, text=True, timeout=timeout)
    results: dict[str, IotestResult] = {}
    for line in done.stdout.splitlines():
        m = RESULT.search(line.strip())
        if m and m.group(1) in names:
            status, rest = m.group(2), m.group(3).strip()
            detail = rest
            bad = work / "scratch" / f"{m.group(1)}.out.bad"
            if status == "fail" and bad.exists():
                detail = subprocess.run(["diff", "-u", str(source / f"{m.group(1)}.out"),
                                         str(bad)], capture_output=True,
                                        text=True).stdout[-4000:]
            results[m.group(1)] = IotestResult(status, detail)
    return results
