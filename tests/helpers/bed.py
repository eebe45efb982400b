"""The hardware-virtualisation test bed: a host whose KVM runs guest kernel code natively,
built on a machine whose own KVM does not (PVM).

QEMU's TCG emulates AMD SVM with nested paging, so a TCG guest (L1) started with
`-cpu max,+svm` that loads kvm-amd (from the default guest's own kernel package) has a real
/dev/kvm. This machine's root is shared into L1 read-only over virtio-fs and a work
directory writable; L1 chroots into the root, so the project's .venv runs there unchanged
and pyhv's own VMM boots full guests (L2) on it.

One L1 boot costs ~10 s and each L2 boot ~15-20 s, so callers batch: `run_cases` runs many
command lines (pyhv's, mostly) in one boot and returns each one's status, stdout and stderr
(written to files in the work directory, not parsed out of L1's console).
"""

from __future__ import annotations

import base64
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pyhv.guest.status import ConsoleScanner

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
QEMU = "qemu-system-x86_64"
PROJECT = Path(__file__).resolve().parents[2]
PYHV = [sys.executable, "-m", "pyhv"]
KVM_MODULES = ("kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko",
               "kernel/arch/x86/kvm/kvm-amd.ko")
BED_MEMORY_MIB = 3072       # L2 guests of up to 2 GiB, pyhv, and L1's own tmpfs
BED_CPUS = 2                # MTTCG: two host threads, so --cpus 2/4 in L2 do not crawl
BED_APPEND = "console=ttyS0 quiet reboot=k panic=-1 pyhv.net=0"


def unavailable() -> str | None:
    """Why the bed cannot run on this machine, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86)"
    if not os.access(VIRTIOFSD, os.X_OK):
        return f"{VIRTIOFSD} is missing (Debian package qemu-system-common)"
    if os.geteuid() != 0:
        return "the bed's virtiofsd shares / with sandbox=chroot, which needs root"
    return None


@dataclass
class CaseResult:
    status: int | None          # pyhv's exit status (None: the bed never reported one)
    stdout: str
    stderr: str


@dataclass
class BedRun:
    status: int | None          # the L1 script's status (None: L1 ended without one)
    console: str                # L1's console: kernel lines and the script's own output
    timed_out: bool


class Bed:
    """Boots L1 with `guest` (a GuestImage of the default guest) and `modules` (its kernel's
    lib/modules/<release>); `workdir` is shared writable at the same path inside."""

    def __init__(self, guest, modules: Path, workdir: Path):
        self.guest = guest
        self.modules = Path(modules)
        self.work = Path(workdir).resolve()

    def _initrd(self) -> Path:
        """The default guest's initramfs with the kvm modules appended under /x: gzip
        members after the first are not unpacked, so the base is decompressed first."""
        import gzip

        from pyhv.guest import initramfs as cpio

        extra = [cpio.directory("x")] + [
            cpio.file(f"x/{Path(m).name}", (self.modules / m).read_bytes()) for m in KVM_MODULES]
        out = self.work / ".bed" / "initrd.img"
        cpio.write_initramfs(out.with_suffix(".extra"), extra)
        with open(out, "wb") as f:
            f.write(gzip.decompress(self.guest.initrd.read_bytes()))
            f.write(gzip.decompress(out.with_suffix(".extra").read_bytes()))
        return out

    def _l1_script(self, body: Path) -> str:
        w, guest_home = self.work, self.guest.kernel.parent
        # (no tmpfs over /tmp: the project may be checked out there, as CI's clone can be;
        # temporary files go to TMPDIR on the /run tmpfs instead)
        env = ("HOME=/run XDG_CACHE_HOME=/run/c TMPDIR=/run/tmp "
               "PATH=/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1")
        return f"""
insmod /x/irqbypass.ko; insmod /x/kvm.ko; insmod /x/kvm-amd.ko
[ -e /dev/kvm ] || {{ echo "bed: no /dev/kvm in L1"; exit 1; }}
mkdir -p /host && mount -t virtiofs -o ro host /host || exit 1
mount -t tmpfs run /host/run; mkdir -p /host/run/tmp; mount -t devtmpfs dev /host/dev
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys
mkdir -p /host{w} 2>/dev/null; mount -t virtiofs work /host{w} || exit 1
mkdir -p /host/dev/pts && mount -t devpts devpts /host/dev/pts
mkdir -p /host/run/c/pyhv/guest && cp -a /host{guest_home} /host/run/c/pyhv/guest/
chroot /host /usr/bin/env {env} sh -c 'cd {shlex.quote(str(PROJECT))} && . {body}'
"""

    def run(self, script: str, timeout: float = 900) -> BedRun:
        """Boot L1 and run `script` (sh) in the chroot; L1's console goes to .bed/console."""
        state = self.work / ".bed"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        body = state / "body.sh"
        body.write_text(script)
        initrd = self._initrd()
        append = BED_APPEND + " pyhv.cmd=" + base64.b64encode(
            self._l1_script(body).encode()).decode()
        daemons = [self._virtiofsd(state / "root.sock", "/", "auto", state / "root.log"),
                   self._virtiofsd(state / "work.sock", self.work, "auto", state / "work.log")]
        try:
            self._wait_sockets(state / "root.sock", state / "work.sock")
            return self._qemu(initrd, append, state / "console", timeout)
        finally:
            for d in daemons:
                d.terminate()
                try:
                    d.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()

    @staticmethod
    def _virtiofsd(sock: Path, source, cache: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as f:
            return subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o",
                                     f"source={source}", "-o", f"cache={cache}", "-o",
                                     "sandbox=chroot"], stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    @staticmethod
    def _wait_sockets(*socks: Path) -> None:
        deadline = time.monotonic() + 10
        while not all(s.exists() for s in socks):
            if time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd never created {[str(s) for s in socks]}")
            time.sleep(0.05)

    def _qemu(self, initrd: Path, append: str, log: Path, timeout: float) -> BedRun:
        state = log.parent
        m = BED_MEMORY_MIB
        argv = [QEMU, "-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max,+svm",
                "-smp", str(BED_CPUS), "-m", str(m),
                "-object", f"memory-backend-memfd,id=mem,size={m}M,share=on",
                "-numa", "node,memdev=mem",
                "-chardev", f"socket,id=root,path={state / 'root.sock'}",
                "-device", "vhost-user-fs-pci,chardev=root,tag=host",
                "-chardev", f"socket,id=work,path={state / 'work.sock'}",
                "-device", "vhost-user-fs-pci,chardev=work,tag=work",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", "stdio", "-kernel", str(self.guest.kernel), "-initrd", str(initrd),
                "-append", append]
        with open(log, "wb") as f:
            scanner = ConsoleScanner(lambda data: (f.write(data), f.flush()))
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            timed_out = _pump(proc, scanner, time.monotonic() + timeout)
        return BedRun(scanner.status, log.read_text(errors="replace"), timed_out)

    def run_cases(self, cases: dict[str, list[str]], case_timeout: float = 240,
                  timeout: float = 900) -> tuple[dict[str, CaseResult], BedRun]:
        """Run each command line (an argv, e.g. `pyhv_argv(...)`; stdin /dev/null, cwd the
        project) in one boot; results by case name."""
        out = self.work / "cases"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        lines = []
        for name, argv in cases.items():
            base = shlex.quote(str(out / name))
            lines.append(f"echo 'bed: case {name}'; timeout -k 5 {case_timeout:g} "
                         f"{shlex.join(argv)} >{base}.out 2>{base}.err </dev/null; "
                         f"echo $? >{base}.rc")
        bed = self.run("\n".join(lines) + "\n", timeout=timeout)
        results = {}
        for name in cases:
            rc = out / f"{name}.rc"
            results[name] = CaseResult(
                int(rc.read_text()) if rc.exists() else None,
                _read(out / f"{name}.out"), _read(out / f"{name}.err"))
        return results, bed


def pyhv_argv(*args: str) -> list[str]:
    return [*PYHV, *args]


def run_here(cases: dict[str, list[str]], case_timeout: float = 240) -> dict[str, CaseResult]:
    """The same cases on this host (where its KVM runs guest kernel code natively)."""
    results = {}
    for name, argv in cases.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT,
                                  stdin=subprocess.DEVNULL, timeout=case_timeout)
            results[name] = CaseResult(done.returncode, done.stdout, done.stderr)
        except subprocess.TimeoutExpired as e:
            results[name] = CaseResult(None, _text(e.stdout), _text(e.stderr))
    return results


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _pump(proc: subprocess.Popen, scanner: ConsoleScanner, deadline: float) -> bool:
    """Feed QEMU's console to `scanner` until it exits; True if the deadline ended it."""
    fd, timed_out = proc.stdout.fileno(), False
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                timed_out = True
                proc.send_signal(signal.SIGTERM)
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            scanner.feed(chunk)
        scanner.close()
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return timed_out


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
