"""Host folders in a real Linux guest: `pyhv run --engine qemu -v HOSTDIR:GUESTPATH[:ro]`
serves each folder with `pyhv share serve --socket` (vhost-user-fs) and the guest's own
virtio-fs driver mounts it; what the guest does is checked on the host and the other way
round."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.helpers.pyhvrun import PYHV, pyhv


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return pyhv("run", "--engine", "qemu", "--network", "none", *args, timeout=timeout)


def test_read_write_mkdir_rename_unlink_through_v(tmp_path):
    host = tmp_path / "src"
    host.mkdir()
    (host / "hello.txt").write_text("from the host\n")
    (host / "gone.txt").write_text("x")
    done = run("-v", f"{host}:/src", "--", "sh", "-c",
               "cat /src/hello.txt && echo from-the-guest > /src/new.txt && "
               "mkdir -p /src/a/b && mv /src/new.txt /src/a/b/moved.txt && "
               "rm /src/gone.txt && ln -s hello.txt /src/link && ls -ln /src/hello.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "from the host" in done.stdout
    assert (host / "a" / "b" / "moved.txt").read_text() == "from-the-guest\n"
    assert not (host / "gone.txt").exists()
    assert os.readlink(host / "link") == "hello.txt"
    # (as root the ids are the host's: the guest's root creates root's files)
    assert (host / "a" / "b" / "moved.txt").stat().st_uid == os.geteuid()


def test_read_only_volume_refuses_writes(tmp_path):
    host = tmp_path / "ro"
    host.mkdir()
    (host / "keep.txt").write_text("keep")
    done = run("-v", f"{host}:/ro:ro", "--", "sh", "-c",
               "cat /ro/keep.txt; echo; echo x > /ro/new 2>&1; rm /ro/keep.txt 2>&1; "
               "echo rc=$?")
    assert "keep" in done.stdout and "Read-only file system" in done.stdout, done.stdout
    assert sorted(p.name for p in host.iterdir()) == ["keep.txt"]


def test_a_host_edit_is_seen_after_the_attribute_timeout(tmp_path):
    """Linux's virtio-fs has no notification queue: under `auto` a host change shows once
    the 1 s timeouts have passed (and at the next open for data)."""
    host = tmp_path / "w"
    host.mkdir()
    (host / "f.txt").write_text("old\n")
    proc = subprocess.Popen([*PYHV, "run", "--engine", "qemu", "--network", "none", "-v",
                             f"{host}:/w", "--", "sh", "-c",
                             "cat /w/f.txt; touch /w/ready; while [ ! -e /w/edited ]; do "
                             "sleep 0.2; done; sleep 1.5; cat /w/f.txt; ls /w"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (host / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        (host / "f.txt").write_text("new from the host\n")
        (host / "made-on-host").write_text("")
        (host / "edited").write_text("")
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.index("old") < out.index("new from the host"), out
    assert "made-on-host" in out


@pytest.mark.parametrize("spec, message", [
    ("{tmp}", "expected HOSTDIR:GUESTPATH[:ro]"),
    ("{tmp}:rel/path", "the guest path must be absolute"),
    ("{tmp}/missing:/m", "is not a directory"),
    ("{tmp}:/m:rx", "expected HOSTDIR:GUESTPATH[:ro]"),
])
def test_bad_volumes_are_one_line(tmp_path, spec, message):
    done = run("-v", spec.format(tmp=tmp_path), "--", "true")
    assert done.returncode == 1
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_pyhvs_own_vmm_says_it_has_no_shares_yet(tmp_path):
    done = pyhv("run", "--engine", "kvm", "-v", f"{tmp_path}:/m", "--", "true")
    assert done.returncode == 1
    assert "-v needs virtio-fs, which pyhv's own VMM does not have yet" in done.stderr
