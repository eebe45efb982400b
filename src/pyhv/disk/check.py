"""`img check`: qemu-img's report and exit codes (0 clean, 2 corruptions, 3 leaks only)."""

from __future__ import annotations

import json

import pyhv.disk
from pyhv.disk.errors import DiskError

FIX = {None: 0, "leaks": 1, "all": 2}


def check(path: str, fmt: str | None, repair: str | None,
          output: str) -> tuple[str, str, int]:
    """(what qemu-img prints on stderr: each error and repair, its report, exit status)."""
    if repair not in FIX:
        raise DiskError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    with pyhv.disk.open(path, fmt, readonly=repair is None, backing=False,
                        repair=repair is not None) as disk:
        if disk.format != "qcow2":
            raise DiskError("This image format does not support checks")
        result = disk.check(FIX[repair])
        pre = ""
        fixed_leaks, fixed_corruptions = result["fixed_leaks"], result["fixed_corruptions"]
        if repair and (fixed_leaks or fixed_corruptions):
            pre = ("The following inconsistencies were found and repaired:\n\n"
                   f"    {fixed_leaks} leaked clusters\n"
                   f"    {fixed_corruptions} corruptions\n\n"
                   "Double checking the fixed image now...\n")
            first = result
            result = disk.check(0)
            result["messages"] = first["messages"] + result["messages"]
        total = -(-disk.size // disk.header.cluster_size)
    status = 2 if result["corruptions"] else 3 if result["leaks"] else 0
    if output == "json":
        # qemu-img's key order; the -fixed counts only when something was repaired
        out = {"image-end-offset": result["image_end_offset"], "total-clusters": total}
        if fixed_corruptions:
            out["corruptions-fixed"] = fixed_corruptions
        out["check-errors"] = 0
        if fixed_leaks:
            out["leaks-fixed"] = fixed_leaks
        if result["allocated_clusters"]:
            out["allocated-clusters"] = result["allocated_clusters"]
        out["filename"] = path
        out["format"] = "qcow2"
        if result["corruptions"]:
            out["corruptions"] = result["corruptions"]
        if result["leaks"]:
            out["leaks"] = result["leaks"]
        if result["fragmented_clusters"]:
            out["fragmented-clusters"] = result["fragmented_clusters"]
        if result["compressed_clusters"]:
            out["compressed-clusters"] = result["compressed_clusters"]
        return "\n".join(result["messages"]), json.dumps(out, indent=4), status
    lines = []
    if pre:
        lines.append(pre.rstrip("\n"))
    if result["corruptions"]:
        lines.append(f"\n{result['corruptions']} errors were found on the image.\n"
                     "Data may be corrupted, or further writes to the image may corrupt it.")
    if result["leaks"]:
        lines.append(f"\n{result['leaks']} leaked clusters were found on the image.\n"
                     "This means waste of disk space, but no harm to data.")
    if not result["corruptions"] and not result["leaks"]:
        lines.append("No errors were found on the image.")
    alloc = result["allocated_clusters"]
    if total and alloc:
        lines.append(f"{alloc}/{total} = {alloc * 100 / total:.2f}% allocated, "
                     f"{result['fragmented_clusters'] * 100 / alloc:.2f}% fragmented, "
                     f"{result['compressed_clusters'] * 100 / alloc:.2f}% compressed clusters")
    lines.append(f"Image end offset: {result['image_end_offset']}")
    return "\n".join(result["messages"]), "\n".join(lines), status
