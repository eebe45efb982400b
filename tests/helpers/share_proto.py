"""Builds raw FUSE requests for feeding `FuseServer.handle` directly (no kernel involved)."""

from __future__ import annotations

import struct

from hvcore.fs import proto as fp

IN_HEADER = struct.Struct("=IIQQIIIHH")
OUT_HEADER = struct.Struct("=IiQ")


def request(opcode: int, body: bytes = b"", nodeid: int = 1, unique: int = 7,
            uid: int = 0, gid: int = 0, pid: int = 1, length: int | None = None) -> bytes:
    total = IN_HEADER.size + len(body)
    return IN_HEADER.pack(total if length is None else length, opcode, unique, nodeid, uid,
                          gid, pid, 0, 0) + body


def init_request(minor: int = 38, flags: int = 0xFFFFFFFF) -> bytes:
    return request(fp.INIT, struct.pack("=IIII", 7, minor, 1 << 20, flags) + bytes(48))


def reply(buffers: list) -> tuple[int, int, bytes]:
    """(error, unique, payload) of a reply; checks its header length."""
    data = b"".join(bytes(b) for b in buffers)
    length, error, unique = OUT_HEADER.unpack_from(data)
    assert length == len(data), (length, len(data))
    return error, unique, data[OUT_HEADER.size:]


def nodeid_of(entry_payload: bytes) -> int:
    return struct.unpack_from("=Q", entry_payload)[0]
