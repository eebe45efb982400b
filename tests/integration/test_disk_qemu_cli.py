"""`pyhv img` started as `qemu-img` (the iotests' wrapper) against the real qemu-img on
the same command lines: the same stdout, stderr and exit status, byte for byte. Each twin
runs in a directory of its own with the same relative file names."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.disk_qemu import qemu_img, qemu_io
from tests.helpers.iotests import ROOT, wrapper

QEMU_IMG = "/usr/bin/qemu-img"


@pytest.fixture
def twins(tmp_path):
    """run(*args) -> (ours, theirs): the same qemu-img command line in two directories."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ours_prog = str(wrapper(bindir))
    dirs = tmp_path / "ours", tmp_path / "theirs"
    for d in dirs:
        d.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))

    def run(*args, setup=None):
        out = []
        for prog, d in zip((ours_prog, QEMU_IMG), dirs, strict=True):
            if setup:
                setup(d)
            out.append(subprocess.run([prog, *map(str, args)], cwd=d, env=env,
                                      capture_output=True, text=True, timeout=120))
        return out

    run.dirs = dirs
    return run


def same(ours, theirs):
    assert (ours.returncode, ours.stdout, ours.stderr) == \
        (theirs.returncode, theirs.stdout, theirs.stderr)


def test_errors_carry_the_program_name(tmp_path, twins):
    ours, theirs = twins("info", "missing.qcow2")
    same(ours, theirs)
    assert ours.stderr.startswith("qemu-img: Could not open 'missing.qcow2': ")
    # as `pyhv img` (python -m pyhv): the name stays pyhv
    done = subprocess.run([sys.executable, "-m", "pyhv", "img", "info", "missing.qcow2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == ours.stderr.replace("qemu-img:", "pyhv:", 1)


def test_pyhv_img_console_script_names_itself(tmp_path):
    script = tmp_path / "pyhv-img"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom pyhv.disk.cli import main\n"
                      "sys.exit(main())\n")
    script.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    done = subprocess.run([str(script), "create", "-f", "qcow2", "x.qcow2", "1x"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("pyhv-img: Invalid image size specified.")
    assert "\npyhv-img: kilobytes" in done.stderr


@pytest.mark.parametrize("args", [
    # options and sizes after the file name (getopt permutes)
    ("create", "-f", "qcow2", "base.qcow2", "1M"),
    ("create", "-f", "qcow2", "a.qcow2", "-o", "cluster_size=4k", "2M", "-q"),
    ("create", "-f", "qcow2", "a.qcow2", "--", "1M"),
    # argument errors: exit 1 and qemu-img's texts
    (), ("frob",), ("create",), ("create", "-z", "a"), ("create", "-f"),
    ("create", "-f", "qcow2", "a.qcow2", "1M", "extra"), ("info",), ("info", "a", "b"),
    ("info", "--o=json", "a"), ("info", "--backing-chain=x", "a"), ("info", "--output"),
    ("info", "--output=xml", "a"), ("compare", "a"), ("convert", "a"), ("resize",),
    ("resize", "a"), ("check", "-r", "foo", "a"), ("snapshot", "-l", "-c", "x", "a"),
    ("rebase", "a"), ("convert", "-m", "0", "a", "b"), ("check", "-T", "foo", "a"),
    ("bench", "-c", "x", "a"), ("bench", "-d", "x", "a"),
    # numbers: hex, suffixes, fractions, the 64-bit range
    ("create", "-f", "qcow2", "-o", "cluster_size=0x10000", "a.qcow2", "0x10000"),
    ("create", "-f", "raw", "a.raw", "1.5M"), ("create", "-f", "raw", "a.raw", "1.5"),
    ("create", "-f", "raw", "a.raw", "1GiB"), ("create", "-f", "raw", "a.raw", "9E"),
    ("create", "-f", "raw", "a.raw", "0x1k"), ("create", "-f", "raw", "a.raw", "+5"),
    ("create", "-f", "qcow2", "-o", "refcount_bits=010", "a.qcow2", "1M"),
    ("create", "-f", "qcow2", "-o", "refcount_bits=0x1z", "a.qcow2", "1M"),
    ("create", "-f", "qcow2", "-o", "cluster_size=64x", "a.qcow2", "1M"),
])
def test_command_lines_as_qemu_img(twins, args):
    same(*twins(*args))


@pytest.mark.parametrize("args", [
    ("-f", "qcow2", "a.qcow2", "1M"),
    ("-f", "raw", "a.raw", "1G"),
    ("-f", "raw", "-o", "preallocation=off,nocow=off,extent_size_hint=0", "a.raw", "1M"),
    ("-f", "qcow2", "-o", "compat=0.10,cluster_size=4k,preallocation=metadata", "a", "1G"),
    ("-f", "qcow2", "-o", "compat=v3,extended_l2=on,compression_type=zstd", "a", "1G"),
    ("-f", "qcow2", "-o", "lazy_refcounts,refcount_bits=0x8,size=1.5M", "a"),
    ("-f", "qcow2", "-o", "nocow=on,extent_size_hint=1M", "-o", "preallocation=falloc",
     "a", "64M"),
    ("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a"),
    ("-f", "qcow2", "-b", "base.qcow2", "a", "-F", "raw", "6G"),
    ("-f", "qcow2", "-u", "-o", "backing_file=b,,x,backing_fmt=raw", "a", "1M"),
    ("-q", "-f", "qcow2", "a", "1M"),
    # errors before and after the Formatting line
    ("-f", "qcow2", "-b", "base.qcow2", "a"), ("-f", "qcow2", "-b", "nope", "-F", "raw", "a"),
    ("-f", "qcow2", "-u", "-b", "nope", "a", "1M"), ("-f", "qcow2", "-F", "raw", "a", "1M"),
    ("-f", "qcow2", "-o", "size=1M", "a", "1M"), ("-f", "qcow2", "a"), ("-f", "foo", "a", "1M"),
    ("-f", "raw", "-b", "x", "a", "1M"), ("-f", "qcow2", "-o", "foo=1", "a", "1M"),
    ("-f", "qcow2", "-o", ",cluster_size=4k", "a", "1M"),
    ("-f", "qcow2", "-o", "compat=0.9", "a", "1M"), ("-f", "qcow2", "-o", "cluster_size=1000",
                                                    "a", "1M"),
    ("-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "a", "1M"),
    ("-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", "a", "1M"),
    ("-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "a", "1M"),
    ("-f", "qcow2", "-o", "compression_type=lz4", "a", "1M"),
    ("-f", "qcow2", "-o", "preallocation=xx", "a", "1M"), ("-f", "qcow2", "a", "1E"),
    ("-f", "qcow2", "-o", "encryption=on", "a", "1M"),
    ("-f", "qcow2", "--object", "secret,id=s0,data=1", "-o", "encryption=on,encrypt.key-secret=s0",
     "a", "1M"),
])
def test_create_prints_the_formatting_line_as_qemu_img(twins, args):
    def base(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "2M")
    ours, theirs = twins("create", *args, setup=base)
    same(ours, theirs)
    if theirs.returncode == 0 and "-q" not in args:
        assert theirs.stdout.startswith("Formatting 'a")
    if ours.returncode == 0:    # qemu-img finds in ours what it finds in its own
        checked = [qemu_img("check", d / "a", check=False) for d in twins.dirs]
        assert checked[0].returncode == checked[1].returncode
        assert checked[0].stdout.split("\n")[0] == checked[1].stdout.split("\n")[0]


def _set_incompatible(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", bits))


@pytest.mark.parametrize("change", ["version-7", "feature-63", "features-61-63-named",
                                    "l1-too-small", "too-big", "not-qcow2"])
def test_open_errors_read_as_qemu_img(twins, change):
    def damage(d: Path):
        path = d / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, "64M")
        with open(path, "r+b") as f:
            if change == "version-7":
                f.seek(4)
                f.write(struct.pack(">I", 7))
            elif change == "l1-too-small":
                f.seek(36)
                f.write(struct.pack(">I", 0))
            elif change == "too-big":
                f.seek(24)
                f.write(struct.pack(">Q", 1 << 62))
            elif change == "not-qcow2":
                f.write(b"QFI\x00")
                f.truncate(256 << 10)
        if change.startswith("feature"):
            _set_incompatible(path, (1 << 63) | (7 << 61 if "61" in change else 0))
        if change == "features-61-63-named":        # a short feature table names bit 62
            ext = b"\x00\x3eTest feature"
            with open(path, "r+b") as f:
                f.seek(112)
                f.write(struct.pack(">II", 0x6803F857, len(ext)) + ext + bytes(8))
    for args in (("info", "t.qcow2"), ("check", "t.qcow2"), ("map", "-f", "qcow2", "t.qcow2")):
        same(*twins(*args, setup=damage))


def test_map_json_names_the_host_of_allocated_zero_clusters(twins):
    def image(d: Path):
        path = d / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, "4M")
        qemu_io(path, "write -P 1 0 192k", "write -z 64k 64k", "write -z 1M 64k",
                "write -P 2 2M 64k", "write -z 2M 64k")
    same(*twins("map", "--output=json", "t.qcow2", setup=image))


@pytest.mark.parametrize("case", ["tail-differs", "head-differs", "same-data"])
def test_compare_warns_of_the_size_mismatch_where_qemu_img_does(twins, case):
    def images(d: Path):
        a, b = d / "a.qcow2", d / "b.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", a, "4M")
        qemu_img("create", "-q", "-f", "qcow2", b, "6M")
        qemu_io(a, "write -P 3 1M 64k")
        qemu_io(b, "write -P 3 1M 64k")
        if case == "tail-differs":
            qemu_io(b, "write -P 4 5M 4k")
        elif case == "head-differs":
            qemu_io(b, "write -P 4 0 4k")
    same(*twins("compare", "a.qcow2", "b.qcow2", setup=images))


def test_check_repairs_a_dirty_lazy_refcounts_image_as_qemu_img(twins):
    def dirty(d: Path):
        path = d / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M")
        qemu_io(path, "write -P 5 0 512")
        with open(path, "r+b") as f:      # dirty bit, and the data cluster's refcount lost
            f.seek(72)
            f.write(struct.pack(">Q", 1))
            f.seek(0x20000 + 2 * 5)
            f.write(b"\x00\x00")
    for args in (("check", "t.qcow2"), ("check", "-r", "all", "t.qcow2")):
        same(*twins(*args, setup=dirty))
    for d in twins.dirs:
        assert qemu_img("check", d / "t.qcow2", check=False).returncode == 0


def test_convert_progress_steps_as_qemu_img(twins):
    def image(d: Path):
        path = d / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, "128M")
        for at in ("0", "2M", "4M", "32M"):
            qemu_io(path, f"write {at} 1M")
    same(*twins("convert", "-p", "-O", "qcow2", "-f", "qcow2", "t.qcow2", "o.qcow2",
                setup=image))


@pytest.mark.parametrize("how", [("-B", "base.qcow2", "-F", "qcow2"),
                                 ("-o", "backing_file=base.qcow2,backing_fmt=qcow2"),
                                 ("-c", "-B", "base.qcow2", "-o", "backing_fmt=qcow2"),
                                 ("-B", "base.qcow2")])
def test_convert_onto_a_backing_file_copies_only_the_top(twins, how):
    """qemu-img convert -B: what the source's top image does not hold stays unallocated
    in the target (its backing file holds it); the top's zero clusters stay zero."""
    def chain(d: Path):
        base, top = d / "base.qcow2", d / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "8M")
        qemu_io(base, "write -P 1 0 8M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        qemu_io(top, "write -P 2 1M 128k", "write -z 3M 64k", "write -P 3 5M 4k",
                "write -P 0 6M 192k")          # zero data must hide the backing too
    same(*twins("convert", "-O", "qcow2", *how, "top.qcow2", "out.qcow2", setup=chain))
    if "-F" in how or "-o" in how[:1]:
        maps = [qemu_img("map", "--output=json", d / "out.qcow2").stdout for d in twins.dirs]
        assert maps[0].replace(str(twins.dirs[0]), "") == \
            maps[1].replace(str(twins.dirs[1]), "")
        for d in twins.dirs:
            assert qemu_img("compare", d / "top.qcow2", d / "out.qcow2").returncode == 0


def test_rebase_unsafe_needs_the_backing_format(twins):
    def chain(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
        qemu_img("create", "-q", "-f", "qcow2", d / "top.qcow2", "1M")
    same(*twins("rebase", "-u", "-b", "base.qcow2", "top.qcow2", setup=chain))


@pytest.mark.parametrize("new", ["", "new.qcow2"])
def test_rebase_past_the_old_backing_end_writes_zero_clusters(twins, new):
    """Where the old backing file has ended, qemu-img rebase writes zero clusters, not
    zero-filled data clusters (iotest 252)."""
    def chain(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "256k")
        qemu_io(d / "base.qcow2", "write -P 1 0 256k")
        qemu_img("create", "-q", "-f", "qcow2", d / "new.qcow2", "384k")
        qemu_io(d / "new.qcow2", "write -P 2 0 384k")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 d / "top.qcow2", "384k")
    args = ("-b", new, *(("-F", "qcow2") if new else ()), "top.qcow2")
    same(*twins("rebase", *args, setup=chain))
    maps = [qemu_img("map", "--output=json", d / "top.qcow2").stdout for d in twins.dirs]
    assert maps[0].replace(str(twins.dirs[0]), "") == maps[1].replace(str(twins.dirs[1]), "")


def _undated(text: str) -> str:
    import re
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", text)


@pytest.mark.parametrize("options", ["", "compat=0.10", "cluster_size=4k,refcount_bits=4",
                                     "extended_l2=on"])
def test_internal_snapshots_create_apply_delete_as_qemu_img(twins, options):
    """The same sequence of snapshot commands and guest writes on twins made by pyhv img
    and qemu-img: the same outputs, the same check results (image end offset included),
    the same map, the same guest data."""
    steps = [("snapshot", "-c", "one"), ("write -P 2 0 96k", "write -z 192k 64k"),
             ("snapshot", "-c", "two"), ("write -P 3 64k 64k",), ("snapshot", "-l"),
             ("snapshot", "-a", "one"), ("check",), ("snapshot", "-d", "1"),
             ("snapshot", "-d", "one"), ("check",),
             ("snapshot", "-a", "two"), ("snapshot", "-d", "nope"), ("snapshot", "-a", "9"),
             ("snapshot", "-c", "one"), ("snapshot", "-l"), ("check",),
             ("map", "--output=json")]

    def image(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []),
                 d / "t.qcow2", "1M")
        qemu_io(d / "t.qcow2", "write -P 1 0 256k", "write -P 4 768k 64k")
    for d in twins.dirs:
        image(d)
    for step in steps:
        if step[0].startswith("write"):
            for d in twins.dirs:
                qemu_io(d / "t.qcow2", *step)
            continue
        ours, theirs = twins(*step, "t.qcow2")
        assert (ours.returncode, _undated(ours.stdout), ours.stderr) == \
            (theirs.returncode, _undated(theirs.stdout), theirs.stderr), step
    for d in twins.dirs:
        qemu_io(d / "t.qcow2", "read -P 2 0 96k", "read -P 1 96k 96k", "read -P 0 192k 64k",
                "read -P 4 768k 64k")


@pytest.mark.parametrize("target", ["qcow2", "raw"])
def test_convert_into_an_existing_target(twins, target):
    """convert -n: no new target; where the source holds nothing the target reads zero
    afterwards; a smaller target is refused (iotest 063)."""
    def images(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "s.qcow2", "1M")
        qemu_io(d / "s.qcow2", "write -P 1 0 256k", "write -z 512k 64k")
        qemu_img("create", "-q", "-f", target, d / "t", "1M")
        qemu_io(d / "t", "write -P 9 0 1M", fmt=target)
        qemu_img("create", "-q", "-f", target, d / "small", "512k")
    same(*twins("convert", "-n", "-O", target, "s.qcow2", "t", setup=images))
    for d in twins.dirs:
        assert qemu_img("compare", "-F", target, d / "s.qcow2", d / "t").returncode == 0
    ours, theirs = twins("convert", "-n", "-O", target, "s.qcow2", "small", setup=images)
    assert ours.returncode == theirs.returncode == 1


@pytest.mark.parametrize("how", [(), ("-b", "mid.qcow2"), ("-b", "base.qcow2"), ("-d",),
                                 ("-b", "nope.qcow2")])
def test_commit_through_the_chain_as_qemu_img(twins, how):
    """commit (the top emptied, its unaligned last cluster too), commit -b BASE (every
    image above BASE into it, nothing emptied) and -d, against qemu-img (iotest 097)."""
    size = 2 * 1024 * 1024 + 512

    def chain(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", size)
        for lower, upper in (("base", "mid"), ("mid", "top")):
            qemu_img("create", "-q", "-f", "qcow2", "-b", f"{lower}.qcow2", "-F", "qcow2",
                     d / f"{upper}.qcow2", size)
        qemu_io(d / "base.qcow2", "write -P 1 0 192k")
        qemu_io(d / "mid.qcow2", "write -P 2 64k 128k")
        qemu_io(d / "top.qcow2", "write -P 3 128k 64k", f"write -P 4 {size - 512} 512")
    same(*twins("commit", *how, "top.qcow2", setup=chain))
    for name in ("base", "mid", "top"):
        maps = [qemu_img("map", d / f"{name}.qcow2").stdout.replace(str(d), "")
                for d in twins.dirs]
        assert maps[0] == maps[1], name


@pytest.mark.parametrize("args", [
    ("info", "--backing-chain", "--image-opts",
     "driver=qcow2,file.driver=file,file.filename=top.qcow2"),
    ("check", "--image-opts", "driver=qcow2,file.filename=top.qcow2"),
    ("compare", "--image-opts", "driver=qcow2,file.filename=top.qcow2",
     "driver=qcow2,file.filename=base.qcow2"),
])
def test_image_opts_name_a_format_over_a_file(twins, args):
    def chain(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 d / "top.qcow2")
    same(*twins(*args, setup=chain))


@pytest.mark.parametrize("args", [
    ("-O", "qcow2", "if=in.raw", "of=out", "bs=5"), ("if=in.raw", "of=out"),
    ("if=in.raw", "of=out", "bs=1k", "skip=2", "count=3"), ("if=in.raw", "of=out", "count=0"),
    ("if=in.raw", "of=out", "bs=x"), ("if=in.raw", "of=out", "bs=0"), ("if=in.raw",),
    ("if=in.raw", "of=out", "foo=1"), ("-f", "raw", "if=in.raw", "of=out", "skip=9999"),
])
def test_dd_as_qemu_img(twins, args):
    def source(d: Path):
        (d / "in.raw").write_bytes(bytes(range(256)) * 4096)
    ours, theirs = twins("dd", *args, setup=source)
    same(ours, theirs)
    if theirs.returncode == 0:
        fmt = "qcow2" if "qcow2" in args else "raw"
        outs = [twins.dirs[0] / "out", twins.dirs[1] / "out"]
        assert qemu_img("compare", "-f", fmt, "-F", fmt, *outs).returncode == 0
        sizes = [qemu_img("info", "--output=json", "-f", fmt, o).stdout for o in outs]
        assert '"virtual-size"' in sizes[0]
        assert sizes[0].split('"virtual-size": ')[1].split(",")[0] == \
            sizes[1].split('"virtual-size": ')[1].split(",")[0]


def test_snapshot_refused_when_refcounts_would_overflow(twins):
    """refcount_bits=1 cannot count a second reference: refused, as qemu-img does, with
    at most the new L1 copy leaked."""
    def image(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", d / "t.qcow2", "1M")
        qemu_io(d / "t.qcow2", "write -P 1 0 64k")
    same(*twins("snapshot", "-c", "s", "t.qcow2", setup=image))
    checks = [qemu_img("check", d / "t.qcow2", check=False) for d in twins.dirs]
    assert checks[0].returncode == checks[1].returncode == 3
    assert checks[0].stdout == checks[1].stdout


def test_shrink_drops_the_clusters_past_the_end_as_qemu_img(twins):
    """resize --shrink of a used tail (iotest 292): the cluster the new end falls in keeps
    its data, the ones past it go; growing again reads zeroes there."""
    def chain(d: Path):
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
        qemu_io(d / "base.qcow2", "write -P 17 0 1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 d / "t.qcow2")
        qemu_io(d / "t.qcow2", "write -P 34 0 1M")
    same(*twins("resize", "--shrink", "t.qcow2", "520k", setup=chain))
    same(*twins("resize", "t.qcow2", "567k"))
    for d in twins.dirs:
        qemu_io(d / "t.qcow2", "read -P 34 0 520k", "read -P 0 520k 47k")
    same(*twins("map", "t.qcow2"))
    same(*twins("check", "t.qcow2"))
