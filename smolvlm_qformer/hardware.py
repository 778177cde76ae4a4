"""The one place that decides whether bfloat16 is worth using on a device.

bf16 is fast only where the hardware has bf16 matrix instructions: CUDA GPUs from Ampere on, and CPUs with
AVX512-BF16 or AMX. Elsewhere it is emulated: on an AVX2-only CPU a bf16 matmul falls back to torch's generic GEMM
and runs about 60x slower than float32 (a demo stage-2 step took 170 s instead of 3 s). Training's `--bf16`
default, the demo's frozen-LM dtype, the inference dtype and the benchmarks' contenders all ask `bf16_is_fast`.
"""

from __future__ import annotations

import torch


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether bfloat16 runs natively (and so faster than float32) on `device`.

    True on CUDA GPUs with native bf16 (not the emulation `torch.cuda.is_bf16_supported()` counts by default, which
    Trainer refuses) and on CPUs with AVX512-BF16 or AMX, unless torch's kernels are held below AVX512
    (`ATEN_CPU_CAPABILITY=avx2`, e.g. to time an AVX2 machine); False elsewhere.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # False without CUDA
    if device.type != "cpu" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where it is native on `device`, else float32: the dtype to run a model in for speed."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def describe_cpu() -> dict[str, object]:
    """What timings depend on: torch's CPU kernel level (e.g. "AVX2", "AVX512") and native bf16 / AMX support."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "bf16_is_fast": bf16_is_fast("cpu"),
        "torch_threads": torch.get_num_threads(),
    }
