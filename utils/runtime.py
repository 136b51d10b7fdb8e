"""Process set-up shared by the command-line scripts: device choice, the memory allocator, the
memory a forward may use, durations, and a training run's clock and stop signals."""
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager

from utils.errors import UserError

# glibc returns every large block (> 32 MiB) to the OS on free and page-faults it in again on the
# next allocation. With feature maps of hundreds of MiB that costs more than the arithmetic (about
# 2.5x slower inference on 2 cores). Keeping freed blocks in the heap fixes it. The variables must
# be present when the process starts, hence the re-exec.
_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 36),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}


def keep_freed_memory():
    """Re-execute this script once with glibc's allocator told to keep freed blocks.

    No effect on other platforms, when the variables are already set (by the user or a previous
    re-exec), or when ``REFUSION_NO_REEXEC=1``.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if os.environ.get("REFUSION_NO_REEXEC") == "1" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    os.environ.update(_MALLOC_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def default_allocator_env():
    """This process's environment without our allocator settings and without the re-exec:
    for a child process that should allocate memory as glibc does by default (benchmarks)."""
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_ENV}
    env["REFUSION_NO_REEXEC"] = "1"
    return env


DEVICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(UserError):
    pass


def resolve_device(name="auto"):
    """``auto|cpu|cuda|mps|cuda:N`` -> ``torch.device``; ``auto`` prefers CUDA, then MPS, then CPU."""
    import torch  # here so that keep_freed_memory() runs before torch is loaded

    mps_available = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu"
    if name.split(":")[0] not in DEVICES[1:]:
        raise DeviceError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' requested but CUDA is not available here")
    if name == "mps" and not mps_available:
        raise DeviceError("device 'mps' requested but MPS is not available here")
    device = torch.device(name)
    if device.type == "cuda":
        # TF32 convolutions would cost the 1e-4 parity with the float32 release.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def parse_duration(text):
    """``"150m"``, ``"2h30m"``, ``"90s"``, ``"1.5h"`` or plain seconds (``"5400"``) -> seconds;
    ``""`` or ``"0"`` -> 0 (no limit). Raises ``UserError`` on anything else."""
    import re

    text = str(text).strip().lower()
    if text in ("", "0"):
        return 0.0
    if re.fullmatch(r"\d+(\.\d*)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d*)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UserError(f"cannot read duration '{text}': use e.g. 150m, 2h30m, 90s or seconds")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# -- memory ------------------------------------------------------------------------------------
def parse_size(text):
    """``"512MB"``, ``"4GB"``, ``"1.5G"``, ``"800M"`` or bytes -> bytes; ``"auto"`` -> None."""
    import re

    text = str(text).strip()
    if text.lower() == "auto":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]?)i?b?", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"cannot read memory size '{text}': use e.g. 512MB, 4GB or auto")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def available_memory(device):
    """Bytes a forward may use now: free memory on a CUDA device; on MPS, what Metal recommends
    for this process less what the driver holds; on the CPU, the system's available memory
    (Linux's MemAvailable, elsewhere half the physical memory) within this process's own limits
    (address space, cgroup), or None where none can be read."""
    import torch
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    system = _read_meminfo("/proc/meminfo", "MemAvailable:")
    if system is None:
        try:  # macOS and other Unix systems without /proc/meminfo
            system = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (AttributeError, ValueError, OSError):  # Windows has no sysconf
            pass
    known = [b for b in (system, *_process_limits()) if b is not None]
    return max(0, min(known)) if known else None


def _read_meminfo(path, key):
    """The ``key: N kB`` line of a /proc file in bytes, or None."""
    try:
        with open(path) as stream:
            for line in stream:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _process_limits():
    """Bytes left under this process's address-space limit (``ulimit -v``) and its cgroup's
    memory limit (containers, SLURM), where they are set."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            used = _read_meminfo("/proc/self/status", "VmSize:")
            yield soft - (used or 0)
    except ImportError:  # Windows
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                limit_bytes, usage_bytes = int(a.read()), int(b.read())
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        if limit_bytes < 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            yield limit_bytes - usage_bytes
        return


# -- a training run's clock and stops -----------------------------------------------------------
# how a stop was asked for, in rising priority: the ranks of a run stop for the highest any saw
STOP_REASONS = (None, "max_time", "SIGTERM", "SIGINT")
# exit codes of a stopped run: --max_time is a planned stop; a signal gives the shell's 128 + N
STOP_EXIT = {"max_time": 0, "SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class RunClock:
    """``--max_time`` and ``--checkpoint_every``, counted from ``start()``, the stop a signal asked
    for (``stop_reason``), and the wall time of the current epoch's stretch."""

    def __init__(self, max_time, checkpoint_every):
        self.limit, self.interval = parse_duration(max_time), parse_duration(checkpoint_every)
        self.stop_reason = None  # "SIGINT", "SIGTERM" or "max_time": stop at the next step boundary
        self.start()

    def start(self):
        now = time.monotonic()
        self.deadline = now + self.limit if self.limit else None
        self.next_checkpoint = now + self.interval
        self.stretch_started = time.time()

    def at_step_boundary(self, world):
        """``(stop, checkpoint_due)``, the same on every rank (one all-reduce): stop when any rank
        saw a stop, write the periodic checkpoint when any rank found it due."""
        now = time.monotonic()
        if self.stop_reason is None and self.deadline is not None and now >= self.deadline:
            self.stop_reason = "max_time"
        due = bool(self.interval) and now >= self.next_checkpoint
        reason, due = world.max_of([STOP_REASONS.index(self.stop_reason), int(due)])
        self.stop_reason = STOP_REASONS[reason]
        return self.stop_reason is not None, bool(due)

    def checkpoint_written(self):
        self.next_checkpoint = time.monotonic() + self.interval

    def stretch_seconds(self):
        """Wall time since this stretch of the current epoch began."""
        return time.time() - self.stretch_started

    def new_epoch(self):
        self.stretch_started = time.time()
        self.checkpoint_written()


@contextmanager
def stop_signals(clock, single_process, say):
    """Ctrl-C and SIGTERM set ``clock.stop_reason`` (the run stops after its step). In a single
    process a second one stops at once; under a launcher, which forwards the terminal's signal to
    every rank, a second one is left to the launcher's SIGKILL."""
    def request_stop(signum, _frame):
        if clock.stop_reason in ("SIGINT", "SIGTERM"):
            return
        clock.stop_reason = signal.Signals(signum).name
        if single_process:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        say(f"\n{clock.stop_reason}: stopping after this step"
            + (" (again to abort without saving)" if single_process else ""), file=sys.stderr)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)

