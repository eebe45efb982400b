"""The guest's network for `pyhv run`: pyhv's user-mode stack (`pyhv net serve --stream`)
in a child process (`children.Child`), attached to QEMU as `-netdev stream` +
virtio-net-pci."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pyhv.guest.children import Child


class NetworkService:
    """Context manager: starts the stack, yields the QEMU arguments that attach a NIC."""

    def __init__(self, publish: list[str]):
        self.publish = list(publish)
        self._dir = None
        self._child: Child | None = None

    def __enter__(self) -> list[str]:
        self._dir = tempfile.TemporaryDirectory(prefix="pyhv-net-")
        sock = Path(self._dir.name) / "net.sock"
        args = ["net", "serve", "--stream", str(sock)]
        for spec in self.publish:
            args += ["-p", spec]
        self._child = Child(args, b"pyhv net: ready", "network service")
        try:
            self._child.start()
        except BaseException:
            self.__exit__()
            raise
        return ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
                "-device", "virtio-net-pci,netdev=n0"]

    def __exit__(self, *exc) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
