"""The reference workload on one GPU, projected from measured steps: 50,000 image-text pairs, the feature cache
(ViT-B/16 once over every image), stage 1 (10 epochs at batch 32) and stage 2 (5 epochs at batch 8), as
`examples/train_qformer.py` and `examples/train_vlm.py` configure them, on synthetic data at the reference shapes
(random weights, nothing downloaded: GPU machines need no network). Each phase runs a few warm-up steps, then `steps`
timed ones under bf16 autocast; the projection is (steps the full run takes) x (median seconds per step). MFU is the
counted FLOPs (`common.step_flops`) per second over the GPU's dense bf16 peak (the datasheet figure for known GPUs,
else a measured matmul).

Without a GPU it runs on the CPU, so that it can be tried anywhere; its projection is then the CPU's.

    python benchmarks/gpu_reference_run.py [--quick] [--json out.json]
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from common import (
    cached_image_features,
    matmul_peak,
    parse_args,
    print_table,
    reference_config,
    stage1_text,
    stage2_batch,
    stage2_model,
    step_flops,
    synchronize,
    training_step,
    write_json,
)

from smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval

PAIRS = 50_000
STAGE1 = {"epochs": 10, "batch": 32, "caption_tokens": 32}
STAGE2 = {"epochs": 5, "batch": 8, "text_tokens": 48}
CACHE_BATCH = 128
# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched against torch.cuda.get_device_name().
BF16_PEAKS = {"H200": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12}


def bf16_peak(device: torch.device) -> tuple[float, str]:
    """The device's dense bf16 peak and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAKS.items():
            if key in name:
                return peak, f"{name} datasheet"
    return matmul_peak(torch.bfloat16, device, size=4096 if device.type == "cuda" else 2048), "measured matmul"


def median_seconds(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, warmup = (2, 1) if args.quick or args.tiny else (20, 5)
    torch.manual_seed(0)
    config = reference_config(args.tiny)
    vision = config.vision_config

    stage1 = SmolVLMQFormerForImageTextRetrieval(config).to(device)
    cache_batch = CACHE_BATCH if device.type == "cuda" else 8
    pixels = torch.randn(cache_batch, vision.num_channels, vision.image_size, vision.image_size, device=device)

    def encode() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            stage1.vision_model(pixel_values=pixels)

    batch1, batch2 = STAGE1["batch"], STAGE2["batch"]
    inputs1 = {
        "vision_hidden_states": cached_image_features(config, batch1, device),
        **stage1_text(config, batch1, STAGE1["caption_tokens"], device=device),
    }
    step1 = training_step(stage1, inputs1, autocast=True)
    stage2 = stage2_model(config).to(device)
    step2 = training_step(stage2, stage2_batch(config, batch2, STAGE2["text_tokens"], device=device), autocast=True)

    phases = {
        "feature cache (ViT-B/16 forward)": (encode, cache_batch, PAIRS),
        f"stage 1 (ITC, batch {batch1})": (step1, batch1, PAIRS * STAGE1["epochs"]),
        f"stage 2 (LM loss, batch {batch2})": (step2, batch2, PAIRS * STAGE2["epochs"]),
    }
    peak, peak_source = bf16_peak(device)
    rows, projected, mfu = [], {}, {}
    for name, (step, batch, samples) in phases.items():
        flops = step_flops(step)
        seconds = median_seconds(step, steps, warmup, device)
        projected[name] = math.ceil(samples / batch) * seconds / 60
        mfu[name] = flops / seconds / peak
        rows.append([name, seconds, batch / seconds, flops / seconds / 1e12, f"{mfu[name]:.0%}", projected[name]])
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "projected_minutes": sum(projected.values()),
        "projected_minutes_by_phase": projected,
        "mfu": mfu,
        "bf16_peak_tflops": peak / 1e12,
        "bf16_peak_source": peak_source,
    }
    print_table(
        f"Reference run on {figures['device']}: {PAIRS:,} pairs, stage 1 {STAGE1['epochs']} epochs, stage 2 "
        f"{STAGE2['epochs']} epochs, bf16 autocast (median of {steps} steps after {warmup} warm-up)",
        ["phase", "s/step", "samples/s", "TFLOP/s", "MFU", "projected min"],
        rows,
        [
            f"bf16 peak: {peak / 1e12:.0f} TFLOP/s ({peak_source})",
            f"projected reference run: {figures['projected_minutes']:.1f} min (goal <= 10 min on one H100)",
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
