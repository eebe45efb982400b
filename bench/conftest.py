"""Benchmark plumbing: every row is pyhv's figure next to its anchor's, measured in the same
run, and lands in bench/results/latest.json with the ratio. Benchmarks never gate CI."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest

RESULTS = Path(__file__).parent / "results" / "latest.json"
_rows: list[dict] = []


@pytest.fixture
def record():
    """record(name, unit, pyhv=..., anchor=..., anchor_name=..., higher_is_better=True)"""

    def add(name: str, unit: str, pyhv: float, anchor: float, anchor_name: str,
            higher_is_better: bool = True, **extra) -> float:
        ratio = pyhv / anchor if higher_is_better else anchor / pyhv
        row = {"name": name, "unit": unit, "pyhv": pyhv, "anchor": anchor,
               "anchor_name": anchor_name, "ratio": round(ratio, 3), **extra}
        _rows.append(row)
        print(f"\n{name}: pyhv {pyhv:,.0f} {unit} vs {anchor_name} {anchor:,.0f} {unit}: "
              f"ratio {ratio:.3f}")
        return ratio

    return add


def pytest_sessionfinish(session, exitstatus):
    if not _rows:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "kernel": platform.release(),
        "rows": _rows,
    }, indent=2) + "\n")
