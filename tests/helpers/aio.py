"""Waiting inside asyncio tests."""

from __future__ import annotations

import asyncio


async def settle(cond, timeout: float = 10.0) -> None:
    """Return once `cond()` is true (checked every 10 ms); AssertionError after `timeout` s."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")
