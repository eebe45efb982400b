"""One TCP flow between the guest and a host socket. The flow (state machine, segment
arrival and output, timers, buffers) is `hvcore.nettcp.TcpConn`, a Cython class: a short
connection runs its code a dozen times, and in Python it cost more user CPU per
connection than pasta spends in total. Its constants and `unwrap` are re-exported here
for the flow table (`pyhv.net.tcpnat`), the stack and the tests; the flow table keeps the
policy (limits, connect timeouts, idle sweep, TIME_WAIT expiry) and gives each flow its
`HostSocket` (`host_connected`)."""

from __future__ import annotations

from hvcore.nettcp import (  # noqa: F401  (re-exported)
    CLOSE_WAIT,
    CLOSED,
    CLOSING,
    CONNECTING,
    DELACK,
    DELACK_BYTES,
    ESTABLISHED,
    FIN_WAIT_1,
    FIN_WAIT_2,
    INIT_RTO,
    LAST_ACK,
    M32,
    MAX_RETRIES,
    MAX_RTO,
    MIN_ROOM,
    MIN_RTO,
    READ_CHUNK,
    STATES,
    SYN_RCVD,
    SYN_SENT,
    TIME_WAIT,
    WSCALE,
    TcpConn,
    unwrap,
)
from pyhv.net.hostsock import HostSocket


def host_connected(conn: TcpConn, sock, reading: bool = True) -> None:
    """`conn`'s host socket is connected (a flow opened from the host reads only once the
    guest has answered its SYN)."""
    conn.host = HostSocket(conn.nat.poller, sock, conn, conn.rcv_cap)
    conn.host.register(reading)
