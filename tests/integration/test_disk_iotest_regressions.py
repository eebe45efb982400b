"""The data-damaging bugs QEMU's own qcow2 tests found in `pyhv img` (iotests 054, 112,
138, 271, 287), each replayed against qemu-img on a twin of the same image: pyhv's outcome
(exit status, what qemu-img check then finds, the guest data) must be qemu-img's."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from pyhv.disk.convert import convert
from tests.helpers.disk_qemu import check, qemu_img, qemu_io

PYHV_IMG = [sys.executable, "-m", "pyhv", "img"]


def img(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*PYHV_IMG, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def be64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def findings(path: Path) -> tuple[int, dict]:
    """qemu-img check's exit status and JSON report, less the file name."""
    rc, report = check(path)
    report.pop("filename", None)
    return rc, report


def twins(path: Path) -> tuple[Path, Path]:
    """(ours, theirs): two copies of the same corrupted image."""
    ours, theirs = path.with_suffix(".ours"), path.with_suffix(".theirs")
    shutil.copy(path, ours)
    shutil.copy(path, theirs)
    return ours, theirs


def test_zstd_convert_with_8_workers_is_exact_50_times(tmp_path):
    """iotest 287: one zstd context shared by the compression threads wrote clusters that
    did not decompress to the source (exit status 0), or raised, or crashed."""
    rng = random.Random(287)
    src = tmp_path / "src.raw"
    # compressible but different in every cluster: 16 letters at random
    src.write_bytes(bytes(rng.choice(b"abcdefghijklmnop") for _ in range(8 << 20)))
    for i in range(50):
        dst = tmp_path / f"z{i % 2}.qcow2"
        convert(str(src), str(dst), "raw", "qcow2", compress=True, progress=False,
                sparse=4096, options={"compression_type": "zstd"}, workers=8)
        done = qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst, check=False)
        assert done.returncode == 0, f"conversion {i}: {done.stdout}{done.stderr}"
    rc, result = check(dst)
    assert rc == 0 and result["compressed-clusters"] == 128


def test_convert_workers_option(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(b"pyhv" * (1 << 18))
    done = img("convert", "-c", "-m", "3", "-O", "qcow2", "-f", "raw", src, tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert qemu_img("compare", "-f", "raw", src, tmp_path / "o", check=False).returncode == 0
    bad = img("convert", "-m", "17", "-O", "qcow2", src, tmp_path / "o2")
    assert bad.returncode != 0 and "between 1 and 16" in bad.stderr
    assert not (tmp_path / "o2").exists()


def _ext_l2_unaligned(tmp_path: Path, zero_it: bool) -> Path:
    """iotest 271's image: extended L2 over a raw backing file, one cluster allocated at
    0x50000 (L2 table at 0x40000), its L2 entry made unaligned (0x50200)."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", base, "128k")
    qemu_io(base, "write -q -P 0xff 0 128k", fmt="raw")
    path = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", base, path)
    qemu_io(path, "write -q -P 1 4k 2k")
    if zero_it:                         # no subcluster allocated any more
        qemu_io(path, "write -q -z 4k 2k")
    assert be64(path, 0x40000) & 0x00fffffffffffe00 == 0x50000
    poke(path, 0x40000 + 6, b"\x02")
    return path


def test_unaligned_preallocated_cluster_is_zeroed_not_freed(tmp_path):
    """iotest 271: `check -r all` freed the cluster but kept the L2 entry pointing at it
    (2 errors before the repair, 4 after); qemu-img makes the entry a zero cluster."""
    ours, theirs = twins(_ext_l2_unaligned(tmp_path, zero_it=True))
    done = img("check", "-r", "all", ours)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Repairing offset=50200: Preallocated cluster is not properly aligned" in done.stderr
    assert "1 leaked clusters\n    1 corruptions" in done.stdout
    assert qemu_img("check", "-r", "all", theirs).returncode == 0
    assert check(ours)[0] == 0
    for image in (ours, theirs):        # the backing file shows through again
        qemu_io(image, "read -q -P 0xff 0 4k", "read -q -P 0 4k 2k", "read -q -P 0xff 6k 122k")


def test_unaligned_data_cluster_is_left_as_qemu_leaves_it(tmp_path):
    """The same with data in the cluster: not repairable; afterwards qemu-img check finds
    on our copy what it finds on its own."""
    ours, theirs = twins(_ext_l2_unaligned(tmp_path, zero_it=False))
    done = img("check", "-r", "all", ours)
    assert done.returncode == 2
    assert "ERROR offset=50200: Data cluster is not properly aligned" in done.stderr
    assert qemu_img("check", "-r", "all", theirs, check=False).returncode == 2
    assert findings(ours) == findings(theirs)
    assert check(ours)[1]["corruptions"] == 1


def test_refcount_overflow_with_1_bit_refcounts_is_refused(tmp_path):
    """iotest 112: two references to a cluster with refcount_bits=1 cannot be counted;
    qemu-img reports it, points to amend and changes nothing (pyhv "repaired" it into
    3 errors)."""
    path = tmp_path / "r1.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", path, "64M")
    qemu_io(path, "write 0 64k")
    poke(path, 0x40008, struct.pack(">Q", 0x8000000000050000))   # a second reference
    before = path.read_bytes()
    ours, theirs = twins(path)
    done = img("check", "-r", "all", ours)
    theirs_done = qemu_img("check", "-r", "all", theirs, check=False)
    assert done.returncode == theirs_done.returncode == 2
    assert "ERROR: overflow cluster offset=0x50000" in done.stderr
    assert "Use qemu-img amend to increase the refcount entry width" in done.stderr
    assert "1 errors were found on the image." in done.stdout
    assert ours.read_bytes() == before
    assert findings(ours) == findings(theirs)


def test_create_refuses_a_size_qemu_cannot_open(tmp_path):
    """iotest 054: `create X 1E` succeeded and qemu-img could not open the result."""
    path = tmp_path / "big.qcow2"
    done = img("create", "-f", "qcow2", path, "1E")
    assert done.returncode == 1
    assert "The image size is too large for file format 'qcow2' (try using a larger " \
           "cluster size)" in done.stderr
    assert qemu_img("create", "-f", "qcow2", tmp_path / "q.qcow2", "1E",
                    check=False).returncode == 1
    assert not path.exists()
    assert img("create", "-f", "qcow2", "-o", "cluster_size=2M", path, "1E").returncode == 0
    assert check(path)[0] == 0          # with 2 MiB clusters qemu-img opens it


def test_open_refuses_a_size_past_the_l1_index_range(tmp_path):
    path = tmp_path / "h.qcow2"
    qemu_img("create", "-f", "qcow2", path, "4G")
    poke(path, 24, struct.pack(">Q", 1 << 60))
    done = img("check", path)
    assert done.returncode == 1 and "Image is too big" in done.stderr
    assert "Image is too big" in qemu_img("check", path, check=False).stderr


def test_repair_of_a_leak_and_a_copied_flag_reports_both(tmp_path):
    """iotest 138: a leaked cluster and a missing OFLAG_COPIED raised OverflowError in the
    repair; qemu-img fixes both and says so in its JSON."""
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", path, "64k")
    qemu_io(path, "write 0 64k")
    refblock = be64(path, be64(path, 48))
    poke(path, refblock, b"\x00\x02")                  # the header's refcount: 2
    l1 = be64(path, 40)
    poke(path, l1, struct.pack(">Q", be64(path, l1) & ~(1 << 63)))
    ours, theirs = twins(path)
    done = img("check", "-r", "all", "--output=json", ours)
    theirs_done = qemu_img("check", "-r", "all", "--output=json", theirs)
    assert done.returncode == 0, done.stderr
    assert "Repairing OFLAG_COPIED L2 cluster: l1_index=0" in done.stderr
    ours_json, theirs_json = json.loads(done.stdout), json.loads(theirs_done.stdout)
    assert ours_json["leaks-fixed"] == ours_json["corruptions-fixed"] == 1
    assert list(ours_json) == list(theirs_json)
    assert check(ours)[0] == 0
    assert ours.read_bytes() == theirs.read_bytes()


def test_resize_of_a_corrupt_image_is_refused(tmp_path):
    """qemu-img refuses to open an image marked corrupt read/write; pyhv resized it."""
    path = tmp_path / "k.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    poke(path, 72, struct.pack(">Q", 2))               # incompatible: corrupt bit
    before = path.read_bytes()
    done = img("resize", path, "2M")
    assert done.returncode == 1
    assert f"Could not open '{path}': qcow2: Image is corrupt; cannot be opened " \
           "read/write" in done.stderr
    assert path.read_bytes() == before
    # a repair may open it, and clears the bit when nothing is left to repair
    assert img("check", "-r", "all", path).returncode == 0
    assert not be64(path, 72) & 2
    assert img("resize", path, "2M").returncode == 0


def test_resize_past_the_l1_limit_is_refused(tmp_path):
    path = tmp_path / "g.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", path, "64M")
    done = img("resize", path, "1P")
    assert done.returncode == 1 and "Failed to grow the L1 table" in done.stderr
    assert check(path)[0] == 0
