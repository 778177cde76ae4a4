"""The one place that decides whether bfloat16 is used: `--bf16 auto|true|false` and the dtypes that follow from it.

"auto" is decided from the hardware, once per process, never by timing (a timing would let machine load change the
numbers a run produces): bf16 where the device has bf16 matrix instructions that run it faster than float32, i.e.
CUDA GPUs with native bf16 (Ampere on) and CPUs with AMX, or with AVX512-BF16 on AMD (Zen 4 on). Elsewhere it stays
float32: on an AVX2-only CPU bf16 is emulated and a matmul runs about 60x slower, and on an Intel Xeon with
AVX512-BF16 but no AMX a bf16 matmul ran at 0.56x float32 (`docs/training.md`, "Precision").
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BF16_CHOICES = ("auto", "true", "false")
# CPU vendors whose AVX512-BF16 runs a bf16 matmul faster than float32 without AMX (measured: AMD EPYC, Zen 4)
FAST_AVX512_BF16_VENDORS = ("AuthenticAMD",)


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether `device` runs bfloat16 natively and faster than float32, from its instructions (see the module).

    False on a CPU whose torch kernels are held below AVX512 (`ATEN_CPU_CAPABILITY=avx2`, e.g. to time an AVX2
    machine), and on GPUs that only emulate bf16 (which Trainer refuses)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # False without CUDA
    if device.type != "cpu" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return torch.cpu._is_amx_tile_supported() or (
        torch.cpu._is_avx512_bf16_supported() and cpu_vendor() in FAST_AVX512_BF16_VENDORS
    )


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_bf16(choice: str | bool | None, device: str | torch.device) -> bool:
    """`--bf16`'s value as a bool: "true" / "false" (or a bool) as given; "auto" (or None) what `bf16_is_fast`
    says for `device`, logged."""
    if isinstance(choice, bool):
        return choice
    choice = "auto" if choice is None else str(choice).lower()
    if choice not in BF16_CHOICES:
        raise ValueError(f"--bf16 takes one of {', '.join(BF16_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "true"
    decided = bf16_is_fast(device)
    logger.info("bf16 auto: %s on %s (%s)", "on" if decided else "off", device, _instructions(torch.device(device)))
    return decided


def inference_dtype(choice: str | bool | None, device: str | torch.device) -> torch.dtype:
    """The dtype to run a model in: bfloat16 where `resolve_bf16(choice, device)`, else float32."""
    return torch.bfloat16 if resolve_bf16(choice, device) else torch.float32


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where `bf16_is_fast(device)`, else float32: the dtype to run a model in for speed."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def _instructions(device: torch.device) -> str:
    if device.type == "cuda":
        return f"native CUDA bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}"
    cpu = describe_cpu(timed=False)
    return ", ".join(f"{name} {value}" for name, value in cpu.items() if name != "torch_threads")


@functools.cache
def cpu_bf16_matmul_speedup() -> float:
    """How many times as fast a bf16 matmul runs as a float32 one on this CPU, at the shape of a small LM's MLP on a
    training batch (640 x 576 x 1536); the best of 5 runs each. A figure to report beside timings, never a decision
    (`bf16_is_fast`). Emulated (no bf16 instructions), the bf16 runs take seconds."""

    def seconds(dtype: torch.dtype) -> float:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(shape, generator=generator).to(dtype) for shape in ((640, 576), (576, 1536)))
        runs = []
        for _ in range(7):  # the first two warm the kernels up
            start = time.perf_counter()
            torch.matmul(a, b)
            runs.append(time.perf_counter() - start)
        return min(runs[2:])

    return seconds(torch.float32) / seconds(torch.bfloat16)


def describe_cpu(timed: bool = True) -> dict[str, object]:
    """What timings depend on: torch's CPU kernel level (e.g. "AVX2", "AVX512"), the vendor, bf16 / AMX instructions,
    the bf16 decision and (`timed`, where the CPU has bf16 instructions) how much faster a bf16 matmul runs."""
    instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    description = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vendor": cpu_vendor(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "bf16_is_fast": bf16_is_fast("cpu"),
        "torch_threads": torch.get_num_threads(),
    }
    if timed:
        description["bf16_matmul_speedup"] = round(cpu_bf16_matmul_speedup(), 2) if instructions else None
    return description
