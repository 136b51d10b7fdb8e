"""Process set-up shared by the command-line scripts: device choice and the memory allocator."""
import os
import platform
import sys

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
