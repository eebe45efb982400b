"""Every file operation through the real Linux FUSE client, run twice: against a pyhv share
and against a plain directory (the reference). Same results, same errno."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.share_mount import ShareMount, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


# Another user runs some of the operations, so it must be able to reach the directories.
USER_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture(scope="module", params=["plain", "share", "share-devfuse"])
def root(request):
    """The reference directory, the share as served by default (FUSE over io_uring where the
    kernel has it) and the share served by /dev/fuse reads only."""
    base = Path(tempfile.mkdtemp(prefix=f"pyhv-share-{request.param}-"))
    os.chmod(base, 0o755)
    try:
        if request.param == "plain":
            yield base
            return
        host, mnt = base / "host", base / "mnt"
        host.mkdir()
        transport = ["--no-io-uring"] if request.param == "share-devfuse" else []
        with ShareMount(host, mnt, "--cache", "auto", *transport):
            yield mnt
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def d(root) -> Path:
    path = root / f"t{next(_counter)}"
    path.mkdir()
    return path


def errno_of(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def renameat2(src: Path, dst: Path, flags: int) -> int:
    rc = _libc.renameat2(-100, str(src).encode(), -100, str(dst).encode(), flags)
    return ctypes.get_errno() if rc else 0


def test_create_write_read_append(d):
    p = d / "f"
    p.write_bytes(b"hello")
    with open(p, "ab") as f:
        f.write(b" world")
    assert p.read_bytes() == b"hello world"
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"HELLO", 0) == 5 and os.pread(fd, 100, 0) == b"HELLO world"
        assert os.pread(fd, 10, 1000) == b""
    finally:
        os.close(fd)
    assert errno_of(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.open, d / "missing", os.O_RDONLY) == errno.ENOENT


def test_large_file_roundtrip(d):
    data = os.urandom(3 << 20)
    (d / "big").write_bytes(data)
    assert (d / "big").read_bytes() == data


def test_large_reads_at_any_offset_and_size(d):
    """Large READs are spliced from the file behind the reply header: the bytes, the short
    read at the end of file and reads after the file shrank must be exactly the file's."""
    data = os.urandom((1 << 20) + 777)
    (d / "f").write_bytes(data)
    buf = mmap.mmap(-1, 1 << 20)            # page-aligned, for O_DIRECT
    aligned = ((0, 1 << 20), (4096 * 3, 98304), (1 << 20, 65536), (len(data) + 4095, 4096))
    unaligned = ((4096 * 3, 100000), (len(data) - 40000, 65536), (len(data) - 100, 4096))
    for flags, reads in ((0, aligned + unaligned), (os.O_DIRECT, aligned)):
        fd = os.open(d / "f", os.O_RDONLY | flags)
        try:
            for off, size in reads:
                got = os.preadv(fd, [memoryview(buf)[:size]], off)
                assert buf[:got] == data[off:off + size]
        finally:
            os.close(fd)
    os.truncate(d / "f", 50000)
    assert (d / "f").read_bytes() == data[:50000]
    buf.close()


def test_stat_chmod_chown_truncate_utime(d):
    p = d / "f"
    p.write_bytes(b"x" * 100)
    os.chmod(p, 0o640)
    os.chown(p, 1234, 4321)
    os.truncate(p, 10)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    s = os.stat(p)
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_size) == (0o640, 1234, 4321, 10)
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.truncate(p, 1 << 20)
    assert os.stat(p).st_size == 1 << 20 and p.read_bytes()[10:20] == bytes(10)


def test_times_of_a_symlink_itself(d):
    """`touch -h link` (utimensat AT_SYMLINK_NOFOLLOW) sets the link's own times, as Linux,
    bindfs and virtiofsd do; the target's stay. Only the times asked for change."""
    (d / "target").write_text("t")
    os.utime(d / "target", ns=(5_000_000_000, 6_000_000_000))
    os.symlink("target", d / "link")
    os.utime(d / "link", ns=(1_000_000_007, 2_000_000_009), follow_symlinks=False)
    s = os.lstat(d / "link")
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_007, 2_000_000_009)
    assert os.stat(d / "target").st_mtime_ns == 6_000_000_000
    ns = (os.lstat(d / "link").st_atime_ns, 3_000_000_000)
    os.utime(d / "link", ns=ns, follow_symlinks=False)
    assert os.lstat(d / "link").st_mtime_ns == 3_000_000_000
    assert subprocess.run(["touch", "-h", str(d / "link")]).returncode == 0
    assert os.lstat(d / "link").st_mtime_ns > 3_000_000_000


def test_directories(d):
    (d / "sub").mkdir(0o750)
    assert stat.S_IMODE(os.stat(d / "sub").st_mode) == 0o750
    (d / "sub" / "f").write_text("x")
    assert errno_of(os.rmdir, d / "sub") == errno.ENOTEMPTY
    assert errno_of(os.mkdir, d / "sub") == errno.EEXIST
    assert errno_of(os.open, d / "sub" / "f" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.open, d / "sub", os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.unlink, d / "sub") == errno.EISDIR
    os.unlink(d / "sub" / "f")
    os.rmdir(d / "sub")
    assert errno_of(os.rmdir, d / "sub") == errno.ENOENT


def test_readdir_many_entries(d):
    names = {f"entry-{i:04d}-{'x' * (i % 40)}" for i in range(600)}
    for n in names:
        (d / n).touch()
    (d / "adir").mkdir()
    os.symlink("target", d / "alink")
    seen = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(), e.inode())
            for e in os.scandir(d)}
    assert set(seen) == names | {"adir", "alink"}
    assert seen["adir"][0] and seen["alink"][1]
    for name in ("adir", "alink", next(iter(names))):
        assert seen[name][2] == os.lstat(d / name).st_ino
    assert sorted(os.listdir(d)) == sorted(seen)


def test_rename_unlink_link(d):
    (d / "a").write_text("A")
    (d / "b").write_text("B")
    os.rename(d / "a", d / "b")
    assert (d / "b").read_text() == "A" and not (d / "a").exists()
    os.link(d / "b", d / "c")
    assert os.stat(d / "c").st_nlink == 2 and os.stat(d / "c").st_ino == os.stat(d / "b").st_ino
    (d / "e").write_text("E")
    assert renameat2(d / "e", d / "b", 1) == errno.EEXIST           # RENAME_NOREPLACE
    assert renameat2(d / "e", d / "b", 2) == 0                      # RENAME_EXCHANGE
    assert (d / "b").read_text() == "E" and (d / "e").read_text() == "A"
    assert renameat2(d / "e", d / "z", 2) == errno.ENOENT
    os.unlink(d / "c")
    assert os.stat(d / "e").st_nlink == 1
    assert errno_of(os.link, d / "nothing", d / "x") == errno.ENOENT
    assert errno_of(os.link, d / "e", d / "b") == errno.EEXIST


def test_rename_over_open_file(d):
    (d / "old").write_text("old contents")
    (d / "new").write_text("new contents")
    with open(d / "old") as f:
        os.rename(d / "new", d / "old")
        assert f.read() == "old contents"
    assert (d / "old").read_text() == "new contents"


def test_symlinks(d):
    os.symlink("../somewhere/else", d / "l")
    assert os.readlink(d / "l") == "../somewhere/else"
    assert stat.S_ISLNK(os.lstat(d / "l").st_mode)
    assert errno_of(os.open, d / "l", os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
    (d / "t").write_text("target")
    os.symlink("t", d / "l2")
    assert (d / "l2").read_text() == "target"
    assert errno_of(os.readlink, d / "t") == errno.EINVAL
    os.lchown(d / "l2", 55, 66)
    assert (os.lstat(d / "l2").st_uid, os.lstat(d / "l2").st_gid) == (55, 66)


def test_mknod_fifo_and_socket(d):
    os.mkfifo(d / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    os.mknod(d / "reg", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(d / "reg").st_mode)
    r = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(d / "fifo", os.O_WRONLY)
    os.write(w, b"through the fifo")
    assert os.read(r, 100) == b"through the fifo"
    os.close(r)
    os.close(w)


def test_statfs_and_access(d):
    v = os.statvfs(d)
    assert v.f_bsize > 0 and v.f_namemax == 255
    (d / "f").write_text("x")
    os.chmod(d / "f", 0o644)
    assert os.access(d / "f", os.R_OK | os.W_OK) and not os.access(d / "f", os.X_OK)
    assert not os.access(d / "missing", os.F_OK)


def test_xattrs(d):
    p = d / "f"
    p.write_text("x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.size", b"x" * 3000)
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(n for n in os.listxattr(p) if n.startswith("user.")) == ["user.color",
                                                                            "user.size"]
    assert errno_of(os.setxattr, p, "user.color", b"red", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, p, "user.none", b"red", os.XATTR_REPLACE) == errno.ENODATA
    os.removexattr(p, "user.color")
    assert errno_of(os.getxattr, p, "user.color") == errno.ENODATA
    assert errno_of(os.removexattr, p, "user.color") == errno.ENODATA
    (d / "sub").mkdir()
    os.setxattr(d / "sub", "user.dir", b"1")
    assert os.getxattr(d / "sub", "user.dir") == b"1"


def test_sparse_file_over_4gib_seek_data_hole(d):
    p = d / "sparse"
    with open(p, "wb") as f:
        f.seek(5 << 30)
        f.write(b"data after a hole")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == (5 << 30) + 17
        assert os.lseek(fd, 0, os.SEEK_DATA) >= (5 << 30) - (1 << 20)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 5 << 30, os.SEEK_HOLE) == os.fstat(fd).st_size
        assert errno_of(os.lseek, fd, (6 << 30), os.SEEK_DATA) == errno.ENXIO
        assert os.pread(fd, 17, 5 << 30) == b"data after a hole"
        assert os.pread(fd, 4, 1 << 30) == bytes(4)
    finally:
        os.close(fd)
    assert os.stat(p).st_blocks * 512 < 1 << 20


def test_fallocate_and_punch_hole(d):
    p = d / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        os.pwrite(fd, b"\xff" * 8192, 0)
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert _libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) == 0
        assert os.pread(fd, 8192, 0) == bytes(4096) + b"\xff" * 4096
    finally:
        os.close(fd)


def test_copy_file_range(d):
    data = os.urandom(200_000)
    (d / "src").write_bytes(data)
    src = os.open(d / "src", os.O_RDONLY)
    dst = os.open(d / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = 0
        while done < len(data):
            n = os.copy_file_range(src, dst, len(data) - done, done, done)
            assert n > 0
            done += n
    finally:
        os.close(src)
        os.close(dst)
    assert (d / "dst").read_bytes() == data


def test_mmap_shared_write(d):
    p = d / "f"
    p.write_bytes(bytes(8192))
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
        m[100:105] = b"mmapd"
        m.flush()
    assert p.read_bytes()[100:105] == b"mmapd"


def test_fsync_and_fdatasync(d):
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


LOCKER = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
kind = sys.argv[2]
try:
    if kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked")
except OSError as e:
    print("busy", e.errno)
if kind == "posix":
    res = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("=hhxxxxqqixxxx", fcntl.F_WRLCK, 0, 0, 10, 0))
    t, _, start, length, pid = struct.unpack("=hhxxxxqqixxxx", res)
    print("getlk", t, start, length, pid)
"""


def _other_process(path: Path, kind: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", LOCKER, str(path), kind], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return out.split("\n")


def test_posix_locks_between_processes(d):
    p = d / "f"
    p.write_bytes(bytes(100))
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 5, 0)        # bytes 0..4
        lines = _other_process(p, "posix")
        assert lines[0] in (f"busy {errno.EAGAIN}", f"busy {errno.EACCES}")
        t, start, length, pid = (int(x) for x in lines[1].split()[1:])
        assert (t, start, length) == (fcntl.F_WRLCK, 0, 5)
        assert pid == os.getpid()
        fcntl.lockf(fd, fcntl.LOCK_UN, 5, 0)
        assert _other_process(p, "posix")[0] == "locked"
        # a second descriptor in this process shares its locks; closing it drops them
        fcntl.lockf(fd, fcntl.LOCK_EX, 5, 0)
        os.close(os.open(p, os.O_RDONLY))
        assert _other_process(p, "posix")[0] == "locked"
    finally:
        os.close(fd)


def test_flock_between_processes(d):
    p = d / "f"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert _other_process(p, "flock")[0] == f"busy {errno.EWOULDBLOCK}"
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert _other_process(p, "flock")[0] == "locked"
    finally:
        os.close(fd)


def test_setuid_cleared_on_write_by_another_user(d):
    p = d / "prog"
    p.write_bytes(b"#!/bin/sh\n")
    os.chmod(p, 0o6777)
    os.chown(p, 0, 0)
    subprocess.run([USER_PY, "-c", f"open({str(p)!r}, 'ab').write(b'x')"], check=True,
                   user=65534, group=65534, timeout=60)
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID) == 0 and mode & 0o777 == 0o777


def test_files_created_by_a_user_are_theirs(d):
    os.chmod(d, 0o777)
    code = (f"import os; open({str(d / 'mine')!r}, 'w').close(); os.mkdir({str(d / 'md')!r});"
            f"os.symlink('x', {str(d / 'ml')!r})")
    subprocess.run([USER_PY, "-c", code], check=True, user=65534, group=65534,
                   timeout=60)
    for name in ("mine", "md", "ml"):
        s = os.lstat(d / name)
        assert (s.st_uid, s.st_gid) == (65534, 65534), name


def test_permissions_are_enforced(d):
    p = d / "secret"
    p.write_text("root only")
    os.chmod(p, 0o600)
    done = subprocess.run([USER_PY, "-c", f"open({str(p)!r}).read()"],
                          user=65534, group=65534, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "PermissionError" in done.stderr


def test_times_follow_writes(d):
    p = d / "f"
    p.write_text("1")
    os.utime(p, ns=(0, 0))
    p.write_text("2")
    assert os.stat(p).st_mtime_ns > 0
    assert time.time() - os.stat(p).st_mtime < 3600


def test_statx_ino_stable_across_lookups(d):
    (d / "f").write_text("x")
    first = os.stat(d / "f").st_ino
    os.rename(d / "f", d / "g")
    assert os.stat(d / "g").st_ino == first
