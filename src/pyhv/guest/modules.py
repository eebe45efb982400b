"""Kernel modules for the guest, chosen and ordered from the kernel package's modules.dep.

Debian's kernel packages ship no modules.dep (the installer runs depmod), so we run
`depmod -b` on the unpacked package once, then load each wanted module after its
dependencies, in the order modprobe would (modules.dep lists a module's dependencies
with the ones to load last first)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pyhv.errors import PyhvError

# What the default guest needs: PCI transport, disks, network, console, vsock, virtio-fs.
WANTED = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
          "vmw_vsock_virtio_transport", "virtiofs")


def modules_dir(root: Path) -> Path:
    dirs = sorted((root / "lib" / "modules").glob("*"))
    if not dirs:
        raise PyhvError(f"{root}: no lib/modules/<version> in the kernel package")
    return dirs[-1]


def ensure_depmod(root: Path) -> Path:
    """Return modules.dep, generating it with depmod in the unpacked tree if missing."""
    mdir = modules_dir(root)
    dep = mdir / "modules.dep"
    if not dep.exists():
        done = subprocess.run(["depmod", "-b", str(root), mdir.name], capture_output=True,
                              text=True)
        if done.returncode != 0 or not dep.exists():
            raise PyhvError(f"depmod failed on {root}: {done.stderr.strip() or 'no output'}")
    return dep


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """{relative .ko path: [dependency paths]} from modules.dep's text."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        module, _, rest = line.partition(":")
        deps[module.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    """kernel/drivers/virtio/virtio_pci.ko[.xz] -> virtio_pci (dashes normalised)."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def load_order(deps: dict[str, list[str]], wanted: tuple[str, ...] = WANTED) -> list[str]:
    """Module paths to insmod, dependencies first, each once."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise PyhvError(f"modules.dep has a dependency loop through {path}")
        visiting.add(path)
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise PyhvError(f"kernel package has no module {name} (built in or missing?)")
        visit(by_name[name])
    return order
