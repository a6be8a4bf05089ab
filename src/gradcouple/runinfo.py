"""Measurements shared by stage summaries: wall time, peak memory, device description."""

from __future__ import annotations

import platform
import resource
import sys

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


def device_info(device: torch.device) -> DeviceInfo:
    """What ran the computation: device type and name, GPU memory peak (bytes) when CUDA."""
    info = DeviceInfo(device=str(device), cpu=platform.processor() or platform.machine(),
                      threads=torch.get_num_threads(), torch=torch.__version__)
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

