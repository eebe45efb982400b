"""The host sockets of TCP flows: `HostSocket` and its edge-triggered `Poller` are in
Cython (`hvcore.nethost`), as the flows are (`hvcore.nettcp`): a short connection calls
into them a dozen times. Re-exported here for the flow table and the tests."""

from __future__ import annotations

from hvcore.nethost import (  # noqa: F401  (re-exported)
    ALL_EVENTS,
    END_EVENTS,
    READ_EVENTS,
    HostSocket,
    Poller,
)
