"""`pyhv share serve` run by a normal user: the mount goes through fusermount3 (setuid root)
into a directory that user owns, files appear owned by the caller, and it unmounts cleanly.

The server process is a real non-root process: Python starts as root (here the interpreter
may live where other users cannot read it), imports pyhv, drops every privilege to USER
(groups, gid, uid: no capabilities are left), and only then runs `pyhv share serve`. The
client side runs as USER too (without allow_other nobody else may use the mount). USER is
`daemon` (uid 1), not `nobody`: nobody's uid is 65534, the id every unmapped owner shows
as, so a server that showed every file as 65534 would pass as "the caller's".

fusermount3 opens /dev/fuse as the calling user, and distributions make it 0666. Where it is
not (these build machines: 0600, and changing the host's device is not the test's to do),
the test runs in a private mount namespace whose /dev/fuse is a 0666 node of the same device
(10:229) bind-mounted over it: the same kernel driver and the same setuid fusermount3, only
the path's permission differs."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.share_mount import is_mounted

USER = "daemon"                 # a normal user whose uid is not 65534 (see above)

# Everything `share serve` imports, imported before the privileges go.
LAUNCH = """
import os, sys
import argparse, ctypes, errno, fcntl, logging, resource, select, shutil, signal, socket
import struct, subprocess, threading, time
import pyhv.cli, pyhv.share.cli, pyhv.share.devfuse, pyhv.share.server, pyhv.share.watch
import pyhv.share.idmap, pyhv.share.options
pyhv.cli.build_parser()         # imports every subcommand's module
uid = int(sys.argv[1])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
sys.exit(pyhv.cli.main(sys.argv[2:]))
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"needs root to create the non-root server (it drops to {USER})"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006 and not (
            shutil.which("unshare") and shutil.which("nsenter")):
        return ("/dev/fuse is not read-writable by other users here (distributions make it "
                "0666) and unshare/nsenter (util-linux) are missing to give the test one")
    tool = shutil.which("fusermount3")
    if tool is None:
        return "fusermount3 not installed (apt fuse3)"
    if not os.stat(tool).st_mode & 0o4000:
        return "fusermount3 is not setuid root"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no user {USER}"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


PRIVATE_FUSE = """
mkdir -p {d} && mount -t tmpfs -o mode=755 pyhv-test-dev {d} &&
mknod -m 666 {d}/fuse c 10 229 && mount --bind {d}/fuse /dev/fuse && echo ready &&
exec sleep 3600
"""


@contextlib.contextmanager
def users_dev_fuse(base: Path):
    """(command prefix, pid whose mounts to look at): run commands through the prefix to
    see a /dev/fuse other users may open (see the module docstring)."""
    if os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
        yield [], os.getpid()
        return
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         PRIVATE_FUSE.format(d=base / "dev")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n", "private /dev/fuse setup failed"
        yield ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--"], holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def as_user(prefix: list[str], script: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "su", USER, "-s", "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=60)


def test_normal_user_mounts_through_fusermount3():
    user = pwd.getpwnam(USER)
    assert user.pw_uid != 65534
    base = Path(tempfile.mkdtemp(prefix="pyhv-share-user-"))
    os.chmod(base, 0o755)
    host, mnt = base / "host", base / "mnt"
    for d in (host, mnt):
        d.mkdir()
        os.chown(d, user.pw_uid, user.pw_gid)
    (host / "hello").write_text("from the host\n")
    os.chown(host / "hello", user.pw_uid, user.pw_gid)
    (host / "roots").write_text("root's file\n")          # another owner: shows as 65534
    try:
        with users_dev_fuse(base) as (prefix, ns_pid):
            run_as_user(base, host, mnt, user, prefix, ns_pid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_as_user(base: Path, host: Path, mnt: Path, user, prefix: list[str],
                  ns_pid: int) -> None:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", LAUNCH, str(user.pw_uid), "share", "serve", str(host),
         "--mount", str(mnt), "--ready-fd", str(w)],
        pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=base,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            line = ready.readline()
        if line != b"ready\n":
            proc.wait(30)
            pytest.fail(f"server did not start: {proc.stderr.read().decode()}")
        assert is_mounted(mnt, ns_pid)
        server_ids = {line.split()[0]: line.split()[1:] for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith(("Uid:", "Gid:", "CapEff:"))}
        assert server_ids["Uid:"] == [str(user.pw_uid)] * 4
        assert server_ids["CapEff:"] == ["0000000000000000"]
        out = as_user(prefix, f"cd {mnt} && cat hello && echo written > new && mkdir sub && "
                        f"echo inner > sub/f && cat sub/f && ls -n . && rm new")
        assert out.returncode == 0, out.stderr
        assert "from the host\ninner\n" in out.stdout
        owners = {f.split()[-1]: (f.split()[2], f.split()[3]) for f in out.stdout.splitlines()
                  if f.startswith(("-", "d"))}
        assert owners["hello"] == (str(user.pw_uid), str(user.pw_gid))    # the caller
        assert owners["roots"] == ("65534", "65534")                           # other ids
        assert (host / "sub" / "f").read_text() == "inner\n"
        assert (host / "sub" / "f").stat().st_uid == user.pw_uid
        assert not (host / "new").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log = proc.stderr.read().decode()
        proc.stderr.close()
        deadline = time.monotonic() + 10
        while is_mounted(mnt, ns_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        mounted = is_mounted(mnt, ns_pid)
        if mounted:
            subprocess.run([*prefix, "umount", "-l", str(mnt)])
    assert proc.returncode == 0, log
    assert not mounted, "fusermount3 -u did not unmount"
