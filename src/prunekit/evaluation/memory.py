"""Peak memory of a workload: CUDA's allocator statistics, or the process's peak resident set size on CPU.

On CUDA: ``torch.cuda.max_memory_allocated`` during the workload minus what was allocated before (tensors only). On
CPU: the peak resident set size during the workload minus the resident size before it, from ``/proc/self/status``
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, ``VmRSS`` before). This is what the process took
from the OS: it includes allocator slack and excludes memory the allocator reused from earlier frees, so read it as
an indication, not an exact tensor count. Where the peak cannot be reset, the growth of ``VmHWM`` (or
``ru_maxrss``) is reported instead: a lower bound, named in the method string.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource

import torch


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS when '5' is written to clear_refs (since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so the RSS baseline is what is live.

    Without it, memory freed by an earlier workload stays resident and the next workload reuses it unseen.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


MEMORY_METHODS = {
    "cuda": "cuda max_memory_allocated growth",
    "rss": "peak RSS growth (VmHWM after clear_refs reset - VmRSS before)",
    "hwm": "VmHWM growth (peak not resettable: lower bound)",
    "maxrss": "ru_maxrss growth (peak not resettable: lower bound)",
}


class PeakMemory:
    """Context manager: ``self.bytes`` is the peak memory growth during the block (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = MEMORY_METHODS["cuda"]
            return self
        _release_free_memory()
        if _reset_peak_rss() and _proc_status_kib("VmRSS") is not None:
            self._base = _proc_status_kib("VmRSS") * 1024
            self.method = MEMORY_METHODS["rss"]
        elif _proc_status_kib("VmHWM") is not None:
            self._base = _proc_status_kib("VmHWM") * 1024
            self.method = MEMORY_METHODS["hwm"]
        else:
            self._base = _ru_maxrss_bytes()
            self.method = MEMORY_METHODS["maxrss"]
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == MEMORY_METHODS["maxrss"]:
            peak = _ru_maxrss_bytes()
        else:
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
        self.bytes = max(0, peak - self._base)


def peak_memory_method(device: torch.device | str) -> str:
    """How peak memory is measured on ``device`` here (CPU methods depend on what the kernel allows)."""
    with PeakMemory(torch.device(device)) as probe:
        pass
    return probe.method
