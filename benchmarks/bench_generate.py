"""Captioning speed at the reference shapes (ViT-B/16 at 224, DistilBERT-base Q-Former with 32 queries,
SmolLM2-135M): one image from pixels (vision encoder + Q-Former + adapter + exactly 30 new tokens, greedy, KV cache)
for latency, and a batch of 16 images for throughput, interleaved in one process, fp32 and (where the device runs
it natively, or with `--bf16 on`) bf16; with `--compile on`, also a copy of each model whose generation is compiled
(`inference.compile_generation`: static KV cache, compiled decoding), its compilation in the warm-up column.

    python benchmarks/bench_generate.py [--quick] [--threads N] [--compile on|off] [--json out.json]
"""

from __future__ import annotations

import copy
import statistics

import torch
from common import interleaved_seconds, parse_args, precisions, print_table, reference_config, spread, write_json

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.inference import compile_generation

NEW_TOKENS = 30


def caption_step(model: SmolVLMQFormerForConditionalGeneration, pixel_values: torch.Tensor):
    """One captioning call: the image alone, so the prompt is the model's default captioning prompt."""

    def step() -> torch.Tensor:
        return model.generate(
            pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(__doc__.splitlines()[0], argv)
    batch = 2 if args.tiny else 4 if args.quick else 16
    repeats = 2 if args.quick else 5
    torch.manual_seed(0)
    config = reference_config(args.tiny)
    vision = config.vision_config
    pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    models = {p: SmolVLMQFormerForConditionalGeneration(config).to(dtypes[p]).eval() for p in precisions(args)}
    if args.compile == "on":
        for precision in list(models):
            models[f"{precision}, compiled"] = copy.deepcopy(models[precision])
            compile_generation(models[f"{precision}, compiled"])
    contenders, images_per_call = {}, {}
    for precision, model in models.items():
        dtype = next(model.parameters()).dtype
        for images, name in ((1, f"1 image, {precision}"), (batch, f"{batch} images, {precision}")):
            contenders[name] = caption_step(model, pixels[:images].to(dtype))
            images_per_call[name] = images
    generated = contenders["1 image, fp32"]()
    assert generated.shape == (1, NEW_TOKENS), generated.shape
    warmup, runs = interleaved_seconds(contenders, repeats)
    seconds = {name: statistics.median(values) for name, values in runs.items()}

    latency = {precision: seconds[f"1 image, {precision}"] for precision in models}
    throughput = {precision: batch / seconds[f"{batch} images, {precision}"] for precision in models}
    best = min(latency, key=latency.get)
    figures = {
        "caption_latency_s": latency[best],
        "caption_latency_precision": best,
        "caption_latency_s_by_precision": latency,
        "images_per_s": throughput,
        "batch_size": batch,
        "new_tokens": NEW_TOKENS,
    }
    rows = [[name, s, spread(runs[name]), warmup[name], images_per_call[name] / s] for name, s in seconds.items()]
    print_table(
        f"Captioning: {NEW_TOKENS} new tokens, greedy with KV cache, from pixels (median of {repeats})",
        ["contender", "s/call", "spread", "warm-up s", "images/s"],
        rows,
        [
            f"caption latency: {latency[best]:.2f} s ({best}; goal <= 1 s on 2 CPU cores)",
            f"torch threads: {torch.get_num_threads()}; spread: the fastest and slowest call over the median",
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
