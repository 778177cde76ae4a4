"""`smolvlm-qformer evaluate`: a saved model scored on any split the data layer reads.

A stage-2 folder (`SmolVLMQFormerForConditionalGeneration`) generates greedily, in batches: one caption per image
for the rows without a question (CIDEr-D, BLEU-4 against every caption of that image) and one answer per distinct
question about an image (VQA accuracy, each row against its own answer). A stage-1 folder
(`SmolVLMQFormerForImageTextRetrieval`) is scored with image<->text R@1/5/10 over the split's images and distinct
captions, a caption matching every image it is given for. Unreadable images are skipped and counted.

Beside the model's figures, `evaluate_baselines` scores what the frozen vision features alone give on the same rows
(`baselines`: the nearest training image's caption or answer, and a linear probe for class-like captions).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import (
    DataArguments,
    FeatureCache,
    IndexedDataset,
    decode_or_skip,
    image_key,
    load_image_text_dataset,
    split_train_eval,
)
from ..data.collators import cut_to_tokens
from ..hardware import inference_dtype, resolve_bf16
from ..inference import generate_texts, load_for_inference
from .baselines import (
    exact_match_accuracy,
    is_class_like,
    linear_probe_predictions,
    nearest_targets,
    nearest_text_scores,
    pooled_image_features,
)
from .metrics import load_metric
from .retrieval import retrieval_recall_at_k, retrieval_scores

logger = logging.getLogger(__name__)

RETRIEVAL_ARCHITECTURE = "SmolVLMQFormerForImageTextRetrieval"
GENERATION_ARCHITECTURE = "SmolVLMQFormerForConditionalGeneration"
RECALL_KS = (1, 5, 10)


@dataclass
class EvaluateArguments:
    """Which model `evaluate` scores, on which split, and how it batches (the data comes from `DataArguments`)."""

    model: str
    """A trained model folder: stage 2 (captions / VQA) or stage 1 (retrieval), told apart by its config."""
    split: str | None = None
    """Default: `--eval_split`, or else the rows training held out (`--eval_fraction` of `--train_split`, drawn with
    `--seed`). `--max_samples N` keeps the first N rows of a named split, as in training (for the held-out rows give
    the training run's value); `--max_eval_samples N` the first N rows evaluated."""
    seed: int = 42
    """Must equal the training run's `--seed` to evaluate the rows it held out."""
    batch_size: int = 32
    max_new_tokens: int = 30
    device: str = "cpu"
    bf16: str = field(default="auto", metadata={"choices": ["auto", "true", "false"]})
    """Stage 2: run the model in bfloat16: auto (where the device runs it natively, `hardware.resolve_bf16`), true or
    false; what was decided is recorded as `bf16` in the results."""
    system_prompt: str | None = None
    """Stage 2: the system prompt of every generation (default: the chat template's own)."""
    itm_top_k: int | None = None
    """Stage 1: re-rank each image's and each text's top k with the ITM head."""
    output: str | None = None
    """Write the figures as JSON here."""
    baselines: bool = True
    """Also score the frozen-feature baselines (`evaluation.baselines`) against the training rows (`--train_split`,
    `--max_samples`, `--eval_fraction` and `--seed` as in training). They read the vision features of
    `--feature_cache` (`cache-features`' train and eval folders) and run the model's vision encoder over the images
    it does not hold: without a cache, over every training image."""


@dataclass
class EvaluationRows:
    """A split grouped by image: each image once, and what its generations are scored against."""

    images: dict[str, Any] = field(default_factory=dict)
    """image key -> the undecoded image (first row that names it)."""
    captions: dict[str, list[str]] = field(default_factory=dict)
    """image key -> the targets of its rows without a question (answer, else caption, as stage 2 trains)."""
    answers: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    """(image key, question) -> the answer of each row asking it (its caption where the data has no answer column);
    generated once, scored once per row."""
    retrieval_texts: dict[str, list[str]] = field(default_factory=dict)
    """image key -> its distinct captions (a row's caption, or the answer of a row without a question)."""
    num_rows: int = 0


def group_rows(rows: Iterable[dict[str, Any]]) -> EvaluationRows:
    """Groups canonical rows (image, caption / question / answer) by image and question."""
    grouped = EvaluationRows()
    for row in rows:
        grouped.num_rows += 1
        key = image_key(row["image"])
        grouped.images.setdefault(key, row["image"])
        question, target = row.get("question"), row.get("answer") or row.get("caption")
        if question:
            grouped.answers.setdefault((key, question), []).append(target)
        else:
            grouped.captions.setdefault(key, []).append(target)
        text = row.get("caption") or (None if question else target)
        texts = grouped.retrieval_texts.setdefault(key, [])
        if text and text not in texts:
            texts.append(text)
    return grouped


def load_split(data_args: DataArguments, split: str | None, seed: int) -> tuple[str, Iterable[dict[str, Any]]]:
    """(name, rows) of the split to evaluate: `split`, `--eval_split`, or the held-out share of the train split;
    at most `--max_eval_samples` rows."""
    split = split or data_args.eval_split
    if split is not None:
        name, dataset = f"{data_args.dataset}[{split}]", load_image_text_dataset(data_args, split)
    elif data_args.streaming or not data_args.eval_fraction:
        raise ValueError("no eval split: pass --split or --eval_split (or, without --streaming, an --eval_fraction)")
    else:
        dataset = split_train_eval(data_args, seed)[1]
        name = f"{data_args.dataset}[{data_args.train_split}, held-out {data_args.eval_fraction:g}, seed {seed}]"
    rows = dataset.dataset if isinstance(dataset, IndexedDataset) else dataset  # rows with undecoded images
    return name, itertools.islice(rows, data_args.max_eval_samples)


def model_architecture(path: str | Path) -> str:
    """The saved model's class name (config.json's `architectures`), or a `FileNotFoundError` / `ValueError`."""
    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} not found")
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    for architecture in (GENERATION_ARCHITECTURE, RETRIEVAL_ARCHITECTURE):
        if architecture in architectures:
            return architecture
    raise ValueError(
        f"{path} holds {architectures or 'an unnamed architecture'}, not a smolvlm-qformer stage-1 "
        f"({RETRIEVAL_ARCHITECTURE}) or stage-2 ({GENERATION_ARCHITECTURE}) model"
    )


def generation_metrics(
    captions: Sequence[str],
    caption_references: Sequence[Sequence[str]],
    answers: Sequence[str],
    answer_references: Sequence[str | Sequence[str]],
) -> dict[str, float]:
    """CIDEr-D and BLEU-4 of the captions (one per image, all scored together: CIDEr-D's IDF is the split's), their
    exact-match accuracy (`caption_accuracy`: a caption equal to one of the image's, after the VQA normalisation; what
    counts on class-like captions) and VQA accuracy of the answers (each against its annotators' answers, or one
    answer); a task without predictions is left out."""
    metrics = {}
    if captions:
        references = [list(refs) for refs in caption_references]
        metrics["cider_d"] = load_metric("cider_d").compute(predictions=captions, references=references)["cider_d"]
        metrics["bleu"] = load_metric("bleu").compute(predictions=captions, references=references)["bleu"]
        metrics["caption_accuracy"] = exact_match_accuracy(captions, references)
    if answers:
        references = [[refs] if isinstance(refs, str) else list(refs) for refs in answer_references]
        vqa = load_metric("vqa_accuracy").compute(predictions=answers, references=references)
        metrics["vqa_accuracy"] = vqa["vqa_accuracy"]
    return metrics


def evaluate_generation(
    folder: str, grouped: EvaluationRows, args: EvaluateArguments, data_args: DataArguments
) -> dict[str, Any]:
    """Stage 2: a caption per image and an answer per distinct question generated and scored, with the counts of
    what was scored."""
    model, processor = load_for_inference(folder, args.device, inference_dtype(args.bf16, args.device))
    items = [(key, None) for key in grouped.captions] + [
        (key, cut_to_tokens(processor.tokenizer, q, data_args.max_question_tokens) if q else q)
        for key, q in grouped.answers
    ]
    keys = [key for key, _ in items]
    texts = generate_texts(
        model,
        processor,
        [grouped.images[key] for key in keys],
        [question for _, question in items],
        names=keys,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    predictions = list(tqdm(texts, total=len(items), desc="generating", file=sys.stderr))
    unreadable = {key for key, prediction in zip(keys, predictions, strict=True) if prediction is None}
    caption_predictions, answer_predictions = predictions[: len(grouped.captions)], predictions[len(grouped.captions) :]
    captions = [
        (p, refs) for p, refs in zip(caption_predictions, grouped.captions.values(), strict=True) if p is not None
    ]
    answers = [  # one score per question row: the same question asked twice counts twice, each against its answer
        (p, answer)
        for p, row_answers in zip(answer_predictions, grouped.answers.values(), strict=True)
        if p is not None
        for answer in row_answers
    ]
    if not captions and not answers:
        raise ValueError(f"nothing to evaluate: all {len(unreadable)} images are unreadable")
    return {
        **generation_metrics(*_unzip(captions), *_unzip(answers)),
        "num_captioned_images": len(captions),
        "num_questions": len(answers),
        "skipped_images": len(unreadable),
    }


def _unzip(pairs: list[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    return [prediction for prediction, _ in pairs], [reference for _, reference in pairs]


def evaluate_retrieval_split(
    folder: str, grouped: EvaluationRows, args: EvaluateArguments, data_args: DataArguments
) -> dict[str, Any]:
    """Stage 1: R@K both ways over the split's readable images and its distinct captions; a caption is a positive
    of every image it is given for (so images sharing a caption do not count against each other)."""
    from ..modeling_smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval
    from ..processing_smolvlm_qformer import SmolVLMQFormerProcessor

    captioned = [key for key, texts in grouped.retrieval_texts.items() if texts]
    if not captioned:
        raise ValueError("retrieval needs captions and the split has none: set --caption_column")
    # decoded once to find the readable ones (and again, a batch at a time, by the processor while scoring)
    readable = [key for key in captioned if decode_or_skip(grouped.images[key], key) is not None]
    if not readable:
        raise ValueError(f"nothing to evaluate: all {len(captioned)} images are unreadable")
    texts = list(dict.fromkeys(text for key in readable for text in grouped.retrieval_texts[key]))
    positives = torch.tensor([[text in grouped.retrieval_texts[key] for text in texts] for key in readable])

    processor = SmolVLMQFormerProcessor.from_pretrained(folder)
    model = SmolVLMQFormerForImageTextRetrieval.from_pretrained(folder, use_safetensors=True)
    model = model.to(args.device).eval()
    scores = retrieval_scores(
        model,
        processor,
        [grouped.images[key] for key in readable],
        texts,
        batch_size=args.batch_size,
        itm_top_k=args.itm_top_k,
        max_length=data_args.max_caption_tokens,
    )
    return {
        **retrieval_recall_at_k(scores.image_to_text, positives, RECALL_KS, scores.text_to_image),
        "num_images": len(readable),
        "num_texts": len(texts),
        "skipped_images": len(captioned) - len(readable),
    }


def load_vision_encoder(folder: str, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The frozen vision encoder of a saved stage-1 or stage-2 folder, in eval mode on `device`, and its image
    processor."""
    from ..modeling_smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval
    from ..processing_smolvlm_qformer import SmolVLMQFormerProcessor

    if model_architecture(folder) == RETRIEVAL_ARCHITECTURE:
        model = SmolVLMQFormerForImageTextRetrieval.from_pretrained(folder, use_safetensors=True)
        vision_model, image_processor = model.vision_model, SmolVLMQFormerProcessor.from_pretrained(folder)
    else:
        model, image_processor = load_for_inference(folder, device)
        vision_model = model.model.vision_model
    return vision_model.to(device).eval(), image_processor.image_processor


@dataclass
class PooledImages:
    """The pooled vision features of a split's readable images (`baselines.pool_features`), by image key."""

    rows: dict[str, int]
    features: torch.Tensor

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def of(self, keys: Sequence[str]) -> torch.Tensor:
        return self.features[[self.rows[key] for key in keys]].view(len(keys), self.features.shape[-1])


def nearest_generation_baseline(
    grouped: EvaluationRows, train: EvaluationRows, pooled: PooledImages, train_pooled: PooledImages
) -> dict[str, float]:
    """`generation_metrics` of the nearest training image's caption for each captioned image, and of the answer of
    the nearest training image asked the same question for each question (empty, so wrong, where none was)."""
    train_items = [(key, None, captions[0]) for key, captions in train.captions.items() if key in train_pooled]
    train_items += [
        (key, question, Counter(answers).most_common(1)[0][0])
        for (key, question), answers in train.answers.items()
        if key in train_pooled
    ]
    caption_keys = [key for key in grouped.captions if key in pooled]
    queries = [(key, None) for key in caption_keys] + [query for query in grouped.answers if query[0] in pooled]
    predictions = nearest_targets(
        pooled.of([key for key, _ in queries]),
        [key for key, _ in queries],
        [question for _, question in queries],
        train_pooled.of([key for key, _, _ in train_items]),
        [key for key, _, _ in train_items],
        [question for _, question, _ in train_items],
        [target for _, _, target in train_items],
    )
    predictions = ["" if prediction is None else prediction for prediction in predictions]  # no neighbour: wrong
    caption_predictions = zip(predictions[: len(caption_keys)], caption_keys, strict=True)
    captions = [(prediction, grouped.captions[key]) for prediction, key in caption_predictions]
    answers = [  # one score per question row, as the model's
        (prediction, answer)
        for prediction, query in zip(predictions[len(caption_keys) :], queries[len(caption_keys) :], strict=True)
        for answer in grouped.answers[query]
    ]
    return generation_metrics(*_unzip(captions), *_unzip(answers))


def nearest_retrieval_baseline(
    grouped: EvaluationRows, train: EvaluationRows, pooled: PooledImages, train_pooled: PooledImages
) -> dict[str, float]:
    """R@K both ways when each image scores each text by its similarity to the nearest training image with it."""
    keys = [key for key, texts in grouped.retrieval_texts.items() if texts and key in pooled]
    if not keys:
        return {}
    texts = list(dict.fromkeys(text for key in keys for text in grouped.retrieval_texts[key]))
    train_keys = [key for key, texts in train.retrieval_texts.items() if texts and key in train_pooled]
    scores = nearest_text_scores(
        pooled.of(keys),
        keys,
        train_pooled.of(train_keys),
        train_keys,
        [train.retrieval_texts[key] for key in train_keys],
        texts,
    )
    positives = torch.tensor([[text in grouped.retrieval_texts[key] for text in texts] for key in keys])
    return retrieval_recall_at_k(scores, positives, RECALL_KS)


def probe_baseline(
    grouped: EvaluationRows, train: EvaluationRows, pooled: PooledImages, train_pooled: PooledImages
) -> dict[str, float] | None:
    """A linear probe's `caption_accuracy` where the training captions are class-like (`is_class_like`), else None."""
    train_keys = [key for key in train.captions if key in train_pooled]
    keys = [key for key in grouped.captions if key in pooled]
    train_captions = [train.captions[key] for key in train_keys]
    if not keys or not is_class_like(train_captions):
        return None
    labels = [captions[0] for captions in train_captions]
    predictions = linear_probe_predictions(train_pooled.of(train_keys), labels, pooled.of(keys))
    return {"caption_accuracy": exact_match_accuracy(predictions, [grouped.captions[key] for key in keys])}


def evaluate_baselines(
    args: EvaluateArguments, data_args: DataArguments, grouped: EvaluationRows, retrieval: bool
) -> dict[str, Any]:
    """What the frozen vision features alone score on the evaluated rows (`baselines`), against the training rows:
    the nearest training image's caption / answer with the model's metrics (retrieval: its R@K), and for class-like
    training captions a linear probe's `caption_accuracy`. Empty with `--streaming` (the training rows are not held)
    or when the training rows cannot be loaded."""
    if data_args.streaming:
        logger.warning("baselines: not computed with --streaming (they need the training rows in memory)")
        return {}
    try:
        train = group_rows(split_train_eval(data_args, args.seed)[0].dataset)
    except ValueError as error:  # e.g. too few rows to hold out an eval fraction: the model's figures still stand
        logger.warning("baselines: no training rows (%s)", error)
        return {}
    caches = []
    if data_args.feature_cache is not None:  # cache-features writes train/ and eval/
        root = Path(data_args.feature_cache)
        caches = [FeatureCache(root / name) for name in ("train", "eval") if (root / name / "meta.json").exists()]
    load_encoder = functools.cache(functools.partial(load_vision_encoder, args.model, args.device))

    def readable(images: dict[str, Any]) -> PooledImages:
        items = list(images.items())
        features, valid = pooled_image_features(items, caches, load_encoder, args.batch_size, args.device)
        keys = [key for key, ok in zip(images, valid.tolist(), strict=True) if ok]
        return PooledImages({key: row for row, key in enumerate(keys)}, features[valid])

    pooled, train_pooled = readable(grouped.images), readable(train.images)
    nearest = nearest_retrieval_baseline if retrieval else nearest_generation_baseline
    baselines: dict[str, Any] = {"nearest_neighbour": nearest(grouped, train, pooled, train_pooled)}
    probe = probe_baseline(grouped, train, pooled, train_pooled)
    if probe is not None:
        baselines["linear_probe"] = probe
    baselines["num_train_images"] = len(train_pooled.rows)
    return baselines


def evaluate_model(args: EvaluateArguments, data_args: DataArguments) -> dict[str, Any]:
    """Scores the model folder `args.model` on the split (see `EvaluateArguments.split`): captions / VQA for a
    stage-2 model, retrieval for a stage-1 model. Returns the figures with what was evaluated; a missing folder,
    split or column raises `FileNotFoundError` / `ValueError`."""
    architecture = model_architecture(args.model)
    split, rows = load_split(data_args, args.split, args.seed)
    grouped = group_rows(rows)
    if not grouped.num_rows:
        raise ValueError(f"{split} has no rows to evaluate")
    logger.info("evaluating %s on %s: %d rows, %d images", args.model, split, grouped.num_rows, len(grouped.images))
    retrieval = architecture == RETRIEVAL_ARCHITECTURE
    args.bf16 = not retrieval and resolve_bf16(args.bf16, args.device)  # decided once; retrieval runs in float32
    evaluate = evaluate_retrieval_split if retrieval else evaluate_generation
    figures = evaluate(args.model, grouped, args, data_args)
    if figures["skipped_images"]:
        logger.warning("%d unreadable images were skipped", figures["skipped_images"])
    results = {
        "model": str(args.model),
        "task": "retrieval" if retrieval else "generation",
        "split": split,
        "num_rows": grouped.num_rows,
        "bf16": args.bf16,
        **figures,
    }
    if args.baselines:
        results["baselines"] = evaluate_baselines(args, data_args, grouped, retrieval)
    return results


BASELINE_COLUMNS = {"nearest_neighbour": "nearest", "linear_probe": "probe"}
BASELINE_NOTES = {
    "nearest": "the caption / answer of the nearest training image (cosine of the frozen vision encoder's pooled "
    "features)",
    "probe": "a linear probe on those features predicting the caption (class-like captions)",
}


def format_results(results: dict[str, Any]) -> str:
    """A table of the figures, the model's beside its frozen-feature baselines where they were computed, then the
    counts."""
    lines = [f"{results['model']} on {results['split']} ({results['task']})"]
    baselines = results.get("baselines") or {}
    columns = {"model": results}
    columns |= {label: baselines[key] for key, label in BASELINE_COLUMNS.items() if key in baselines}
    scores = list(dict.fromkeys(name for c in columns.values() for name, v in c.items() if isinstance(v, float)))
    counts = {name: value for name, value in results.items() if isinstance(value, int)}
    counts |= {f"baseline_{name}": value for name, value in baselines.items() if isinstance(value, int)}
    width = max(map(len, [*scores, *counts]))
    if len(columns) > 1:
        lines.append(f"  {'':<{width}}" + "".join(f"{label:>10}" for label in columns))
    for name in scores:
        values = [column.get(name) for column in columns.values()]
        lines.append(f"  {name:<{width}}" + "".join(f"{'':>10}" if v is None else f"{v:>10.4f}" for v in values))
    lines += [f"  {name:<{width}}{value:>10d}" for name, value in counts.items()]
    lines += [f"{label}: {BASELINE_NOTES[label]}" for label in list(columns)[1:]]
    return "\n".join(lines)
