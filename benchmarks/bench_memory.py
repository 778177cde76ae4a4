"""Peak resident memory (RSS) of training at the reference shapes, per batch size, and the feature cache's size on
disk per 1,000 images.

Each (stage, batch size) runs in a fresh process (a process's peak RSS only grows), builds the model, runs a few
training steps (forward + backward + AdamW) and reports its peak RSS:
- stage 1: the Q-Former with ITC on cached image features (197 x 768, float16 as the cache gives them), captions of
  32 tokens; the frozen ViT-B/16 is loaded, as in training;
- stage 2: SmolLM2-135M with LoRA, Q-Former and adapter training, 32 image + 48 text tokens, cached image features.
The cache's size comes from a real cache built from ViT-B/16 over a few images, scaled to 1,000.

    python benchmarks/bench_memory.py [--quick] [--json out.json]
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
from pathlib import Path

import torch
from common import (
    cached_image_features,
    parse_args,
    print_table,
    random_images,
    reference_config,
    stage1_text,
    stage2_batch,
    stage2_model,
    training_step,
    write_json,
)
from transformers import ViTImageProcessor

from smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval
from smolvlm_qformer.data import build_feature_cache

CAPTION_TOKENS = 32
TEXT_TOKENS = 48
REFERENCE_BATCH = {"stage 1": 32, "stage 2": 8}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def measure(stage: str, batch: int, steps: int, tiny: bool) -> tuple[float, float]:
    """Peak RSS (GB) of this process after building the `stage` model, and after `steps` training steps."""
    torch.manual_seed(0)
    config = reference_config(tiny)
    if stage == "stage 1":
        model = SmolVLMQFormerForImageTextRetrieval(config)
        inputs = {
            "vision_hidden_states": cached_image_features(config, batch),
            **stage1_text(config, batch, CAPTION_TOKENS),
        }
    else:
        model = stage2_model(config)
        inputs = stage2_batch(config, batch, TEXT_TOKENS)
    built = _peak_rss_gb()
    step = training_step(model, inputs)
    for _ in range(steps):
        step()
    return built, _peak_rss_gb()


def measure_in_fresh_process(stage: str, batch: int, steps: int, tiny: bool) -> tuple[float, float]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (stage, batch, steps, tiny))


def cache_bytes_per_1000_images(tiny: bool, num_images: int) -> float:
    """Bytes on disk of a real feature cache over `num_images` random images, scaled to 1,000 images."""
    config = reference_config(tiny)
    size = config.vision_config.image_size
    vision_model = SmolVLMQFormerForImageTextRetrieval(config).vision_model
    rows = [{"image": image} for image in random_images(size, num_images)]
    with tempfile.TemporaryDirectory() as folder:
        build_feature_cache(vision_model, ViTImageProcessor(size={"height": size, "width": size}), rows, folder)
        total = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
    return total / num_images * 1000


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(__doc__.splitlines()[0], argv)
    if args.tiny or args.quick:
        batches = {"stage 1": [4 if args.tiny else 8], "stage 2": [2 if args.tiny else 4]}
    else:
        batches = {"stage 1": [8, 32, 64], "stage 2": [4, 8, 16]}
    steps = 2 if args.quick or args.tiny else 3
    rows, peaks = [], {}
    for stage, sizes in batches.items():
        for batch in sizes:
            built, peak = measure_in_fresh_process(stage, batch, steps, args.tiny)
            peaks[(stage, batch)] = peak
            rows.append([stage, batch, built, peak])
    cache_bytes = cache_bytes_per_1000_images(args.tiny, 8 if args.quick or args.tiny else 64)

    def at_reference(stage: str) -> float:
        """The peak at the reference batch size, or at the largest measured one below it (--quick)."""
        sizes = [b for b in batches[stage] if b <= REFERENCE_BATCH[stage]] or batches[stage]
        return peaks[(stage, max(sizes))]

    figures = {
        "peak_rss_gb_stage1": at_reference("stage 1"),
        "peak_rss_gb_stage2": at_reference("stage 2"),
        "peak_rss_gb": {f"{stage}, batch {batch}": peak for (stage, batch), peak in peaks.items()},
        "feature_cache_gb_per_1000_images": cache_bytes / 1e9,
    }
    print_table(
        f"Peak RSS (GB) of training ({steps} steps, fp32, cached image features; a fresh process each)",
        ["stage", "batch", "after building", "peak"],
        rows,
        [f"feature cache on disk: {cache_bytes / 1e9:.3f} GB per 1,000 images (float16)"],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
