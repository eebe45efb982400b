"""hvcore.net.busypoll.BusyPoll: the adaptive window (KVM halt-polling's rules) and the poll
itself on real descriptors."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from hvcore.net.busypoll import BusyPoll
from pyhv.errors import PyhvError
from pyhv.net.config import NetConfig
from pyhv.net.ports import DgramPort, StreamPort
from tests.helpers.aio import settle

US = 1000


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_window_grows_from_10us_doubling_to_the_cap_and_shrinks_to_zero(pipe):
    b = BusyPoll([pipe[0]], 50 * US)
    assert b.window_ns == 0                          # an idle stack does not poll
    seen = []
    for _ in range(5):
        b.adapt(20 * US)                             # woken soon after: poll longer
        seen.append(b.window_ns // US)
    assert seen == [10, 20, 40, 50, 50]
    b.adapt(51 * US)                                 # slept longer than the cap: less
    assert b.window_ns == 25 * US
    b.adapt(10**9)
    assert b.window_ns == 12500
    b.adapt(10**9)                                   # below 10 us: off
    assert b.window_ns == 0


def test_a_poll_with_no_window_returns_at_once_and_learns_from_the_sleep(pipe):
    b = BusyPoll([pipe[0]], 10**9)                   # (a 1 s cap: any real sleep is short)
    assert b.spin() is False and b.polls == 0        # window 0: no poll at all
    b.woke()                                         # the loop slept < 1 s: grow
    assert b.window_ns == 10 * US
    b.woke()                                         # no sleep since: nothing learnt
    assert b.window_ns == 10 * US


def test_a_poll_finds_a_descriptor_made_ready_meanwhile(pipe):
    r, w = pipe
    b = BusyPoll([r], 10**9)
    while b.window_ns < 10**9:
        b.adapt(0)                                   # grown to a 1 s window
    timer = threading.Timer(0.02, os.write, (w, b"x"))
    timer.start()
    try:
        assert b.spin() is True                      # found it before the window ended
    finally:
        timer.join()
    assert (b.polls, b.caught) == (1, 1)
    b.woke()
    assert b.window_ns == 10**9                      # it did not sleep: unchanged


def test_a_fruitless_poll_ends_with_its_window(pipe):
    b = BusyPoll([pipe[0], pipe[0]], 50 * US)
    b.adapt(0)
    assert b.spin() is False
    assert (b.polls, b.caught) == (1, 0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="1..4"):
        BusyPoll([], 1000)
    with pytest.raises(ValueError, match="1..4"):
        BusyPoll([0, 1, 2, 3, 4], 1000)
    with pytest.raises(ValueError, match="negative"):
        BusyPoll([0], -1)
    with pytest.raises(PyhvError, match="busy-poll"):
        NetConfig(busy_poll_us=-1)
    with pytest.raises(PyhvError, match="busy-poll"):
        NetConfig(busy_poll_us=5000)


def test_an_empty_slot_is_skipped_and_slots_are_bounded(pipe):
    r, w = pipe
    b = BusyPoll([-1, r], 10**9)
    b.adapt(0)
    os.write(w, b"x")
    assert b.spin() is True                          # slot 1 found; slot 0 ignored
    b.set_fd(1, -1)
    assert b.descriptors() == [-1, -1]
    with pytest.raises(IndexError):
        b.set_fd(2, r)


def test_stream_and_dgram_ports_put_their_socket_in_slot_0(tmp_path):
    """A stream port's descriptor is its peer's, while one is connected; a datagram
    port's is its socket."""
    async def body():
        stream = StreamPort(str(tmp_path / "s"))
        busy = BusyPoll([-1, -1], 50 * US)
        stream.poll_with(busy)
        await stream.start(lambda frames: None)
        peer = socket.socket(socket.AF_UNIX)
        peer.connect(str(tmp_path / "s"))
        await settle(lambda: busy.descriptors()[0] >= 0, timeout=2.0)
        mine = stream.peer.transport.get_extra_info("socket").fileno()
        assert busy.descriptors()[0] == mine
        peer.close()
        await settle(lambda: busy.descriptors()[0] < 0, timeout=2.0)
        assert busy.descriptors()[0] == -1
        stream.close()

        dgram = DgramPort(str(tmp_path / "d"))
        dgram.poll_with(busy)
        assert busy.descriptors()[0] == dgram.sock.fileno()
        dgram.close()

    asyncio.run(body())
