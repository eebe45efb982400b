"""Real work on a pyhv share: git, tar, fio with verification."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.helpers.share_mount import ShareMount, skip_reason

pytestmark = [pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def share():
    base = Path(tempfile.mkdtemp(prefix="pyhv-share-work-"))
    host, mnt = base / "host", base / "mnt"
    host.mkdir()
    with ShareMount(host, mnt, "--cache", "auto"):
        yield host, mnt
    shutil.rmtree(base, ignore_errors=True)


def run(*cmd, cwd=None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=600).stdout


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_clone_fsck_status(share):
    _, mnt = share
    run("git", "clone", "-q", "--no-hardlinks", str(REPO), str(mnt / "clone"))
    run("git", "-c", f"safe.directory={mnt / 'clone'}", "fsck", "--strict",
        cwd=mnt / "clone")
    assert run("git", "-c", f"safe.directory={mnt / 'clone'}", "status", "--porcelain",
               cwd=mnt / "clone") == ""
    (mnt / "clone" / "new-file").write_text("x")
    out = run("git", "-c", f"safe.directory={mnt / 'clone'}", "status", "--porcelain",
              cwd=mnt / "clone")
    assert out == "?? new-file\n"


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = "-> " + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_untar_source_tree_checksums(share, tmp_path):
    _, mnt = share
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(REPO / "src", arcname="src")
        tar.add(REPO / "tests", arcname="tests")
    run("tar", "-xf", str(archive), "-C", str(mnt))
    reference = tmp_path / "ref"
    reference.mkdir()
    run("tar", "-xf", str(archive), "-C", str(reference))
    assert _digests(mnt / "src") == _digests(reference / "src")
    assert _digests(mnt / "tests") == _digests(reference / "tests")


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed (apt fio)")
def test_concurrent_writers_fio_verify(share):
    _, mnt = share
    (mnt / "fio").mkdir()
    run("fio", "--name=verify", f"--directory={mnt / 'fio'}", "--numjobs=4", "--size=16M",
        "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--group_reporting")
