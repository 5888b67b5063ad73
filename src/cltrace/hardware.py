"""What the machine can do fast: one place that reads the CPU flags. torch loads inside the
functions that need it, so the CLI can set torch's allocator switches before it loads."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISION_ENV = "CLTRACE_PRECISION"  # "fp32": behave as on a CPU without fast bf16 (AVX2 only)
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's own switch: huge pages for large CPU tensors


def enable_huge_pages() -> bool:
    """Back torch's CPU tensors of 2 MiB and more with transparent huge pages (torch's switch
    THP_MEM_ALLOC_ENABLE=1: 2 MiB-aligned and madvise'd, which Linux honours in its default
    "madvise" mode). The sparse decoder kernels scatter into and gather from rows tens of KiB
    apart, and a 4 KiB page per row misses the TLB: an 18 x 4096 CLT training step ran 9-12%
    faster with huge pages (bench/bench_step_phases.py, Sapphire Rapids, 2 cores: 511-524
    against 573-582 tokens/s), its first touches fault 512x less often. torch reads the switch
    once, at its first large allocation, so call this first thing in a process (the CLI does).
    A value the user set is kept. True when huge pages are asked for (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return os.environ[HUGE_PAGES_ENV] == "1"


def forced_fp32() -> bool:
    """True when CLTRACE_PRECISION=fp32 asks every stage to run in float32, as it would on a
    CPU without fast bf16 (to time or test that path on any machine)."""
    return os.environ.get(PRECISION_ENV, "").strip().lower() == "fp32"


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls beat fp32 on this CPU: AMX-bf16 (Intel Sapphire Rapids and
    later, 2-6x) or AVX512-bf16 (e.g. AMD EPYC Zen 4: measured 351 against 176 GFLOP/s on a
    4096x1024x5760 product, and a dense 18x1024 CLT training step 12.9 s against 21.3 s).
    False under CLTRACE_PRECISION=fp32."""
    return not forced_fp32() and _cpu_flags_bf16()


@lru_cache(maxsize=1)
def _cpu_flags_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fast_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with fast bf16 matmuls, else float32."""
    import torch

    if forced_fp32():
        return torch.float32
    if torch.device(device).type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """The device every command runs on: "auto" (or None) is CUDA when available, else CPU;
    anything else is checked (a CltraceError names a device that is not there)."""
    import torch

    from cltrace.errors import CltraceError

    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CltraceError(f"unknown device {str(device)!r}", "use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CltraceError(
            f"device {str(device)!r} asked for, but torch sees no CUDA GPU",
            "use --device cpu (or auto), or install a CUDA build of torch",
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CltraceError(
            f"no GPU {parsed.index}: torch sees {torch.cuda.device_count()}",
            f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
        )
    return str(device)


__all__ = [
    "cpu_has_fast_bf16",
    "enable_huge_pages",
    "fast_dtype",
    "forced_fp32",
    "resolve_device",
    "HUGE_PAGES_ENV",
    "PRECISION_ENV",
]


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS (no mmap for
    large blocks, no trimming). A training step frees and reallocates gigabytes of same-sized
    buffers; returned to the OS, each 4 KiB page faults again on first touch: measured 3.3-4.3 s
    against 2.4 s per step of an 18 x 4096 CLT (Sapphire Rapids, 2 cores). Process-wide, for
    long-running training; True when applied (glibc only; elsewhere a no-op)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False
