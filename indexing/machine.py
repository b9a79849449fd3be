"""What a benchmark ran on: every ``fusionrank bench ...`` JSON carries :func:`machine_info` as ``"machine"``.

Benchmark numbers depend on the CPU as much as on the code: onnxruntime and torch pick their int8 and float kernels
by the instruction sets the CPU offers (AVX2, AVX-512, VNNI, AMX), and two VMs that both call themselves
"Intel(R) Xeon(R) Processor" with 2 cores differed by ~1.4x in ``bench serve`` throughput. So each result names its machine,
and two results are compared only where these agree (or the difference is stated)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

#: the CPU features that change which kernels onnxruntime and torch run (reported when present, in this order)
KERNEL_ISA = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """``(model name, the KERNEL_ISA flags present)`` from the text of ``/proc/cpuinfo`` (its first processor)."""
    model = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "Features") and not flags:  # x86 says flags, arm64 Features
            flags = set(value.split())
    return model, [f for f in KERNEL_ISA if f in flags]


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """``{"cpu_model", "cpu_count", "cpus_usable", "cpu_isa", "arch"}``: ``cpu_count`` is what the machine has,
    ``cpus_usable`` what this process may run on (its affinity mask); ``cpu_isa`` lists the :data:`KERNEL_ISA` flags
    present. Without ``/proc/cpuinfo`` (not Linux) the model is ``platform.processor()`` and the flags are unknown
    (``None``)."""
    try:
        model, isa = parse_cpuinfo(cpuinfo.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        model, isa = platform.processor() or None, None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        usable = os.cpu_count()
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_isa": isa, "arch": platform.machine() or None}


__all__ = ["KERNEL_ISA", "machine_info", "parse_cpuinfo"]
