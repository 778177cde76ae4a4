"""What the benchmark scripts share: arguments, the interleaved timing loop, tables, JSON, reference models and
batches, the measured matmul peak and FLOP counting.

Every script compares its contenders in one process, one step of each in turn (so a load change on a shared machine
hits all of them alike), and reports medians and ratios with the load average next to the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from smolvlm_qformer import SmolVLMQFormerConfig, SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.hardware import bf16_is_fast, describe_cpu
from smolvlm_qformer.modeling_smolvlm_qformer import scored_positions
from smolvlm_qformer.testing_utils import tiny_config, tiny_processor
from smolvlm_qformer.training import ModelArguments

# --------------------------------------------------------------------------------------------------------------
# Arguments, timing, output
# --------------------------------------------------------------------------------------------------------------


def parse_args(
    description: str, argv: list[str] | None = None, more: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The flags every script takes: --json PATH, --quick (a run of seconds), --tiny (test-sized shapes), --bf16;
    `more` adds a script's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="few steps and small batches: a run of seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the reference shapes (tests)")
    parser.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="also time bf16 contenders: auto = where the device runs bf16 natively (on an AVX2-only CPU it is "
        "emulated, ~60x slower than fp32)",
    )
    parser.add_argument(
        "--compile",
        choices=["on", "off"],
        default="on",
        help="also time torch.compile contenders (inductor), where a script has some; their warm-up is reported apart",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: torch's own). On cores shared with other jobs, 1 keeps a step from "
        "waiting on a thread the scheduler has parked",
    )
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def precisions(args: argparse.Namespace, device: torch.device | str = "cpu") -> list[str]:
    """The precisions to time: fp32, and bf16 where `--bf16` (by default the hardware) says so."""
    with_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and bf16_is_fast(device))
    return ["fp32", "bf16"] if with_bf16 else ["fp32"]


def machine_note() -> str:
    """The CPU facts that timings depend on, for the line under every table."""
    return "CPU: " + ", ".join(f"{name} {value}" for name, value in describe_cpu().items())


def load_average() -> str:
    return "load average (1/5/15 min): " + " / ".join(f"{load:.2f}" for load in os.getloadavg())


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_seconds(
    contenders: dict[str, Callable[[], object]], steps: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each contender's seconds: the total of `warmup` rounds (a compiled contender compiles there), then each of
    `steps` rounds that call every contender once, in turn, so that a change of machine load affects them all
    alike."""
    warmup_seconds = dict.fromkeys(contenders, 0.0)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(warmup + steps):
        for name, step in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index < warmup:
                warmup_seconds[name] += time.perf_counter() - start
            else:
                seconds[name].append(time.perf_counter() - start)
    return warmup_seconds, seconds


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], steps: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Median seconds per call of each contender (`interleaved_seconds`)."""
    _, seconds = interleaved_seconds(contenders, steps, warmup, device)
    return {name: statistics.median(values) for name, values in seconds.items()}


def spread(values: list[float]) -> str:
    """The range of `values` as a ratio of their median, e.g. "0.91-1.32x": how far one run can stray."""
    median = statistics.median(values)
    return f"{min(values) / median:.2f}-{max(values) / median:.2f}x"


def print_table(title: str, header: list[str], rows: list[list[Any]], notes: list[str] = ()) -> None:
    """A Markdown table under `title`, followed by the machine's load average and any notes."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print(f"\n{load_average()}; {machine_note()}")
    for note in notes:
        print(note)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    """Writes `figures` (plus the load average) to `path`, when given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"load_average": list(os.getloadavg()), "cpu": describe_cpu()}
    path.write_text(json.dumps({**figures, **machine}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Reference models and batches (random weights: nothing is downloaded)
# --------------------------------------------------------------------------------------------------------------


def reference_config(tiny: bool = False) -> SmolVLMQFormerConfig:
    """The reference shapes (ViT-B/16, DistilBERT-base Q-Former with 32 queries, SmolLM2-135M), or the tests' tiny
    model with `tiny`."""
    return tiny_config(tiny_processor()) if tiny else SmolVLMQFormerConfig()


def stage2_model(
    config: SmolVLMQFormerConfig, lora_dropout: float | None = None, attn_implementation: str | None = None
) -> PeftModel:
    """The stage-2 model wrapped for LoRA as `training.run.build_stage2` wraps it (r=64 on q/k/v/o by default; the
    Q-Former's query path and the adapter train in full); `lora_dropout` and the LM's `attn_implementation` default
    to `ModelArguments`' and the LM's own."""
    model = SmolVLMQFormerForConditionalGeneration(config)
    if attn_implementation is not None:
        model.model.language_model.set_attn_implementation(attn_implementation)
    return get_peft_model(model, lora_config(model.lora_target_modules(), lora_dropout=lora_dropout))


def lora_config(
    target_modules: str | list[str],
    modules_to_save: list[str] | None = tuple(SmolVLMQFormerForConditionalGeneration.trained_modules),
    lora_dropout: float | None = None,
):
    """`build_stage2`'s LoRA settings (the `ModelArguments` defaults, or `lora_dropout`) for the given target
    modules."""
    defaults = ModelArguments()
    return LoraConfig(
        r=defaults.lora_r,
        lora_alpha=defaults.lora_alpha,
        lora_dropout=defaults.lora_dropout if lora_dropout is None else lora_dropout,
        target_modules=target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )


def random_images(size: int, count: int) -> list[Image.Image]:
    """`count` RGB images of random pixels, `size` x `size`."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def stage1_text(config: SmolVLMQFormerConfig, batch: int, length: int, device: torch.device | str = "cpu"):
    """Random caption ids ([CLS] first) with the last quarter of every other caption padded."""
    input_ids = torch.randint(5, config.qformer_config.vocab_size, (batch, length), device=device)
    input_ids[:, 0] = 2
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, length - length // 4 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def stage2_batch(
    config: SmolVLMQFormerConfig, batch: int, text_tokens: int, image: bool = True, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A chat-like stage-2 batch: `num_query_tokens` image placeholders (when `image`) then `text_tokens` text
    tokens, loss on the last third; with `image`, (B, N, Dv) float16 image features as a feature cache gives them.
    Without `image` (a bare LM's batch), the LM computes logits only where a label scores them, as the VLM does in
    training (`scored_positions`), so that both do the same LM work. No KV cache is built, as `VLMTrainer` trains."""
    text_ids = torch.randint(3, config.text_config.vocab_size, (batch, text_tokens), device=device)
    labels = text_ids.masked_fill(torch.arange(text_tokens, device=device) < text_tokens * 2 // 3, -100)
    if not image:
        scored, shift_labels = scored_positions(labels)  # the same positions in every row
        return {
            "input_ids": text_ids,
            "attention_mask": torch.ones_like(text_ids),
            "labels": labels,
            "logits_to_keep": scored[0].nonzero().squeeze(-1),
            "shift_labels": shift_labels.view(batch, -1),
            "use_cache": False,
        }
    image_ids = torch.full((batch, config.num_query_tokens), config.image_token_id, device=device)
    input_ids = torch.cat([image_ids, text_ids], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.cat([torch.full_like(image_ids, -100), labels], dim=1),
        "vision_hidden_states": cached_image_features(config, batch, device),
        "use_cache": False,
    }


def cached_image_features(config: SmolVLMQFormerConfig, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random (B, N, Dv) float16 vision features, as the feature cache gives them (N = patches + [CLS])."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return torch.randn(batch, tokens, vision.hidden_size, device=device, dtype=torch.float16)


def compile_decoder_layers(model: nn.Module) -> nn.Module:
    """`model` with its LM's decoder layers compiled in place (inductor): regional compilation, the layers sharing
    one graph (no KV cache, so no per-layer guard), which compiles in a fraction of the whole model's time."""
    for layer in model.get_decoder().layers:
        layer.compile()
    return model


def training_step(
    model: nn.Module, batch: Callable[[], dict[str, torch.Tensor]] | dict[str, torch.Tensor], autocast: bool = False
) -> Callable[[], None]:
    """A forward + backward + AdamW step of `model`'s trainable parameters on `batch` (or on what `batch()`
    returns, called inside the timed step), optionally under bf16 autocast."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    device_type = next(model.parameters()).device.type

    def step() -> None:
        inputs = batch() if callable(batch) else batch
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------------------------------------------
# Machine peak and FLOP counting
# --------------------------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 2048, repeats: int = 3) -> float:
    """Measured FLOP/s of a large square matmul (best of `repeats`): the machine's practical peak for `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# CPU SDPA runs its own flash kernel, which `FlopCounterMode` has no formula for: count it as the other SDPA kernels.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def step_flops(step: Callable[[], None]) -> int:
    """Matmul and attention FLOPs of one call of `step`, forward and backward, as torch executes them
    (`FlopCounterMode`: frozen weights get no weight-gradient matmul; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()
