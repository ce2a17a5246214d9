"""Memory report: device and host peaks per epoch and for the run, without a polling thread.

Device numbers come from the caching allocator's own counters (``torch.cuda.memory_stats``): peak
allocated, peak reserved, peak active bytes, allocation retries (the allocator had to free its cache and
retry: a sign of fragmentation close to OOM) and OOMs. The host number for the run is the kernel's
high-water mark of the process' resident set (``VmHWM`` in /proc/self/status, which ``getrusage`` reports
as ``ru_maxrss``), model loading included.

Per epoch, the kernel's counter is read, never reset: resetting it (``/proc/self/clear_refs``) is a
process-wide side effect that other code measuring the process would not expect, and it hid the loading
peak from every later reading. An epoch that raised the high-water mark has that mark as its exact peak;
an epoch that stayed below it reports the largest resident set seen at its optimizer-step boundaries
(``sample()``, a cheap read of /proc/self/statm), a lower bound of its peak.

(The reference's MemoryTrace ran a thread that busy-looped on psutil for the whole epoch, one CPU core
at 100%, and printed whole GB truncated with int(); here values are GB with one decimal, 1 GB = 2**30 B.)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

GB = float(2 ** 30)


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (the kernel's high-water mark)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, kB on Linux
    except (ImportError, OSError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)  # current, not peak: the best left
    except ImportError:
        return 0


def host_rss_bytes() -> int:
    """The current resident set size of this process (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


@dataclass
class MemoryStats:
    """Peaks in bytes; device fields are None on CPU."""

    host_peak_rss: int = 0
    device_peak_allocated: Optional[int] = None
    device_peak_reserved: Optional[int] = None
    device_peak_active: Optional[int] = None
    alloc_retries: Optional[int] = None
    ooms: Optional[int] = None

    def as_gb(self) -> dict:
        """Plain numbers for metrics files: GB with one decimal, counts as ints."""
        out = {"host_peak_rss_gb": round(self.host_peak_rss / GB, 1)}
        if self.device_peak_allocated is not None:
            out.update(peak_allocated_gb=round(self.device_peak_allocated / GB, 1),
                       peak_reserved_gb=round(self.device_peak_reserved / GB, 1),
                       peak_active_gb=round(self.device_peak_active / GB, 1),
                       alloc_retries=self.alloc_retries, ooms=self.ooms)
        return out

    def format(self, label: str) -> str:
        parts = []
        if self.device_peak_allocated is not None:
            parts.append(f"device peak allocated {self.device_peak_allocated / GB:.1f} GB, reserved "
                         f"{self.device_peak_reserved / GB:.1f} GB, active {self.device_peak_active / GB:.1f} GB, "
                         f"alloc retries {self.alloc_retries}, OOMs {self.ooms}")
        parts.append(f"host peak RSS {self.host_peak_rss / GB:.1f} GB")
        return f"--> memory ({label}): " + "; ".join(parts)

    def merge(self, other: "MemoryStats") -> "MemoryStats":
        """The larger of two peaks (run-level summary over epochs); counters are cumulative already."""
        def mx(a, b):
            if a is None:
                return b
            return a if b is None else max(a, b)

        return MemoryStats(max(self.host_peak_rss, other.host_peak_rss),
                           mx(self.device_peak_allocated, other.device_peak_allocated),
                           mx(self.device_peak_reserved, other.device_peak_reserved),
                           mx(self.device_peak_active, other.device_peak_active),
                           mx(self.alloc_retries, other.alloc_retries), mx(self.ooms, other.ooms))


def device_peak_allocated_bytes(device: torch.device) -> Optional[int]:
    """Cheap peak for the per-step log line (None on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def device_peak_reserved_bytes(device: torch.device) -> Optional[int]:
    """Peak memory the caching allocator held from the driver (None on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    return None


def read_memory_stats(device: torch.device) -> MemoryStats:
    stats = MemoryStats(host_peak_rss=host_peak_rss_bytes())
    if device.type == "cuda":
        s = torch.cuda.memory_stats(device)
        stats.device_peak_allocated = int(s.get("allocated_bytes.all.peak", 0))
        stats.device_peak_reserved = int(s.get("reserved_bytes.all.peak", 0))
        stats.device_peak_active = int(s.get("active_bytes.all.peak", 0))
        stats.alloc_retries = int(s.get("num_alloc_retries", 0))
        stats.ooms = int(s.get("num_ooms", 0))
    return stats


class MemoryTracker:
    """``start_epoch()`` starts an epoch, ``sample()`` after every optimizer step, ``epoch_stats()`` the epoch's
    peaks, ``run_stats()`` the run's (host: the process' high-water mark).

    Device peaks are this process' allocator counters, reset per epoch (they belong to PyTorch's allocator,
    not to the process). Allocation retries and OOMs are cumulative over the run.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.run = MemoryStats()
        self._hwm_at_start = 0
        self._sampled = 0

    def start_epoch(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._hwm_at_start = host_peak_rss_bytes()
        self._sampled = host_rss_bytes()

    def sample(self) -> None:
        self._sampled = max(self._sampled, host_rss_bytes())

    def host_epoch_peak(self) -> int:
        """Exact when the epoch raised the process' high-water mark; else the largest sampled resident set."""
        self.sample()
        hwm = host_peak_rss_bytes()
        return hwm if hwm > self._hwm_at_start else self._sampled

    def epoch_stats(self) -> MemoryStats:
        stats = read_memory_stats(self.device)
        stats.host_peak_rss = self.host_epoch_peak()
        self.run = self.run.merge(stats)
        return stats

    def run_stats(self) -> MemoryStats:
        self.run = self.run.merge(read_memory_stats(self.device))
        return self.run


__all__ = ["MemoryStats", "MemoryTracker", "read_memory_stats", "host_peak_rss_bytes", "host_rss_bytes",
           "device_peak_allocated_bytes", "device_peak_reserved_bytes", "GB"]
