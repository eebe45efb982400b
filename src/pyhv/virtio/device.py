"""What a virtio device gives a transport: its feature bits, config space, number of
queues and a request handler per queue. Transports add the ring features themselves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from hvcore.virtio.queue import SplitQueue
from pyhv.virtio.queues import Handler


class Device(ABC):
    features: int = 0                   # device-specific feature bits
    num_queues: int = 1
    max_queue_size: int = 1024          # (hvcore.virtio.queue.VQ_MAX_SIZE)
    # the frontend reads the config space from the device (vhost-user's CONFIG protocol
    # feature); QEMU's vhost-user-fs keeps the tag itself and warns when it is offered
    frontend_reads_config: bool = True

    @abstractmethod
    def config(self) -> bytes:
        """The device-specific configuration space."""

    @abstractmethod
    def handler(self, index: int) -> Handler:
        """handle(head, readable, writable) -> bytes written, for queue `index`."""

    def taker(self, index: int, queue: SplitQueue) -> Callable[[], tuple | None] | None:
        """A device that answers some chains in C gives the call that does so and returns
        the next chain for `handler` (or None); by default every chain is the handler's."""
        return None
