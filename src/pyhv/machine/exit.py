"""How a machine ended, decoded from the vCPU exit that ended it."""

from __future__ import annotations

from dataclasses import dataclass, field

# Outcomes a user asked for (or a guest asked for politely) end pyhv with status 0.
CLEAN_KINDS = frozenset({"reset", "poweroff", "stopped", "halted", "quit"})


@dataclass
class MachineExit:
    kind: str                 # reset, poweroff, halted, quit, stopped, timeout, triple-fault, ...
    message: str              # one line, names the cause (and RIP for faults)
    vcpu: int | None = None
    boot_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind in CLEAN_KINDS

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def describe(vcpu, info: dict, regs: dict | None) -> MachineExit:
    """Turn a terminating exit (Vcpu.exit_info()) into a MachineExit with a clear message."""
    rip = f" at RIP {regs['rip']:#x}" if regs else ""
    n = vcpu.index
    reason = info["reason"]
    if reason == "HLT":
        return MachineExit("halted", f"vCPU {n} halted{rip}", n)
    if reason == "SHUTDOWN":
        return MachineExit("triple-fault",
                           f"vCPU {n} triple-faulted{rip} (KVM_EXIT_SHUTDOWN): the guest "
                           "hit an exception it could not handle", n)
    if reason == "SYSTEM_EVENT":
        event = info.get("event")
        if event == "reset":
            return MachineExit("reset", f"guest reset the machine (vCPU {n})", n)
        if event == "shutdown":
            return MachineExit("poweroff", f"guest powered off (vCPU {n})", n)
        return MachineExit("crash", f"guest reported a crash (system event {event}) on "
                           f"vCPU {n}{rip}", n)
    if reason == "INTERNAL_ERROR":
        data = " ".join(f"{d:#x}" for d in info.get("data", []))
        return MachineExit("internal-error",
                           f"KVM internal error on vCPU {n}{rip}: suberror "
                           f"{info['suberror']} ({info['suberror_name']})"
                           + (f", data {data}" if data else ""), n)
    if reason == "FAIL_ENTRY":
        return MachineExit("fail-entry",
                           f"KVM could not enter vCPU {n}{rip}: hardware entry failure reason "
                           f"{info['hardware_entry_failure_reason']:#x} on host CPU "
                           f"{info['cpu']}", n)
    return MachineExit("unexpected-exit", f"vCPU {n} stopped on unexpected exit {reason}{rip}",
                       n)
