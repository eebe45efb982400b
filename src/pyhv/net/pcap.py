"""`--pcap FILE`: the guest's frames, both directions, as a classic pcap file (LINKTYPE
ETHERNET) that Wireshark and tcpdump read. virtio_net_hdr prefixes are stripped; frames
are recorded as sent (a 64 KiB GSO frame stays one record, as tcpdump on a TAP shows it)."""

from __future__ import annotations

import struct
import time

SNAPLEN = 65535 + 64


class PcapWriter:
    def __init__(self, path: str):
        self.f = open(path, "wb", buffering=1 << 20)   # noqa: SIM115 (closed by close())
        self.f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1))
        self.frames = 0

    def write(self, frames, vnet: bool) -> None:
        t = time.time()
        sec, usec = int(t), int((t % 1) * 1_000_000)
        skip = 10 if vnet else 0
        out = self.f.write
        for frame in frames:
            if type(frame) is tuple:
                frame = b"".join(frame)
            n = len(frame) - skip
            if n <= 0:
                continue
            out(struct.pack("<IIII", sec, usec, n, n))
            out(memoryview(frame)[skip:])
        self.frames += len(frames)

    def close(self) -> None:
        self.f.close()
