"""One virtqueue served by one thread: it sleeps on the queue's kick eventfd, takes every
chain the driver published, hands each to the device, returns them, and signals the call
eventfd when the driver asked to be told. The same eventfds carry kicks and interrupts for
vhost-user (from the frontend) and for pyhv's VMM (ioeventfd / irqfd)."""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from hvcore.virtio.queue import SplitQueue, VirtqueueError

log = logging.getLogger("pyhv.virtio")

# handle(head, readable, writable) -> bytes written into the writable buffers
Handler = Callable[[int, list, list], int]


class QueueWorker:
    """Serves `queue` with `handle` until `stop()`; a driver that breaks the ring stops
    the queue with one log line and a write to `err_fd` (vhost-user's error eventfd)."""

    def __init__(self, queue: SplitQueue, handle: Handler, kick_fd: int, call_fd: int | None,
                 err_fd: int | None = None, take: Callable[[], tuple | None] | None = None):
        self.queue, self.handle = queue, handle
        # the next chain for `handle` (a device may answer others in C first)
        self.take = take or queue.pop
        self.kick_fd, self.call_fd, self.err_fd = kick_fd, call_fd, err_fd
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"virtqueue-{queue.index}")

    def start(self) -> QueueWorker:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop after the chain in hand (its answer is returned first)."""
        os.eventfd_write(self.stop_fd, 1)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()
        os.close(self.stop_fd)

    def _run(self) -> None:
        poll = select.poll()
        poll.register(self.kick_fd, select.POLLIN)
        poll.register(self.stop_fd, select.POLLIN)
        try:
            while True:
                self._drain()
                ready = {fd for fd, _ev in poll.poll()}
                if self.stop_fd in ready:
                    return
                try:
                    os.eventfd_read(self.kick_fd)
                except BlockingIOError:
                    pass
        except VirtqueueError as e:
            self.error = str(e)
            log.error("pyhv: %s; the queue stops until the device is reset", e)
            if self.err_fd is not None:
                os.eventfd_write(self.err_fd, 1)

    def _drain(self) -> None:
        """Every waiting chain, with kicks off meanwhile; one interrupt at the end (if
        anything was answered and the driver wants it)."""
        q = self.queue
        while True:
            q.notifications(False)
            while (chain := self.take()) is not None:
                head, readable, writable = chain
                q.push(head, self.handle(head, readable, writable))
            q.notifications(True)
            if not q.has_chains():      # (one may have come before kicks were back on)
                break
        if self.call_fd is not None and q.interrupt_wanted():
            os.eventfd_write(self.call_fd, 1)
