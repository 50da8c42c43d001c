"""What this machine computes fast: the CPU's name and instruction sets, and the precision
``auto`` resolves to (bfloat16 only where it is native; emulated bfloat16 on an AVX2-only CPU
is more than 10x slower than float32)."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch

from deepssim.errors import DeepSSIMError

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_description() -> str:
    """E.g. 'AMD EPYC (avx2 avx512f avx512_bf16), torch capability AVX512, 2 threads'."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    flags = " ".join(f for f in REPORTED_FLAGS if f in cpu_flags()) or "no AVX2"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({flags}), torch capability {capability}, {torch.get_num_threads()} threads"


def native_bfloat16(device: str = "cpu") -> bool:
    """True where bfloat16 matrix work runs in hardware: AMX or AVX512-BF16 CPUs, recent GPUs."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` -> bfloat16 where native, else float32; other names are checked and returned."""
    if precision not in PRECISIONS:
        raise DeepSSIMError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    if precision == "float16" and not str(device).startswith("cuda"):
        raise DeepSSIMError("float16 needs a CUDA device; use bfloat16 or auto on the CPU")
    return precision
