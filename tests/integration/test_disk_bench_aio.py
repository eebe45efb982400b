"""`pyhv img bench -i io_uring|native` against qemu-img bench: the same flags write the same
bytes (qemu-img compare), leave a clean image (qemu-img check), print the same lines and
refuse what qemu-img refuses with the same exit code."""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from tests.helpers.disk_qemu import check, qemu_img, qemu_io

MODES = [("io_uring", "writeback"), ("native", "none")]


def _queue_or_skip(kind: str) -> None:
    from hvcore.aio import AioQueue

    try:
        AioQueue(kind, 1).close()
    except OSError as e:
        pytest.skip(f"{kind} is unavailable here: {e}")


def img(*args, check_rc: bool = True, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:          # writes past `fsize` fail with EFBIG (no SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    done = subprocess.run([sys.executable, "-m", "pyhv", "img", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if fsize else None)
    if check_rc:
        assert done.returncode == 0, done.stderr
    return done


def same_lines(ours: str, theirs: str) -> None:
    """Every line equal except the measured seconds."""
    def norm(text: str) -> list[str]:
        return [re.sub(r"in [0-9.]+ seconds", "in N seconds", line)
                for line in text.strip().splitlines()]
    assert norm(ours) == norm(theirs)


def bench_both(tmp_path, fmt: str, make, args: list[str]) -> tuple:
    """Run qemu-img bench and pyhv img bench with `args` on two copies of one image."""
    a, b = tmp_path / f"q.{fmt}", tmp_path / f"p.{fmt}"
    make(a)
    shutil.copyfile(a, b)
    theirs = qemu_img("bench", *args, "-f", fmt, a)
    ours = img("bench", *args, "-f", fmt, b)
    same_lines(ours.stdout, theirs.stdout)
    return a, b


def assert_same_image(fmt: str, a, b) -> None:
    done = qemu_img("compare", "-f", fmt, "-F", fmt, a, b, check=False)
    assert done.returncode == 0, done.stdout
    if fmt == "qcow2":
        assert check(b)[0] == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("aio,cache", MODES)
@pytest.mark.parametrize("depth", [1, 16])
def test_writes_match_qemu_img(tmp_path, fmt, aio, cache, depth):
    _queue_or_skip(aio)

    def make(path):
        qemu_img("create", "-f", fmt, path, "32M")

    # 1001 requests: not a multiple of the depth; -o puts them past the first cluster
    args = ["-w", "-i", aio, "-t", cache, "-d", str(depth), "-c", "1001", "-o", "96k",
            "--pattern", "90"]
    a, b = bench_both(tmp_path, fmt, make, args)
    assert_same_image(fmt, a, b)
    qemu_io(b, "read -P 0 0 96k", f"read -P 90 96k {1001 * 4096}",
            f"read -P 0 {96 * 1024 + 1001 * 4096} 4k", fmt=fmt)
    # reads through the queue: the same lines, the image unchanged
    args = ["-i", aio, "-t", cache, "-d", str(depth), "-c", "777", "-s", "64k"]
    theirs = qemu_img("bench", *args, "-f", fmt, a)
    same_lines(img("bench", *args, "-f", fmt, b).stdout, theirs.stdout)
    assert_same_image(fmt, a, b)


@pytest.mark.parametrize("options", ["cluster_size=64k", "extended_l2=on,cluster_size=64k"])
@pytest.mark.parametrize("aio,cache", MODES)
def test_qcow2_every_cluster_kind(tmp_path, options, aio, cache):
    """Unaligned requests crossing clusters that are data, zero, compressed, shared with a
    snapshot and unallocated over a backing file: mapped data goes through the queue, the
    rest through the engine, and the result is what qemu-img bench leaves."""
    _queue_or_skip(aio)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 3 0 8M")

    def make(path):
        qemu_img("create", "-f", "qcow2", "-o", options, "-b", base, "-F", "qcow2", path, "8M")
        qemu_io(path, "write -P 1 0 1M", "write -c -P 2 1M 256k", "write -z 2M 320k",
                "write -P 4 3M 100k")
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -P 5 512k 64k")

    args = ["-w", "-i", aio, "-t", cache, "-d", "16", "-c", "1500", "-s", "6k", "-S", "5k",
            "--pattern", "77"]
    a, b = bench_both(tmp_path, "qcow2", make, args)
    assert_same_image("qcow2", a, b)
    args = ["-i", aio, "-t", cache, "-d", "8", "-c", "1000", "-s", "6k", "-S", "7k"]
    same_lines(img("bench", *args, b).stdout, qemu_img("bench", *args, a).stdout)
    qemu_img("snapshot", "-a", "s1", b)
    qemu_io(b, "read -P 1 0 1M", "read -P 2 1M 256k", "read -P 0 2M 320k")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cache", ["writethrough", "directsync"])
def test_flush_interval_and_writethrough(tmp_path, fmt, cache):
    _queue_or_skip("io_uring")

    def make(path):
        qemu_img("create", "-f", fmt, path, "16M")

    args = ["-w", "-i", "io_uring", "-t", cache, "-d", "4", "-c", "999", "-s", "8k",
            "--flush-interval", "8", "--pattern", "33"]
    a, b = bench_both(tmp_path, fmt, make, args)
    assert_same_image(fmt, a, b)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cache", ["writeback", "writethrough", "unsafe"])
def test_native_needs_o_direct_as_in_qemu(tmp_path, fmt, cache):
    path = tmp_path / f"n.{fmt}"
    qemu_img("create", "-f", fmt, path, "1M")
    theirs = qemu_img("bench", "-i", "native", "-t", cache, "-f", fmt, path, check=False)
    ours = img("bench", "-i", "native", "-t", cache, "-f", fmt, path, check_rc=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (1, "")
    assert ours.stderr.strip().removeprefix("pyhv: ") == \
        theirs.stderr.strip().removeprefix("qemu-img: ")
    assert len(ours.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("aio,cache", MODES)
def test_failing_request_is_one_line(tmp_path, fmt, aio, cache):
    """Queued writes past RLIMIT_FSIZE fail (EFBIG): one line naming it, exit code 1, and
    what was written before is intact."""
    _queue_or_skip(aio)
    path = tmp_path / f"f.{fmt}"
    qemu_img("create", "-f", fmt, path, "8M")
    if fmt == "qcow2":
        qemu_io(path, "write -P 1 0 8M")           # mapped: the writes go to the queue
    done = img("bench", "-w", "-i", aio, "-t", cache, "-d", "16", "-c", "2048",
               "--pattern", "6", "-f", fmt, path, check_rc=False, fsize=4 << 20)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0], done.stderr
    if fmt == "qcow2":
        assert check(path)[0] == 0
        qemu_io(path, "read -P 6 0 2M")
    else:
        qemu_io(path, "read -P 6 0 2M", fmt="raw")
