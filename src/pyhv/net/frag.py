"""IPv4 fragment reassembly, bounded: at most `limit` datagrams in progress, each at most
64 KiB, each dropped after `timeout` seconds; overlapping fragments drop the datagram
(RFC 5722's rule for IPv6, applied here too: overlaps are only ever attacks)."""

from __future__ import annotations

import time

from hvcore.net.packet import checksum

MAX_DATAGRAM = 65535


class _Partial:
    __slots__ = ("data", "have", "total", "header", "born")

    def __init__(self, now: float):
        self.data = bytearray()
        self.have: list[tuple[int, int]] = []
        self.total = -1
        self.header = b""
        self.born = now


class Fragments:
    def __init__(self, limit: int = 64, timeout: float = 15.0):
        self.limit, self.timeout = limit, timeout
        self.partial: dict[tuple, _Partial] = {}
        self.dropped = 0

    def add(self, pkt) -> bytes | None:
        """Take one fragment (a parsed `Packet`); returns the whole datagram when complete."""
        now = time.monotonic()
        key = (pkt.src, pkt.dst, pkt.proto, pkt.ident)
        part = self.partial.get(key)
        if part is None:
            self._expire(now)
            if len(self.partial) >= self.limit:
                self.dropped += 1
                return None
            part = self.partial[key] = _Partial(now)
        start, n = pkt.frag_offset, pkt.payload_len
        end = start + n
        ihl = pkt.l4_offset - pkt.ip_offset
        if end + ihl > MAX_DATAGRAM or (pkt.more_fragments and n % 8) or \
                any(s < end and start < e for s, e in part.have):
            del self.partial[key]
            self.dropped += 1
            return None
        if len(part.data) < end:
            part.data.extend(bytes(end - len(part.data)))
        part.data[start:end] = pkt.payload
        part.have.append((start, end))
        if start == 0:
            part.header = bytes(pkt.ip_datagram[:ihl])
        if not pkt.more_fragments:
            part.total = end
        if part.total < 0 or not part.header or \
                sum(e - s for s, e in part.have) != part.total:
            return None
        del self.partial[key]
        header = bytearray(part.header)
        total = len(header) + part.total
        header[2:4] = total.to_bytes(2, "big")
        header[6:8] = b"\0\0"                       # no longer a fragment
        header[10:12] = b"\0\0"
        header[10:12] = checksum(header).to_bytes(2, "big")
        return bytes(header) + bytes(part.data[:part.total])

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self.partial.items() if now - p.born > self.timeout]:
            del self.partial[key]
            self.dropped += 1
