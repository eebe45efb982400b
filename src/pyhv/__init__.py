"""pyhv: a micro-VM runtime on KVM with a Cython core.

Heavy modules (the Cython core) load lazily so `pyhv --version` and the pure-Python
parts work before anything touches /dev/kvm.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Machine", "PyhvError", "__version__"]


def __getattr__(name: str):
    if name == "Machine":
        from pyhv.machine.machine import Machine

        return Machine
    if name == "PyhvError":
        from pyhv.errors import PyhvError

        return PyhvError
    raise AttributeError(name)
