"""Where and in what precision a device's local training runs: ``train.precision`` and ``train.device``.

``"auto"`` asks the machine: bf16 where the hardware computes it natively, else fp32; CUDA when
a GPU is visible, else the CPU. bf16 applies to the frozen base only: the adapters, their
gradients and the optimizer moments stay fp32 (the usual mixed-precision recipe; ours for the
choice of what stays fp32). On a CPU without AMX-BF16 or AVX-512-BF16, bf16 matmuls are
emulated and slower than fp32, so ``auto`` keeps fp32 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

#: /proc/cpuinfo flags of x86 CPUs that compute bf16 matmuls natively.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (Linux ``/proc/cpuinfo``; empty where it is not readable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    return any(f in cpu_flags(cpuinfo) for f in BF16_CPU_FLAGS)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` / ``"cpu"`` / ``"cuda"`` to a ``torch.device``; a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be one of ['auto', 'cpu', 'cuda'], got {name!r}")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, *, cpuinfo: str | None = None) -> torch.dtype:
    """``"auto"`` / ``"fp32"`` / ``"bf16"`` to the base's compute dtype on ``device``."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"train.precision must be one of ['auto', 'fp32', 'bf16'], got {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16(cpuinfo) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """bf16 autocast on ``device`` (matmuls in bf16, reductions and norms as autocast keeps
    them); a no-op for fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


__all__ = [
    "BF16_CPU_FLAGS",
    "autocast",
    "cpu_flags",
    "cpu_has_bf16",
    "dtype_name",
    "resolve_device",
    "resolve_precision",
]
