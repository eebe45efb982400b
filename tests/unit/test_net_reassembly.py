"""TCP out-of-order reassembly: the Cython ring against its pure-Python twin, same cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcore.net.packet import Reassembly
from tests.helpers.net_reassembly_ref import ReassemblyRef

IMPLS = [Reassembly, ReassemblyRef]
BASE = (1 << 32) - 100          # unwrapped sequence numbers across the 32-bit wrap


@pytest.mark.parametrize("impl", IMPLS)
def test_in_order_and_hole_filling(impl):
    r = impl(1000, BASE)
    assert r.add(BASE + 10, b"klmno") == 0          # a hole at BASE..BASE+10
    assert r.pending == 5
    assert r.add(BASE, b"abcdefghij") == 15
    assert r.take() == b"abcdefghijklmno"
    assert r.base == BASE + 15 and r.pending == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicates_overlaps_and_window_clipping(impl):
    r = impl(16, 100)
    assert r.add(90, b"0123456789") == 0            # entirely old: ignored
    assert r.add(95, b"abcdefghij") == 5            # overlaps base: only the new part
    assert r.take() == b"fghij"
    assert r.add(105, b"x" * 40) == 16              # clipped to the window
    assert r.take() == b"x" * 16


@pytest.mark.parametrize("impl", IMPLS)
def test_too_many_holes_drops_the_segment(impl):
    r = impl(10_000, 0)
    for i in range(64):
        assert r.add(10 + i * 10, b"a") == 0
    assert r.add(900, b"b") == -1                   # a 65th interval: dropped, nothing lost
    assert r.add(11, b"c") == 0                     # touching an existing one: merged
    assert len(r.intervals) == 64


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.binary(min_size=0, max_size=60)),
                max_size=40), st.integers(1, 200))
def test_matches_reference(ops, capacity):
    stream = bytes(range(256)) * 3
    fast, ref = Reassembly(capacity, BASE), ReassemblyRef(capacity, BASE)
    for offset, data in ops:
        data = stream[offset:offset + len(data)]    # consistent bytes, as real TCP sends
        assert fast.add(BASE + offset, data) == ref.add(BASE + offset, data)
        assert fast.intervals == ref.intervals
        if offset % 3 == 0:
            assert fast.take() == ref.take()
        assert fast.base == ref.base and fast.pending == ref.pending


def test_set_base_refused_while_holding():
    r = Reassembly(100, 0)
    r.add(5, b"x")
    with pytest.raises(ValueError):
        r.set_base(50)
