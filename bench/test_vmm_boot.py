"""Boot to the guest command's status on pyhv's own VMM, next to QEMU with KVM on the same
kernel, initrd and command line, in one run (bench/bootclock.py). Needs KVM that runs guest
kernel code natively: here if the host has it, else inside the hardware-virtualisation test
bed (tests/helpers/bed.py), where both are nested and slow in absolute terms, so only the
ratio means something. Goal: pyhv <= 0.5x QEMU's time."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from tests.helpers import bed as bedlib

pytestmark = pytest.mark.timeout(1800)


def test_boot_to_status_against_qemu_kvm(record, tmp_path):
    from pyhv.guest.build import build_guest
    from pyhv.guest.debian import KERNEL_PACKAGE, fetch_deb, unpack_deb
    from pyhv.guest.modules import modules_dir
    from pyhv.machine.hostkvm import host_kvm

    image = build_guest(progress=lambda _m: None)
    cases = {"clock": [sys.executable, "-m", "bench.bootclock", "3"]}
    if host_kvm().native:
        result, where = bedlib.run_here(cases, case_timeout=1500)["clock"], "here"
    else:
        reason = bedlib.unavailable()
        if reason:
            pytest.skip(f"needs KVM that runs guest kernel code natively, or the bed: {reason}")
        modules = modules_dir(unpack_deb(fetch_deb(KERNEL_PACKAGE)))
        results, _run = bedlib.Bed(image, modules, tmp_path).run_cases(
            cases, case_timeout=1500, timeout=1700)
        result, where = results["clock"], "test bed (nested SVM under TCG)"
    assert result.status == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    pyhv, qemu = statistics.median(figures["pyhv"]), statistics.median(figures["qemu"])
    record("boot to command status, default guest", "s", pyhv=pyhv, anchor=qemu,
           anchor_name="qemu-system-x86_64 -accel kvm", higher_is_better=False,
           where=where, rounds={k: figures[k] for k in ("pyhv", "qemu")},
           pyhv_peak_rss_kib=figures["pyhv_peak_rss_kib"],
           guest_memory_mib=figures["guest_memory_mib"])
