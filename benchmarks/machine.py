"""The CPU a benchmark ran on, printed beside its figures: speed and even int8 accuracy depend on it."""

from __future__ import annotations

import platform
from pathlib import Path

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "neon", "asimd")


def cpu_description() -> str:
    """'AMD EPYC 9R14, 2 CPUs; vector extensions: avx2 avx512f avx512_vnni' (from /proc/cpuinfo)."""
    model, flags, cpus = platform.processor() or platform.machine(), set(), 0
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpus += 1
        elif key in ("model name", "Model") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags = set(value.split())
    vectors = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of " + ", ".join(VECTOR_FLAGS)
    return f"{model}, {cpus} CPUs; vector extensions: {vectors}"
