"""What this machine's processors do fast: the CPU's model and feature flags, its GPUs' compute capability,
and whether they compute in bf16 natively (``retina_scale.config.resolve_precision`` turns that into a run's
dtype policy). The flag and capability tests are pure functions of what they are given, so they are tested on
flag strings; ``cpu_flags()`` and ``gpu_capabilities()`` read this machine's.

Example:
    >>> bf16_capable({"avx512f", "avx512_bf16"}), bf16_capable({"avx512f", "avx2"})
    (True, False)
    >>> bf16_capable({"amx_bf16"}, gpus=[(7, 0)])  # the GPU computes, and a V100 has no bf16
    False
"""

from __future__ import annotations

from typing import Iterable

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of x86 CPUs with native bf16 arithmetic: AMX tiles (Sapphire Rapids and later) or
AVX-512 BF16 dot products (Cooper Lake, Zen 4 and later)."""

BF16_GPU_CAPABILITY = (8, 0)
"""The first CUDA compute capability with bf16 tensor cores (Ampere)."""


def _first_processor(cpuinfo: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # not Linux
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first processor in ``cpuinfo`` (/proc/cpuinfo's text; this machine's when
    None; empty where there is none).

        >>> sorted(cpu_flags("processor : 0\\nflags : fma avx512f avx512_bf16\\n\\nprocessor : 1\\n"))
        ['avx512_bf16', 'avx512f', 'fma']
    """
    fields = _first_processor(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    return set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first processor's model name in ``cpuinfo`` (this machine's when None), or ``"unknown"``."""
    fields = _first_processor(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    return fields.get("model name") or fields.get("Model") or "unknown"


def bf16_capable(flags: Iterable[str], gpus: Iterable[tuple[int, int]] = ()) -> bool:
    """True where the device that computes has native bf16: every GPU (``gpus``: compute capabilities) if
    there is one, else the CPU (``flags``)."""
    gpus = [tuple(c) for c in gpus]
    if gpus:
        return all(c >= BF16_GPU_CAPABILITY for c in gpus)
    return any(flag in set(flags) for flag in BF16_CPU_FLAGS)


def gpu_capabilities() -> list[tuple[int, int]]:
    """The CUDA compute capability of each GPU TensorFlow sees (``(0, 0)`` where it does not say)."""
    import tensorflow as tf

    return [tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
            for gpu in tf.config.list_physical_devices("GPU")]
