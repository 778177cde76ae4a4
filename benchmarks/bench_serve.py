"""Serving speed: captioning 64 images with vLLM (its offline `LLM`: the transformers backend on the folder's remote
code) against transformers' `generate` (batches of 16, KV cache), interleaved in one process: images/s for exactly
30 new tokens each (greedy), and the time to first token (from handing over all 64 images until each has its first
token: the same run with one new token).

    python benchmarks/bench_serve.py [--quick] [--tiny | --folder FOLDER] [--json out.json]

Runs in the vLLM environment (`docs/serving.md`). The default model has the reference shapes (ViT-B/16 at
224, DistilBERT-base Q-Former with 32 queries, SmolLM2-135M) with random weights, built and saved in-process
(nothing is downloaded), except for the LM's vocabulary: the in-process tokenizer's 384 tokens instead of SmolLM2's
49152, a smaller LM head for both contenders. `--folder` times a saved model instead (the demo's, say). vLLM's CPU
engine uses every core here (by default it keeps one for its scheduler), as torch does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from common import interleaved_medians, parse_args, precisions, print_table, random_images, write_json
from transformers import AutoModelForImageTextToText, AutoProcessor

from smolvlm_qformer import SmolVLMQFormerConfig, SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.configuration_smolvlm_qformer import SMOLLM2_135M
from smolvlm_qformer.testing_utils import tiny_config, tiny_generation_model, tiny_processor

NEW_TOKENS = 30
BATCH_SIZE = 16  # `generate`'s images per call, as bench_generate's throughput figure
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_model(folder: Path, tiny: bool) -> None:
    """A random-weight model + processor at the reference shapes (or the tests' tiny ones, with heads 32 wide as
    vLLM's CPU attention needs), saved to `folder`."""
    torch.manual_seed(0)
    if tiny:
        processor = tiny_processor()
        config = tiny_config(processor)
        config.text_config.head_dim = 32
        model = tiny_generation_model(config)
    else:
        processor = tiny_processor(image_size=224, num_query_tokens=32)
        tokenizer = processor.tokenizer
        text_config = {**SMOLLM2_135M, "vocab_size": len(tokenizer) - 1, "pad_token_id": None}
        text_config |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = SmolVLMQFormerConfig.for_processor(processor, text_config=text_config)
        model = SmolVLMQFormerForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def vllm_step(llm, requests: list[dict], new_tokens: int):
    """All the requests in one `LLM.generate` call (vLLM batches them as it schedules); exactly `new_tokens` each."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def step() -> list[list[int]]:
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    return step


def generate_step(model, processor, images: list, prompt: str, new_tokens: int):
    """The images `BATCH_SIZE` at a time through the processor and `generate`; exactly `new_tokens` each."""

    def step() -> list[list[int]]:
        tokens = []
        for start in range(0, len(images), BATCH_SIZE):
            chunk = images[start : start + BATCH_SIZE]
            batch = processor(images=chunk, text=[prompt] * len(chunk)).to(model.device)
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                ids = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            tokens += ids[:, batch["input_ids"].shape[1] :].tolist()
        return tokens

    return step


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        lambda parser: parser.add_argument("--folder", type=Path, help="a saved model folder to time instead"),
    )
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM

    count = 8 if args.quick else 64
    runs = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch) / "model"
        if args.folder is None:
            save_model(folder, args.tiny)
        # both contenders run the folder's remote code
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        size = processor.image_processor.size["height"]
        images, prompt = random_images(size, count), processor.build_prompt()
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
        contenders = {}
        for precision in precisions(args):
            dtype = DTYPES[precision]
            model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
            llm = LLM(
                model=str(folder),
                trust_remote_code=True,
                dtype=dtype,
                enforce_eager=True,
                limit_mm_per_prompt={"image": 1},
                kv_cache_memory_bytes=1 << 30,  # room for all the requests at once
                enable_prefix_caching=False,  # repeated runs of the same images must not reuse their prefill
                mm_processor_cache_gb=0,  # nor their preprocessed pixels
            )
            for new_tokens, what in ((NEW_TOKENS, ""), (1, ", first token")):
                contenders[f"vLLM{what}, {precision}"] = vllm_step(llm, requests, new_tokens)
                contenders[f"generate{what}, {precision}"] = generate_step(model, processor, images, prompt, new_tokens)

        # one untimed round (the warmup) that also checks what the contenders produce
        produced = {name: step() for name, step in contenders.items()}
        for name, tokens in produced.items():
            expected = 1 if "first token" in name else NEW_TOKENS
            assert [len(t) for t in tokens] == [expected] * count, (name, [len(t) for t in tokens])
        seconds = interleaved_medians(contenders, runs, warmup=0)

    figures = {"images": count, "new_tokens": NEW_TOKENS, "generate_batch_size": BATCH_SIZE, "by_precision": {}}
    rows = []
    for precision in precisions(args):
        vllm_s, generate_s = seconds[f"vLLM, {precision}"], seconds[f"generate, {precision}"]
        vllm_ttft, generate_ttft = (
            seconds[f"vLLM, first token, {precision}"],
            seconds[f"generate, first token, {precision}"],
        )
        vllm_tokens, generate_tokens = produced[f"vLLM, {precision}"], produced[f"generate, {precision}"]
        same = sum(a == b for a, b in zip(vllm_tokens, generate_tokens, strict=True))
        figures["by_precision"][precision] = {
            "images_per_s": {"vllm": count / vllm_s, "generate": count / generate_s},
            "time_to_first_token_s": {"vllm": vllm_ttft, "generate": generate_ttft},
            "ratio_images_per_s": generate_s / vllm_s,
            "ratio_time_to_first_token": generate_ttft / vllm_ttft,
            "same_greedy_tokens": same,
        }
        rows.append([f"vLLM, {precision}", vllm_s, count / vllm_s, vllm_ttft, f"{same}/{count}"])
        rows.append([f"generate (batch {BATCH_SIZE}), {precision}", generate_s, count / generate_s, generate_ttft, ""])
    first_precision = precisions(args)[0]
    first = figures["by_precision"][first_precision]
    ttft = first["time_to_first_token_s"]
    figures |= {key: first[key] for key in ("ratio_images_per_s", "ratio_time_to_first_token")}
    model_name = str(args.folder) if args.folder else "tiny" if args.tiny else "reference shapes, random weights"
    print_table(
        f"Captioning {count} images, {NEW_TOKENS} new tokens each, greedy ({model_name}; median of {runs})",
        ["contender", f"s / {count} images", "images/s", "time to first token (s)", "same tokens as generate"],
        rows,
        [
            f"vLLM vs generate ({first_precision}): {first['ratio_images_per_s']:.2f}x the images/s; time to first "
            f"token {ttft['vllm']:.3g} s vs {ttft['generate']:.3g} s (all {count} images handed over at once)"
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":  # vLLM starts its engine process with spawn: nothing may run at import
    main()
