"""`pyhv img` against qemu-img: same images, same answers, same exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.disk_qemu import check, compare, qemu_img, qemu_io


def img(*args, check_rc: bool | None = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pyhv", "img", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check_rc:
        assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("options", [
    "", "compat=0.10", "cluster_size=512,refcount_bits=1", "cluster_size=2M",
    "extended_l2=on", "compression_type=zstd,lazy_refcounts=on", "refcount_bits=64",
    "preallocation=metadata", "preallocation=falloc",
])
def test_create_passes_qemu_check_and_info_agrees(tmp_path, options):
    path = tmp_path / "c.qcow2"
    img("create", "-f", "qcow2", *(["-o", options] if options else []), path, "100M")
    assert check(path)[0] == 0
    ours = json.loads(img("info", "--output", "json", path).stdout)
    theirs = json.loads(qemu_img("info", "--output", "json", path).stdout)
    for key in ("virtual-size", "cluster-size", "format", "format-specific", "dirty-flag"):
        assert ours[key] == theirs[key], key
    qemu_io(path, "write -P 7 1000 300000")       # qemu can use what we made
    assert check(path)[0] == 0


def test_map_matches_qemu(tmp_path):
    path = tmp_path / "m.qcow2"
    qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 1 0 192k", "write -z 1M 128k", "write -P 2 5M 64k")
    for fmt in ("human", "json"):
        ours = img("map", "--output", fmt, path).stdout.strip()
        theirs = qemu_img("map", "--output", fmt, path).stdout.strip()
        assert ours == theirs.replace(str(path), str(path))


def test_check_exit_codes_leaks_and_repair(tmp_path):
    path = tmp_path / "l.qcow2"
    qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 1 0 1M")
    assert img("check", path).returncode == 0
    # leak two clusters: bump their refcounts without a reference (refcount block at 0x20000)
    with open(path, "r+b") as f:
        f.seek(0x20000 + 2 * 40)
        f.write(b"\x00\x01\x00\x01")
        f.truncate(max(f.seek(0, 2), 41 * 65536))
    assert qemu_img("check", path, check=False).returncode == 3
    done = img("check", path, check_rc=False)
    assert done.returncode == 3 and "2 leaked clusters" in done.stdout
    assert img("check", "-r", "leaks", path).returncode == 0
    assert qemu_img("check", path, check=False).returncode == 0
    # a corruption: refcount 0 for a referenced data cluster
    with open(path, "r+b") as f:
        f.seek(0x20000 + 2 * 5)
        f.write(b"\x00\x00")
    assert qemu_img("check", path, check=False).returncode == 2
    assert img("check", path, check_rc=False).returncode == 2
    assert img("check", "-r", "all", path).returncode == 0
    assert qemu_img("check", path, check=False).returncode == 0


@pytest.mark.parametrize("compress", [False, True])
def test_convert_both_ways(tmp_path, compress):
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", src, "32M")
    qemu_io(src, "write -P 5 0 2M", "write -P 6 10M 100k", "write -z 20M 1M")
    raw = tmp_path / "o.raw"
    img("convert", "-O", "raw", src, raw)
    assert compare(src, raw).returncode == 0
    assert raw.stat().st_blocks * 512 < 8 << 20             # sparse output
    back = tmp_path / "b.qcow2"
    img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []), raw, back)
    assert check(back)[0] == 0
    assert compare(back, raw).returncode == 0
    if compress:
        assert json.loads(qemu_img("check", "--output", "json", back).stdout)[
            "compressed-clusters"] > 0


def test_compare_exit_codes(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.raw"
    qemu_img("create", "-f", "qcow2", a, "4M")
    qemu_io(a, "write -P 1 100k 10k")
    qemu_img("convert", "-O", "raw", a, b)
    assert img("compare", "-F", "raw", a, b).stdout.strip() == "Images are identical."
    qemu_io(b, "write -P 2 3M 1", fmt="raw")
    done = img("compare", "-F", "raw", a, b, check_rc=False)
    assert done.returncode == 1 and "Content mismatch at offset 3145728!" in done.stdout
    assert img("compare", a, tmp_path / "missing", check_rc=False).returncode == 2


def test_resize_grow_and_shrink(tmp_path):
    path = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", path, "1M")
    qemu_io(path, "write -P 3 0 64k")
    img("resize", path, "+3G")       # the L1 table moves
    assert json.loads(qemu_img("info", "--output", "json", path).stdout)[
        "virtual-size"] == (1 << 20) + (3 << 30)
    assert check(path)[0] == 0
    qemu_io(path, "read -P 3 0 64k", "write -P 4 2G 4k")
    assert img("resize", path, "1M", check_rc=False).returncode == 1     # needs --shrink
    img("resize", "--shrink", path, "3G")
    assert check(path)[0] == 0
    qemu_io(path, "read -P 4 2G 4k", "read -P 3 0 64k")
    img("resize", "--shrink", path, "1M")    # as qemu-img: the data past the end is dropped
    assert check(path)[0] == 0
    img("resize", path, "3G")
    qemu_io(path, "read -P 0 2G 4k", "read -P 3 0 64k")


def test_commit_and_rebase(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 1 0 8M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 2 1M 100k", "write -z 3M 64k")
    expect = tmp_path / "expect.raw"
    qemu_img("convert", "-O", "raw", top, expect)
    img("commit", top)
    assert compare(base, expect).returncode == 0 and check(base)[0] == 0
    assert compare(top, expect).returncode == 0 and check(top)[0] == 0
    assert "0x100000" not in qemu_img("map", top).stdout.split(str(top))[0]
    # safe rebase onto an empty image keeps the guest view
    empty = tmp_path / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", empty, "8M")
    img("rebase", "-b", "empty.qcow2", "-F", "qcow2", top)
    assert compare(top, expect).returncode == 0 and check(top)[0] == 0
    info = json.loads(qemu_img("info", "--output", "json", top).stdout)
    assert info["backing-filename"] == "empty.qcow2"
    img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top)
    assert json.loads(qemu_img("info", "--output", "json", top).stdout)[
        "backing-filename"] == "base.qcow2"


def test_snapshot_list_and_bench(tmp_path):
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "first", path)
    ours = img("snapshot", "-l", path).stdout.splitlines()
    theirs = qemu_img("snapshot", "-l", path).stdout.splitlines()
    assert ours == theirs
    done = img("bench", "-w", "-c", "2000", "-d", "16", "--pattern", "9", path)
    assert done.stdout.startswith("Sending 2000 write requests, 4096 bytes each, 16 in parallel")
    assert check(path)[0] == 0
    qemu_io(path, "read -P 9 0 4k", "read -P 9 4M 4k")
    qemu_img("snapshot", "-a", "first", path)
    qemu_io(path, "read -P 1 0 1M")


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00\x00\x00\x07" + bytes(100))
    done = img("info", "-f", "qcow2", bad, check_rc=False)
    theirs = qemu_img("info", "-f", "qcow2", bad, check=False)
    assert done.returncode == theirs.returncode == 1
    assert done.stderr.strip() == f"pyhv: Could not open '{bad}': Unsupported qcow2 version 7"
    assert theirs.stderr.strip() == done.stderr.strip().replace("pyhv:", "qemu-img:", 1)


def test_write_batch_matches_single_writes(tmp_path):
    """One batched call (zero skipping, gathered pwritev) leaves what single writes do."""
    import pyhv.disk

    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", p, "8M")
    buf = bytearray(256 * 1024)
    for i in range(0, len(buf), 12288):
        buf[i:i + 5000] = bytes([i % 251 + 1]) * 5000
    pieces = [(0, 0, 65536), (1 << 20, 65536, 65536), (3 << 20, 131072, 131072)]
    with pyhv.disk.open(str(a), "qcow2") as d:
        d.core.write_batch(buf, pieces, 4096)
        d.flush()
    with pyhv.disk.open(str(b), "qcow2") as d:
        for g, off, n in pieces:
            d.write(g, buf[off:off + n])
        d.flush()
    assert check(a)[0] == 0
    assert qemu_img("compare", a, b, check=False).returncode == 0
    extents = json.loads(img("map", "--output", "json", a).stdout)
    assert (extents[0]["length"], extents[1]["data"]) == (8192, False)   # zeroes skipped


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_bench_direct_and_depth(tmp_path, fmt):
    path = tmp_path / f"b.{fmt}"
    qemu_img("create", "-f", fmt, path, "16M")
    done = img("bench", "-w", "-t", "none", "-d", "8", "-c", "3000", "--pattern", "5",
               "-f", fmt, path)
    assert "8 in parallel" in done.stdout
    img("bench", "-t", "none", "-d", "4", "-c", "3000", "-s", "64k", "-f", fmt, path)
    if fmt == "qcow2":
        assert check(path)[0] == 0
    qemu_io(path, "read -P 5 0 4k", "read -P 5 8M 4k", fmt=fmt)


def test_grow_with_backing_zeroes_the_new_area(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 3 0 4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1000000")
    img("resize", top, "3M")
    qemu_io(top, "read -P 3 0 1000448", "read -P 0 1000448 2145280")   # 512-byte rounded
    assert check(top)[0] == 0
