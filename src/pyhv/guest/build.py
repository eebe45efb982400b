"""`pyhv guest build`: the default guest, a Debian cloud kernel plus a busybox initramfs.

The result is cached content-addressed (a hash of the .deb files, the init scripts and
this builder's version) under the cache directory, so a second build is a lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pyhv.cache import cache_dir
from pyhv.errors import PyhvError
from pyhv.guest import initramfs as cpio
from pyhv.guest.debian import fetch_deb, unpack_deb
from pyhv.guest.modules import (
    WANTED,
    ensure_depmod,
    load_order,
    module_name,
    modules_dir,
    parse_modules_dep,
)

BUILDER_VERSION = "1"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_release: str
    cached: bool                 # True when an earlier build was reused


def _say(message: str) -> None:
    print(f"pyhv: {message}", file=sys.stderr, flush=True)


def _pick_debs(from_debs: list[Path], progress: Callable[[str], None]) -> tuple[Path, Path]:
    kernel = next((d for d in from_debs if d.name.startswith("linux-image-")), None)
    busybox = next((d for d in from_debs if d.name.startswith("busybox")), None)
    for d in from_debs:
        if d not in (kernel, busybox):
            raise PyhvError(f"{d}: not a linux-image-* or busybox* package")
        if not d.is_file():
            raise PyhvError(f"{d}: no such file")
    if kernel is None:
        progress(f"package {KERNEL_PACKAGE} (apt-get download unless cached)")
        kernel = fetch_deb(KERNEL_PACKAGE)
    if busybox is None:
        progress(f"package {BUSYBOX_PACKAGE} (apt-get download unless cached)")
        busybox = fetch_deb(BUSYBOX_PACKAGE)
    return kernel, busybox


def _script(name: str) -> bytes:
    return resources.files("pyhv.guest").joinpath(name).read_bytes()


def recipe_digest() -> str:
    """What this pyhv puts into a guest besides the packages: builder, modules, scripts."""
    h = hashlib.sha256(f"pyhv-guest {BUILDER_VERSION} {WANTED}".encode())
    for name in ("init.sh", "udhcpc.sh"):
        h.update(_script(name))
    return h.hexdigest()


def _cache_key(debs: tuple[Path, Path]) -> str:
    h = hashlib.sha256(recipe_digest().encode())
    for deb in debs:
        with open(deb, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:32]


def cached_guest() -> GuestImage | None:
    """The newest guest already built, found without apt or network: `pyhv run` uses it,
    and `pyhv guest build` is how a newer Debian kernel is picked up."""
    recipe = recipe_digest()
    found = []
    for manifest in (cache_dir() / "guest").glob("*/manifest.json"):
        info = json.loads(manifest.read_text())
        if info.get("recipe") == recipe:      # built by this pyhv's init and module list
            found.append((manifest.stat().st_mtime, manifest.parent, info["kernel_release"]))
    if not found:
        return None
    _, home, release = max(found)
    return GuestImage(home / "vmlinuz", home / "initrd.img", release, cached=True)


def default_guest(progress: Callable[[str], None] = _say) -> GuestImage:
    """The cached guest, or a new build on first use."""
    return cached_guest() or build_guest(progress=progress)


def build_guest(output: Path | None = None, from_debs: list[Path] | None = None,
                progress: Callable[[str], None] = _say) -> GuestImage:
    """Build (or reuse) the default guest; copy kernel and initrd to `output` if given."""
    debs = _pick_debs([Path(d) for d in from_debs or []], progress)
    key = _cache_key(debs)
    home = cache_dir() / "guest" / key
    manifest = home / "manifest.json"
    if manifest.exists():
        image = GuestImage(home / "vmlinuz", home / "initrd.img",
                           json.loads(manifest.read_text())["kernel_release"], cached=True)
        progress(f"guest {key[:12]} is cached ({home})")
    else:
        image = _build(home, debs, progress)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.kernel, output / "vmlinuz")
        shutil.copyfile(image.initrd, output / "initrd.img")
        image = GuestImage(output / "vmlinuz", output / "initrd.img", image.kernel_release,
                           image.cached)
    return image


def _build(home: Path, debs: tuple[Path, Path], progress: Callable[[str], None]) -> GuestImage:
    kernel_root = unpack_deb(debs[0])
    busybox_root = unpack_deb(debs[1])
    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    busybox = busybox_root / "bin" / "busybox"
    if not vmlinuz or not busybox.is_file():
        raise PyhvError("the packages hold no boot/vmlinuz-* or bin/busybox")
    mdir = modules_dir(kernel_root)
    progress(f"choosing modules from {mdir.name}/modules.dep")
    deps = load_order(_deps(kernel_root))
    names = [module_name(p) + ".ko" for p in deps]
    entries = [cpio.directory(d) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc",
                                            "etc/pyhv", "lib", "lib/modules", "proc", "sys",
                                            "dev", "tmp", "run", "mnt", "root")]
    entries += [
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755),
        cpio.file("init", _script("init.sh"), 0o755),
        cpio.file("etc/pyhv/udhcpc.sh", _script("udhcpc.sh"), 0o755),
        cpio.file("etc/pyhv/modules", "".join(f"{n}\n" for n in names).encode()),
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        cpio.file("etc/group", b"root:x:0:\n"),
    ]
    entries += [cpio.file(f"lib/modules/{name}", (mdir / path).read_bytes())
                for name, path in zip(names, deps, strict=True)]
    tmp = home.with_name(home.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    progress(f"writing initramfs ({len(names)} modules, busybox)")
    cpio.write_initramfs(tmp / "initrd.img", entries)
    shutil.copyfile(vmlinuz[-1], tmp / "vmlinuz")
    (tmp / "manifest.json").write_text(json.dumps({
        "kernel_release": mdir.name, "modules": names,
        "debs": [d.name for d in debs], "builder": BUILDER_VERSION,
        "recipe": recipe_digest()}, indent=2) + "\n")
    try:
        os.rename(tmp, home)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)   # a concurrent build finished first
        if not home.is_dir():
            raise
    progress(f"guest ready: {home}")
    return GuestImage(home / "vmlinuz", home / "initrd.img", mdir.name, cached=False)


def _deps(kernel_root: Path) -> dict[str, list[str]]:
    return parse_modules_dep(ensure_depmod(kernel_root).read_text())
