"""Stage-2 training step (forward + backward + AdamW) at the reference shapes: SmolLM2-135M with LoRA r=64 on
q/k/v/o, the Q-Former and adapter training in full, 32 image tokens + 48 text tokens, batch 8, image features as
the feature cache gives them (`vision_hidden_states`, float16). Interleaved in one process, on the same batch, fp32 and
bf16 autocast (bf16 where the device runs it natively, or with `--bf16 on`):

- the VLM step as `build_stage2` builds it by default (LoRA dropout 0.1, the LM's own attention, SDPA), and a bare
  SmolLM2 + LoRA step over the same number of tokens (80 text tokens): the VLM's overhead over its LM is
  `time(VLM) / time(bare LM) - 1`;
- the levers, each against that default: its LM's decoder layers compiled (`compile_decoder_layers`; with
  `--compile on`: the compilation is in the warm-up column), LoRA dropout 0 (peft then skips the dropout module), and
  the LM's eager attention instead of SDPA;
- achieved FLOP/s against the machine's matmul peak measured in the same run (a 2048^3 fp32 and bf16 matmul).

FLOPs are counted by torch's `FlopCounterMode` over one step as it executes: every matmul and attention kernel,
forward and backward (the frozen LM weights get an input-gradient matmul but no weight-gradient one; LoRA, Q-Former
and adapter get both). Elementwise work and the optimizer are not counted, so utilisation is a lower bound on how
busy the matmul units are. A compiled step does the default's matmuls: it is credited with the default's FLOPs.

    python benchmarks/bench_vlm.py [--quick] [--threads N] [--compile on|off] [--json out.json]
"""

from __future__ import annotations

import statistics

import torch
from common import (
    compile_decoder_layers,
    interleaved_seconds,
    lora_config,
    matmul_peak,
    parse_args,
    precisions,
    print_table,
    reference_config,
    spread,
    stage2_batch,
    stage2_model,
    step_flops,
    training_step,
    write_json,
)
from peft import get_peft_model
from transformers import AutoModelForCausalLM

# each lever's model, against the default VLM's (`stage2_model`'s keyword arguments)
LEVER_MODELS = {"LoRA dropout 0": {"lora_dropout": 0.0}, "eager attention": {"attn_implementation": "eager"}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(__doc__.splitlines()[0], argv)
    batch = 2 if args.tiny else 4 if args.quick else 8
    steps = 2 if args.quick else 5
    text_tokens = 48
    torch.manual_seed(0)
    config = reference_config(args.tiny)
    lm_tokens = config.num_query_tokens + text_tokens

    vlm = stage2_model(config)
    levers = {name: stage2_model(config, **kwargs) for name, kwargs in LEVER_MODELS.items()}
    if args.compile == "on":
        levers["compiled"] = compile_decoder_layers(stage2_model(config))
    bare_lm = get_peft_model(
        AutoModelForCausalLM.from_config(config.text_config),
        lora_config(["q_proj", "k_proj", "v_proj", "o_proj"], None),
    )
    vlm_batch = stage2_batch(config, batch, text_tokens)
    lm_batch = stage2_batch(config, batch, lm_tokens, image=False)
    contenders, peaks, flops = {}, {}, {}
    for precision in precisions(args):
        autocast = precision == "bf16"
        contenders[f"VLM, {precision}"] = training_step(vlm, vlm_batch, autocast)
        contenders[f"bare LM + LoRA, {precision}"] = training_step(bare_lm, lm_batch, autocast)
        for name, model in levers.items():
            contenders[f"VLM, {precision}, {name}"] = training_step(model, vlm_batch, autocast)
        for name, step in contenders.items():
            if name not in flops:  # counted eagerly: a compiled step does the default's matmuls
                flops[name] = flops[f"VLM, {precision}"] if name.endswith("compiled") else step_flops(step)
        peaks[precision] = matmul_peak(torch.bfloat16 if autocast else torch.float32)
    warmup, runs = interleaved_seconds(contenders, steps)
    seconds = {name: statistics.median(values) for name, values in runs.items()}

    def figures_for(precision: str) -> dict[str, float]:
        vlm_name, lm_name = f"VLM, {precision}", f"bare LM + LoRA, {precision}"
        return {
            "samples_per_s": batch / seconds[vlm_name],
            "tflops_per_s": flops[vlm_name] / seconds[vlm_name] / 1e12,
            "overhead_vs_bare_lm": seconds[vlm_name] / seconds[lm_name] - 1,
            "flop_overhead_vs_bare_lm": flops[vlm_name] / flops[lm_name] - 1,
        }

    def utilisation(name: str) -> float:
        return flops[name] / seconds[name] / peaks[name.split(", ")[1]]

    def default_of(name: str) -> str:
        """The contender a lever changes ("VLM, fp32, compiled" -> "VLM, fp32"); the others are their own."""
        return ", ".join(name.split(", ")[:2])

    per_precision = {precision: figures_for(precision) for precision in peaks}
    figures = {
        **per_precision,
        **{f"utilisation_of_{precision}_peak": utilisation(f"VLM, {precision}") for precision in peaks},
        "overhead_vs_bare_lm": per_precision["fp32"]["overhead_vs_bare_lm"],
        "levers": {
            name: {
                "s_per_step": seconds[name],
                "speedup": seconds[default_of(name)] / seconds[name],
                "warmup_s": warmup[name],
                "utilisation": utilisation(name),
            }
            for name in seconds
            if default_of(name) != name
        },
        "matmul_peak_tflops": {precision: peak / 1e12 for precision, peak in peaks.items()},
        "gflops_per_step": {name: f / 1e9 for name, f in flops.items()},
        "batch_size": batch,
    }
    rows = []
    for name, s in seconds.items():
        rows.append(
            [
                name,
                s,
                spread(runs[name]),
                f"{seconds[default_of(name)] / s:.2f}x",
                warmup[name],
                batch / s,
                flops[name] / 1e9,
                flops[name] / s / 1e9,
                f"{utilisation(name):.0%}",
            ]
        )
    print_table(
        f"Stage-2 training step, batch {batch}, {config.num_query_tokens} image + {text_tokens} text tokens "
        f"(median of {steps} interleaved steps)",
        [
            "contender",
            "s/step",
            "spread",
            "vs the default",
            "warm-up s",
            "samples/s",
            "GFLOP/step",
            "GFLOP/s",
            "of matmul peak",
        ],
        rows,
        [
            f"torch threads: {torch.get_num_threads()}; spread: the fastest and slowest step over the median",
            "matmul peak: " + ", ".join(f"{p} {peak / 1e9:.0f} GFLOP/s" for p, peak in peaks.items()),
            *(
                f"{p}: overhead over the bare LM {f['overhead_vs_bare_lm']:+.1%} in time, "
                f"{f['flop_overhead_vs_bare_lm']:+.1%} in FLOPs (goal <= 15%)"
                for p, f in per_precision.items()
            ),
            f"utilisation of the fp32 peak: {figures['utilisation_of_fp32_peak']:.0%} (goal >= 70%)",
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
