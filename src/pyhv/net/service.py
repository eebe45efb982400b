"""`pyhv net serve`: one stack on one frame port, with DNS, port forwards, the control
socket and pcap, on uvloop until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

from pyhv.net.config import Forward, NetConfig
from pyhv.net.ports import FramePort

# Collections of the youngest generation every this many container allocations (Python's
# default is 700): a short connection allocates dozens, and its flow state is freed by
# reference counting, not by the collector (flows break their own cycles when they end).
GC_GEN0 = 20000


class NetService:
    def __init__(self, cfg: NetConfig, port: FramePort, forwards: list[Forward] = (),
                 control: str | None = None, pcap: str | None = None):
        self.cfg, self.port = cfg, port
        self.initial_forwards = list(forwards)
        self.control_path, self.pcap_path = control, pcap
        self.stack = self.dns = self.forwards = self.control = self.pcap = None

    async def start(self) -> None:
        from pyhv.net.control import ControlServer
        from pyhv.net.dns import Dns
        from pyhv.net.forward import Forwards
        from pyhv.net.pcap import PcapWriter
        from pyhv.net.stack import Stack

        self.pcap = PcapWriter(self.pcap_path) if self.pcap_path else None
        self.stack = Stack(self.cfg, self.port, self.pcap)
        self.dns = Dns(self.cfg)
        self.stack.dns_addr, self.stack.dns_tcp_addr = await self.dns.start()
        await self.stack.start()
        self.forwards = Forwards(self.stack)
        for fwd in self.initial_forwards:
            await self.forwards.add(fwd)
        if self.control_path:
            self.control = ControlServer(self.control_path, self.forwards, self.stack)
            await self.control.start()

    def close(self) -> None:
        for part in (self.control, self.forwards, self.dns, self.stack, self.pcap):
            if part is not None:
                part.close()

    async def serve(self, ready=None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        gc.freeze()                  # what start() made lives as long as the service
        gc.set_threshold(GC_GEN0, 20, 20)
        try:
            if ready is not None:
                ready()
            await stop.wait()
        finally:
            self.close()


def run(service: NetService, ready=None) -> None:
    """Run the service on uvloop (asyncio's own loop when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(service.serve(ready))
        return
    if sys.version_info >= (3, 12):
        uvloop.run(service.serve(ready))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(service.serve(ready))
