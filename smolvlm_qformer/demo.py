"""`smolvlm-qformer demo`: both training stages on easy-VQA with the offline backbones, end to end on a CPU.

A runner of library stages: the backbones (`assets`), one pass of the frozen vision encoder over every image (the
feature cache both stages and the evaluation read), stage 1 and stage 2 as their recipes say
(`recipes/demo_stage1.yaml`, `recipes/demo_stage2.yaml`) on questions drawn by `data.easy_vqa`, the test split
scored beside its baselines (`evaluation.easy_vqa`), one printed table. It writes to `output_dir`: `metrics.json`,
`model/` (merged model, processor, adapter and model card), `stage1/` and three figures. Measurements and how the
defaults were chosen: `docs/benchmarks.md`, `docs/experiments/demo.md`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import HfArgumentParser, set_seed

from .assets import BASE_MODELS, AssetPaths, fetch_assets
from .cli import read_recipe
from .data import (
    DataArguments,
    IndexedDataset,
    PromptConfig,
    build_feature_cache,
    decode_image,
    load_image_text_dataset,
)
from .data import easy_vqa as data
from .demo_figures import plot_examples, plot_losses, plot_query_attention
from .evaluation import easy_vqa as scores
from .evaluation import retrieval_recall_at_k, retrieval_scores
from .hardware import BF16_CHOICES, describe_cpu, inference_dtype, resolve_bf16
from .inference import generate_texts, load_for_inference
from .model_card import try_it_command, write_demo_model_card
from .training import ModelArguments, SmolVLMTrainingArguments, build_stage1, build_stage2, fit_stage1, fit_stage2

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "recipes"
STAGE_ARGUMENTS = (ModelArguments, DataArguments, SmolVLMTrainingArguments)
# Minutes of the default run on 2 cores by the precision its frozen LM gets (`docs/benchmarks.md`): the one table
# behind the ETA the demo prints at its start.
DEFAULT_RUN_MINUTES = {"bf16": "8-14", "float32": "28-56"}
# Stage 2's yes/no questions answer as worded this often (easy-VQA's own 82% lets stage 2 answer them from the wording)
DEFAULT_YES_NO_WORDING_SHARE = 0.65
# DemoArguments field -> (stage, recipe key) it overrides where given
RECIPE_OVERRIDES = {
    "stage1_epochs": ("stage1", "num_train_epochs"),
    "stage1_batch_size": ("stage1", "per_device_train_batch_size"),
    "stage2_epochs": ("stage2", "num_train_epochs"),
    "stage2_batch_size": ("stage2", "per_device_train_batch_size"),
    "stage2_learning_rate": ("stage2", "learning_rate"),
}


@dataclass
class DemoArguments:
    """What the demo draws from easy-VQA, which recipes train it, and where it writes; `None` keeps the recipe's."""

    output_dir: str | None = None
    """Default: a new `smolvlm-qformer-demo-YYYYMMDD-HHMMSS` folder in the current directory."""
    assets_dir: str | None = None
    """The backbone cache of `fetch_assets` (default: $SMOLVLM_QFORMER_CACHE or ~/.cache/smolvlm_qformer/assets)."""
    stage1_recipe: str = str(RECIPES / "demo_stage1.yaml")
    stage2_recipe: str = str(RECIPES / "demo_stage2.yaml")
    train_images: int | None = None
    """Use the first N of the 4,000 training images (default: all)."""
    train_questions: int | None = 9000
    """Stage-2 questions drawn from those images' 38,575 (None: all)."""
    yes_no_wording_share: float | None = None
    """Share of the drawn yes/no questions that answer as their wording suggests (`easy_vqa.question_indices`);
    default 0.65 where `train_questions` is set."""
    questions_per_image: int | None = None
    """Questions drawn per image (0: independently). Default: 3 with `conversations`, else 0."""
    train_captions: int | None = 600
    """Stage-2 caption rows drawn beside the questions (None: all; with `questions_per_image`, of those images)."""
    test_questions: int | None = 1000
    test_images: int | None = None
    """Use the first N of the 1,000 test images (default: all)."""
    test_captions: int | None = 300
    conversations: bool = True
    """Stage 2 trains one conversation per image (its questions learned as if asked alone); false: one row each."""
    stage1_epochs: float | None = None
    stage2_epochs: float | None = None
    stage1_batch_size: int | None = None
    stage2_batch_size: int | None = None
    """Default: the recipe's 5 conversations with `conversations`, else 16 rows."""
    stage2_learning_rate: float | None = None
    num_query_tokens: int | None = None
    lora_r: int | None = None
    """LoRA rank (alpha follows at 2x)."""
    image_size: int | None = 56
    """Side the vision encoder sees (easy-VQA's images are 64 px; 56 = 4 x 4 DINOv2 patches). None: the processor's."""
    max_new_tokens: int = 6
    bf16: str = field(default="auto", metadata={"choices": list(BF16_CHOICES)})
    """The saved model's dtype when the demo evaluates it: auto (bf16 where the device runs it natively), true or
    false; recorded as `inference_bf16` in metrics.json. (Training precision is the recipes'.)"""
    device: str | None = None
    """Default: cuda when available, else cpu."""
    seed: int = 42

    def __post_init__(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.questions_per_image is None:
            self.questions_per_image = 3 if self.conversations else 0
        if self.yes_no_wording_share is None and self.train_questions is not None:
            self.yes_no_wording_share = DEFAULT_YES_NO_WORDING_SHARE


def stage_settings(args: DemoArguments, backbones: AssetPaths, output_dir: Path) -> dict[str, dict[str, Any]]:
    """Each stage's recipe with the demo's backbones, folders, seed, device and flags."""
    common = {
        "vision_model": str(backbones.vision),
        "qformer_model": str(backbones.qformer),
        "language_model": str(backbones.language_model),
        "seed": args.seed,
        "use_cpu": args.device == "cpu",
    }
    if args.num_query_tokens is not None:
        common["num_query_tokens"] = args.num_query_tokens
    settings = {
        "stage1": {**read_recipe(args.stage1_recipe), **common, "output_dir": str(output_dir / "stage1")},
        "stage2": {**read_recipe(args.stage2_recipe), **common, "output_dir": str(output_dir / "model")},
    }
    settings["stage2"]["stage1_model"] = settings["stage1"]["output_dir"]
    if args.device == "cpu":  # eager attention is faster than SDPA's CPU kernels on these short sequences
        settings["stage2"]["lm_attn_implementation"] = "eager"
    if not args.conversations:
        settings["stage2"] |= {"shuffle_turns": False, "independent_turns": False, "per_device_train_batch_size": 16}
    if args.lora_r is not None:
        settings["stage2"] |= {"lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r}
    for name, (stage, key) in RECIPE_OVERRIDES.items():
        if getattr(args, name) is not None:
            settings[stage][key] = getattr(args, name)
    return settings


def stage_arguments(settings: dict[str, Any]) -> tuple[ModelArguments, DataArguments, SmolVLMTrainingArguments]:
    return HfArgumentParser(STAGE_ARGUMENTS).parse_dict(settings)


def cpu_eta() -> str:
    """What the default run takes on this CPU kind (`DEFAULT_RUN_MINUTES`)."""
    cpu = describe_cpu()
    fast = cpu["bf16_is_fast"]
    minutes = DEFAULT_RUN_MINUTES["bf16" if fast else "float32"]
    kind = "where bf16 is fast (the frozen LM in bf16)" if fast else "where bf16 is not fast (everything in float32)"
    this_cpu = ", ".join(f"{name} {value}" for name, value in cpu.items())
    return f"the default run takes about {minutes} minutes on 2 cores of a CPU {kind}; this one: {this_cpu}"


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)
    logger.info("demo: %s took %.1f s", name, seconds[name])


def rows_of_images(data_args: DataArguments, split: str, image_paths: set[str]) -> datasets.Dataset:
    """The rows of `split` that `data_args` load (the easy-VQA source) whose image is one of `image_paths`."""
    rows = load_image_text_dataset(data_args, split).dataset
    return rows.filter(lambda path: path in image_paths, input_columns="image")


def run_demo(args: DemoArguments, backbones: AssetPaths | None = None) -> dict[str, Any]:
    """The whole demo; returns the metrics it writes to `output_dir/metrics.json`. `backbones` replaces the fetched
    assets (e.g. tiny stand-ins in tests)."""
    start, seconds = time.perf_counter(), {}
    output_dir = Path(args.output_dir or f"smolvlm-qformer-demo-{datetime.now():%Y%m%d-%H%M%S}")
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("demo: writing to %s (device %s)", output_dir, args.device)
    if args.device == "cpu":
        logger.info("demo: %s", cpu_eta())
    with _timed(seconds, "assets"):
        backbones = backbones or fetch_assets(args.assets_dir)
    settings = stage_settings(args, backbones, output_dir)
    model_args, data_args, training_args = stage_arguments(settings["stage1"])
    set_seed(args.seed)
    model, processor = build_stage1(model_args)
    if args.image_size is not None:
        processor.image_processor.size = {"height": args.image_size, "width": args.image_size}

    # One row per image (caption or None): the feature cache holds these, and every row reads its image's features.
    counts = {"train": args.train_images, "test": args.test_images}
    images = {split: data.first_rows(data.easy_vqa_dataset(split, "captions"), n) for split, n in counts.items()}
    paths = {split: set(rows["image"]) for split, rows in images.items()}
    with _timed(seconds, "feature_cache"):
        caches = {
            split: build_feature_cache(
                model.vision_model,
                processor.image_processor,
                IndexedDataset(rows),
                output_dir / "feature_cache" / split,
                batch_size=64,
                device=args.device,
            )
            for split, rows in images.items()
        }

    stage1_rows = rows_of_images(data_args, "train", paths["train"])
    with _timed(seconds, "stage1"):
        _, trainer = fit_stage1(
            model, processor, IndexedDataset(stage1_rows, caches["train"]), None, data_args, training_args
        )
    histories = {"stage 1 (ITC loss)": trainer.state.log_history}
    test_images = images["test"].filter(lambda caption: caption is not None, input_columns="caption")
    test_features = caches["test"].features(test_images["image"])
    with _timed(seconds, "retrieval_eval"):  # `evaluate`'s scoring, on cached features
        texts = sorted(set(test_images["caption"]))
        positives = torch.tensor([[caption == text for text in texts] for caption in test_images["caption"]])
        retrieval = retrieval_scores(model.eval(), processor, test_features, texts)
        recall = retrieval_recall_at_k(retrieval.image_to_text, positives, scores.RECALL_KS, retrieval.text_to_image)
    del model, trainer

    model_args, data_args, training_args = stage_arguments(settings["stage2"])
    train_rows = rows_of_images(data_args, "train", paths["train"])
    stage2 = data.stage2_data(
        train_rows,
        args.train_questions,
        args.train_captions,
        args.seed,
        args.yes_no_wording_share,
        args.questions_per_image,
        args.conversations,
    )
    logger.info("demo: stage 2 on %d questions + %d captions", stage2.num_questions, stage2.num_captions)
    with _timed(seconds, "stage2"):
        set_seed(args.seed)
        vlm, processor = build_stage2(model_args, device=args.device)
        _, trainer = fit_stage2(
            vlm, processor, IndexedDataset(stage2.train, caches["train"]), None, data_args, training_args
        )
    histories["stage 2 (LM loss on answers)"] = trainer.state.log_history
    del vlm, trainer

    # The saved folder, loaded as anyone would (`inference.load_for_inference`), answers the test questions.
    inference_bf16 = resolve_bf16(args.bf16, args.device)
    model, processor = load_for_inference(
        training_args.output_dir, args.device, inference_dtype(inference_bf16, args.device)
    )
    test_questions, _ = data.questions_and_captions(rows_of_images(data_args, "test", paths["test"]))
    test_questions = data.sample_rows(test_questions, args.test_questions, args.seed)
    caption_images = data.sample_rows(test_images, args.test_captions, args.seed)
    system_prompt = PromptConfig.from_json(data_args.prompts_file).system_prompts[0]
    generation = {"system_prompt": system_prompt, "batch_size": 64, "max_new_tokens": args.max_new_tokens}
    question_features = caches["test"].features(test_questions["image"])
    caption_features = caches["test"].features(caption_images["image"])
    with _timed(seconds, "vqa_eval"):
        answers = list(generate_texts(model, processor, question_features, test_questions["question"], **generation))
    with _timed(seconds, "caption_eval"):
        generated_captions = list(generate_texts(model, processor, caption_features, **generation))
    truth = test_questions["answer"]
    metrics = {
        "vqa_accuracy": scores.exact_accuracy(answers, truth),
        "majority_baseline": scores.exact_accuracy([stage2.majority_answer] * len(truth), truth),
        "majority_answer": stage2.majority_answer,
        **scores.yes_no_metrics(test_questions["question"], truth, answers),
        "caption_accuracy": scores.exact_accuracy(generated_captions, caption_images["caption"]),
        **{name: value for name, value in recall.items() if name != "mean_recall"},
        "frozen_feature_baselines": scores.frozen_feature_baselines(
            caches,
            data.questions_and_captions(train_rows)[0],
            images["train"].filter(lambda caption: caption is not None, input_columns="caption"),
            test_questions,
            caption_images,
            test_images,
        ),
        "num_test_questions": len(test_questions),
        "num_test_images": len(test_images),
        "num_test_captions": len(caption_images),
        "num_train_images": len(images["train"]),
        "num_train_questions": stage2.num_questions,
        "num_train_captions": stage2.num_captions,
        "inference_bf16": inference_bf16,
        "seconds": seconds,
    }

    model_dir = training_args.output_dir
    write_demo_model_card(model_dir, metrics, settings, len(stage1_rows), args.image_size, system_prompt, BASE_MODELS)
    columns = (test_questions["image"][:8], test_questions["question"], answers, truth)
    examples = [
        dict(zip(("image", "question", "prediction", "answer"), row, strict=True))
        for row in zip(*columns, strict=False)
    ]
    plot_examples(output_dir / "examples.png", examples)
    plot_losses(output_dir / "loss_curves.png", histories)
    first_image = decode_image(test_images["image"][0])
    plot_query_attention(output_dir / "query_attention.png", model.model.qformer, first_image, test_features[0])
    seconds["total"] = round(time.perf_counter() - start, 1)
    (output_dir / "metrics.json").write_text(
        json.dumps({**metrics, "arguments": asdict(args), "settings": settings}, indent=2)
    )
    print(f"{scores.demo_table(metrics)}\n\nTry it in a browser: {try_it_command(model_dir)}")
    return metrics
