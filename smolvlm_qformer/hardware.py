"""The one place that decides whether bfloat16 is worth using on a device.

bf16 is fast only where the hardware has bf16 matrix instructions: CUDA GPUs from Ampere on, and CPUs with
AVX512-BF16 or AMX. Elsewhere it is emulated: on an AVX2-only CPU a bf16 matmul falls back to torch's generic GEMM
and runs about 60x slower than float32 (a demo stage-2 step took 170 s instead of 3 s). The instructions alone do
not make it fast: on a 2-core Intel Xeon with AVX512-BF16 but no AMX, a bf16 matmul ran at half the float32 rate
(and a demo stage-2 step took 1.4x as long), so on a CPU with the instructions the two are timed once per process.
Training's `--bf16` default, the demo's frozen-LM dtype, the inference dtype and the benchmarks' contenders all ask
`bf16_is_fast`.
"""

from __future__ import annotations

import functools
import time

import torch

# bf16 is picked on a CPU only where its matmul is clearly faster, so that a CPU near the line keeps the same
# (float32) choice from run to run
CPU_BF16_MIN_SPEEDUP = 1.2


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether bfloat16 runs natively and faster than float32 on `device`.

    True on CUDA GPUs with native bf16 (not the emulation `torch.cuda.is_bf16_supported()` counts by default, which
    Trainer refuses), and on CPUs with AVX512-BF16 or AMX where a bf16 matmul runs at least `CPU_BF16_MIN_SPEEDUP`
    times as fast as a float32 one, unless torch's kernels are held below AVX512 (`ATEN_CPU_CAPABILITY=avx2`, e.g. to
    time an AVX2 machine); False elsewhere.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # False without CUDA
    if device.type != "cpu" or not _cpu_has_bf16_instructions():
        return False
    return cpu_bf16_matmul_speedup() >= CPU_BF16_MIN_SPEEDUP


def _cpu_has_bf16_instructions() -> bool:
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def cpu_bf16_matmul_speedup() -> float:
    """How many times as fast a bf16 matmul runs as a float32 one on this CPU, at the shape of a small LM's MLP on a
    training batch (640 x 576 x 1536), with the threads torch uses now; the best of 5 runs each, about 0.1 s once
    per process. Call it only where the CPU has bf16 instructions: emulated, the bf16 runs take seconds."""

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


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where `bf16_is_fast(device)`, else float32: the dtype to run a model in for speed."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def describe_cpu() -> dict[str, object]:
    """What timings depend on: torch's CPU kernel level (e.g. "AVX2", "AVX512"), bf16 / AMX instructions and, where
    there are some, how much faster a bf16 matmul runs than a float32 one."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "bf16_matmul_speedup": round(cpu_bf16_matmul_speedup(), 2) if _cpu_has_bf16_instructions() else None,
        "bf16_is_fast": bf16_is_fast("cpu"),
        "torch_threads": torch.get_num_threads(),
    }
