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
        print(f"{r['name']:40} {fmt(r['pyhv']):>14} {fmt(r['anchor']):>14}  {r['ratio']:.3f}  "
              f"{r['anchor_name']} ({r['unit']}{note})")
        for extra in sorted({k[:-5] for k in r if k.endswith("_pyhv")}):
            others = ", ".join(f"{k[len(extra) + 1:]} {fmt(v)}" for k, v in r.items()
                               if k.startswith(extra + "_") and not k.endswith("_pyhv"))
            print(f"  {extra:38} {fmt(r[extra + '_pyhv']):>14}  ({others})")
    return 0


def fmt(value: float) -> str:
    """Thousands apart for rates; three decimals for the small values (seconds)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
