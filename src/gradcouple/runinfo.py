"""Measurements shared by stage summaries: wall time, peak memory, device description."""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Optional

import torch

from .artifacts import DeviceInfo


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: ``VmHWM`` of /proc/self/status (``ru_maxrss`` carries a parent's peak across exec);
    elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def use_threads(n: Optional[int]) -> int:
    """Set torch's CPU threads to ``n`` (None keeps torch's default, which follows ``OMP_NUM_THREADS``);
    returns the count in use. Two processes each using every core of a small machine run many times
    slower than one thread each, so a shared machine wants ``--threads 1``."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def overloaded(info: DeviceInfo) -> Optional[str]:
    """A one-line note when the machine's load exceeded its cores during a stage, else None."""
    if info.load_average is None or info.cpu_count <= 0 or info.load_average <= info.cpu_count:
        return None
    return (f"the machine's load ({info.load_average:.1f}) exceeded its {info.cpu_count} cores: other processes slowed this "
            f"stage, so its timings are not representative (with {info.threads} threads; see --threads).")


def device_info(device: torch.device) -> DeviceInfo:
    """What ran the computation: device type and name, threads, cores and load, GPU memory peak (bytes) when CUDA."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info = DeviceInfo(device=str(device), cpu=platform.processor() or platform.machine(),
                      threads=torch.get_num_threads(), cpu_count=cpu_count(), load_average=load, torch=torch.__version__)
    if device.type == "cuda":
        info.gpu = torch.cuda.get_device_name(device)
        info.peak_gpu_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    return info


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"

