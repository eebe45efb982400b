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
               "anchor_name": anchor_name, "ratio": round(ratio, 3),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        _rows.append(row)
        print(f"\n{name}: pyhv {pyhv:,.0f} {unit} vs {anchor_name} {anchor:,.0f} {unit}: "
              f"ratio {ratio:.3f}")
        return ratio

    return add


def pytest_sessionfinish(session, exitstatus):
    """Rows measured now replace the rows of the same name; rows of suites not run this time
    stay, each with the date it was measured (so running one suite loses nothing)."""
    if not _rows:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    try:
        old = json.loads(RESULTS.read_text()).get("rows", [])
    except (OSError, ValueError):
        old = []
    fresh = {r["name"] for r in _rows}
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "kernel": platform.release(),
        "rows": [r for r in old if r["name"] not in fresh] + _rows,
    }, indent=2) + "\n")
