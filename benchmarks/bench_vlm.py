"""Stage-2 training step (forward + backward + AdamW) at the reference shapes: SmolLM2-135M with LoRA r=64 on
q/k/v/o, the Q-Former and adapter training in full, 32 image tokens + 48 text tokens, batch 8, image features as
the feature cache gives them (`vision_hidden_states`, float16). Interleaved in one process, fp32 and bf16 autocast (bf16
where the device runs it natively, or with `--bf16 on`):

- the VLM step, and a bare SmolLM2 + LoRA step over the same number of tokens (80 text tokens): the VLM's overhead
  over its LM is `time(VLM) / time(bare LM) - 1`;
- achieved FLOP/s against the machine's matmul peak measured in the same run (a 2048^3 fp32 and bf16 matmul).

FLOPs are counted by torch's `FlopCounterMode` over one step as it executes: every matmul and attention kernel,
forward and backward (the frozen LM weights get an input-gradient matmul but no weight-gradient one; LoRA, Q-Former
and adapter get both). Elementwise work and the optimizer are not counted, so utilisation is a lower bound on how
busy the matmul units are.

    python benchmarks/bench_vlm.py [--quick] [--json out.json]
"""

from __future__ import annotations

import torch
from common import (
    interleaved_medians,
    lora_config,
    matmul_peak,
    parse_args,
    precisions,
    print_table,
    reference_config,
    stage2_batch,
    stage2_model,
    step_flops,
    training_step,
    write_json,
)
from peft import get_peft_model
from transformers import AutoModelForCausalLM


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(__doc__.splitlines()[0], argv)
    batch = 2 if args.tiny else 4 if args.quick else 8
    steps = 2 if args.quick else 5
    text_tokens = 48
    torch.manual_seed(0)
    config = reference_config(args.tiny)
    lm_tokens = config.num_query_tokens + text_tokens

    vlm = stage2_model(config)
    bare_lm = get_peft_model(
        AutoModelForCausalLM.from_config(config.text_config),
        lora_config(["q_proj", "k_proj", "v_proj", "o_proj"], None),
    )
    vlm_batch = stage2_batch(config, batch, text_tokens)
    lm_batch = stage2_batch(config, batch, lm_tokens, image=False)
    contenders, peaks = {}, {}
    for precision in precisions(args):
        autocast = precision == "bf16"
        contenders[f"VLM, {precision}"] = training_step(vlm, vlm_batch, autocast)
        contenders[f"bare LM + LoRA, {precision}"] = training_step(bare_lm, lm_batch, autocast)
        peaks[precision] = matmul_peak(torch.bfloat16 if autocast else torch.float32)
    flops = {name: step_flops(step) for name, step in contenders.items()}
    seconds = interleaved_medians(contenders, steps)

    def figures_for(precision: str) -> dict[str, float]:
        vlm_name, lm_name = f"VLM, {precision}", f"bare LM + LoRA, {precision}"
        return {
            "samples_per_s": batch / seconds[vlm_name],
            "tflops_per_s": flops[vlm_name] / seconds[vlm_name] / 1e12,
            "overhead_vs_bare_lm": seconds[vlm_name] / seconds[lm_name] - 1,
            "flop_overhead_vs_bare_lm": flops[vlm_name] / flops[lm_name] - 1,
        }

    per_precision = {precision: figures_for(precision) for precision in peaks}
    figures = {
        **per_precision,
        **{
            f"utilisation_of_{precision}_peak": flops[f"VLM, {precision}"] / seconds[f"VLM, {precision}"] / peak
            for precision, peak in peaks.items()
        },
        "overhead_vs_bare_lm": per_precision["fp32"]["overhead_vs_bare_lm"],
        "matmul_peak_tflops": {precision: peak / 1e12 for precision, peak in peaks.items()},
        "gflops_per_step": {name: f / 1e9 for name, f in flops.items()},
        "batch_size": batch,
    }
    rows = []
    for name, s in seconds.items():
        precision = name.split(", ")[1]
        achieved = flops[name] / s
        rows.append([name, s, batch / s, flops[name] / 1e9, achieved / 1e9, f"{achieved / peaks[precision]:.0%}"])
    print_table(
        f"Stage-2 training step, batch {batch}, {config.num_query_tokens} image + {text_tokens} text tokens "
        f"(median of {steps})",
        ["contender", "s/step", "samples/s", "GFLOP/step", "GFLOP/s", "of matmul peak"],
        rows,
        [
            "matmul peak: " + ", ".join(f"{p} {peak / 1e9:.0f} GFLOP/s" for p, peak in peaks.items()),
            *(
                f"{p}: overhead over the bare LM {f['overhead_vs_bare_lm']:+.1%} in time, "
                f"{f['flop_overhead_vs_bare_lm']:+.1%} in FLOPs (goal <= 15%)"
                for p, f in per_precision.items()
            ),
            f"utilisation of the fp32 peak: {figures['utilisation_of_fp32_peak']:.0%} (goal >= 50%)",
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
