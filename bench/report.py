"""Prints bench/results/latest.json as a table: name, pyhv, anchor, ratio."""

from __future__ import annotations

import json
import sys

from bench.conftest import RESULTS


def main() -> int:
    if not RESULTS.exists():
        print("no results yet: run `make bench`", file=sys.stderr)
        return 1
    data = json.loads(RESULTS.read_text())
    print(f"{'benchmark':40} {'pyhv':>14} {'anchor':>14}  ratio   anchor")
    for r in data["rows"]:
        wake = r.get("cross_cpu_round_trip_us")
        note = f", cross-CPU round trip {wake:.0f} us" if wake else ""
        print(f"{r['name']:40} {r['pyhv']:>14,.0f} {r['anchor']:>14,.0f}  {r['ratio']:.3f}  "
              f"{r['anchor_name']} ({r['unit']}{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
