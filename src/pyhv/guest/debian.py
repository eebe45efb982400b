"""Fetch and unpack Debian packages (guest kernel, busybox) into the user's cache.

Tests and the guest builder need real Debian binaries (the cloud kernel, busybox-static).
They come from the host's apt configuration with ``apt-get download``, so no root-owned
install happens and each package is downloaded and unpacked once per cache directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pyhv.cache import cache_dir
from pyhv.errors import PyhvError

__all__ = ["cache_dir", "debian_kernel", "fetch_deb", "unpack_deb"]

KERNEL_PACKAGE = "linux-image-cloud-amd64"

_updated = False  # apt-get update runs at most once per process


def _one_line(text: str) -> str:
    """Pick the most telling line of a tool's stderr (apt prints 'E: ...' for errors)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["no error output"])[-1]


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, turning 'not installed' into a one-line PyhvError."""
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise PyhvError(
            f"{argv[0]} not found: fetching Debian packages needs a Debian/Ubuntu host"
        ) from e


def _apt_update() -> None:
    """Refresh the package lists once, for hosts whose lists were never downloaded."""
    global _updated
    if _updated:
        return
    _updated = True
    r = _run(["apt-get", "update"])
    if r.returncode != 0:
        raise PyhvError(f"apt-get update failed: {_one_line(r.stderr)}")


def _depends(package: str) -> list[str] | None:
    """Direct 'Depends:' of a package, or None if apt knows no such package."""
    r = _run(["apt-cache", "depends", package])
    if r.returncode != 0 or not r.stdout.strip():
        return None
    deps = []
    for line in r.stdout.splitlines():
        key, _, value = line.strip().partition(": ")
        # '|Depends' marks alternatives and '<name>' a virtual package: neither is concrete.
        if key == "Depends" and value and not value.startswith("<"):
            deps.append(value.strip())
    return deps


def _unversioned(name: str) -> list[str]:
    """Name parts without the version parts: linux-image-6.1.0-56-cloud-amd64 -> linux,image,
    cloud,amd64, so a metapackage can be matched to the versioned package it pulls in."""
    return [p for p in name.split("-") if not p[:1].isdigit()]


def _resolve(package: str) -> str:
    """Follow a metapackage (linux-image-cloud-amd64) to the versioned package it depends on."""
    deps = _depends(package)
    if deps is None:
        _apt_update()
        deps = _depends(package)
    if deps is None:
        raise PyhvError(f"Debian package {package!r} is unknown to apt-cache (even after update)")
    for _ in range(4):  # metapackages may chain; a loop would be a broken archive
        concrete = [d for d in deps if d != package and _unversioned(d) == _unversioned(package)]
        if not concrete:
            return package
        package = concrete[0]
        deps = _depends(package) or []
    return package


def _cached_deb(debs: Path, package: str) -> Path | None:
    """The newest already-downloaded .deb of this exact package, if any."""
    found = [p for p in debs.glob(f"{package}_*.deb") if p.name.split("_", 1)[0] == package]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def fetch_deb(package: str) -> Path:
    """Download a Debian package (metapackages resolved) into the cache once; return the .deb."""
    concrete = _resolve(package)
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    cached = _cached_deb(debs, concrete)
    if cached is not None:
        return cached
    # Download into a private temp dir so a killed download never leaves a partial .deb.
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download.") as tmp:
        r = _run(["apt-get", "download", concrete], cwd=Path(tmp))
        if r.returncode != 0 and not _updated:
            _apt_update()  # stale lists name a version the mirror no longer has
            r = _run(["apt-get", "download", concrete], cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not got:
            raise PyhvError(f"apt-get download {concrete} failed: {_one_line(r.stderr)}")
        target = debs / got[0].name
        os.replace(got[0], target)
    return target


def unpack_deb(deb: Path) -> Path:
    """Extract a .deb (dpkg-deb -x) into the cache once; return the unpacked root directory."""
    deb = Path(deb)
    if not deb.is_file():
        raise PyhvError(f"{deb}: no such Debian package file")
    unpacked = cache_dir() / "unpacked"
    target = unpacked / deb.stem
    if target.is_dir():
        return target
    unpacked.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=unpacked, prefix=f".{deb.stem}."))
    try:
        r = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if r.returncode != 0:
            raise PyhvError(f"dpkg-deb -x {deb.name} failed: {_one_line(r.stderr)}")
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a concurrent unpack winning the race is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def debian_kernel() -> Path:
    """Return the bzImage (boot/vmlinuz-*) of Debian's cloud kernel, fetching it if needed."""
    root = unpack_deb(fetch_deb(KERNEL_PACKAGE))
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise PyhvError(f"{root}: package {KERNEL_PACKAGE} holds no boot/vmlinuz-* file")
    return kernels[-1]
