"""`smolvlm-qformer evaluate`: a saved model scored on any split the data layer reads.

A stage-2 folder (`SmolVLMQFormerForConditionalGeneration`) generates greedily, in batches: one caption per image
for the rows without a question (CIDEr-D, BLEU-4 against every caption of that image) and one answer per distinct
question about an image (VQA accuracy, each row against its own answer). A stage-1 folder
(`SmolVLMQFormerForImageTextRetrieval`) is scored with image<->text R@1/5/10 over the split's images and distinct
captions, a caption matching every image it is given for. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import (
    DataArguments,
    IndexedDataset,
    decode_or_skip,
    image_key,
    load_image_text_dataset,
    split_train_eval,
)
from ..data.collators import cut_to_tokens
from ..inference import generate_texts, load_for_inference
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
    system_prompt: str | None = None
    """Stage 2: the system prompt of every generation (default: the chat template's own)."""
    itm_top_k: int | None = None
    """Stage 1: re-rank each image's and each text's top k with the ITM head."""
    output: str | None = None
    """Write the figures as JSON here."""


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
    if data_args.feature_cache is not None:
        logger.warning("evaluate reads the images themselves: --feature_cache is ignored")
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
    """CIDEr-D and BLEU-4 of the captions (one per image, all scored together: CIDEr-D's IDF is the split's) and
    VQA accuracy of the answers (each against its annotators' answers, or one answer); a task without predictions
    is left out."""
    metrics = {}
    if captions:
        references = [list(refs) for refs in caption_references]
        metrics["cider_d"] = load_metric("cider_d").compute(predictions=captions, references=references)["cider_d"]
        metrics["bleu"] = load_metric("bleu").compute(predictions=captions, references=references)["bleu"]
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
    model, processor = load_for_inference(folder, args.device)
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
    evaluate = evaluate_retrieval_split if retrieval else evaluate_generation
    figures = evaluate(args.model, grouped, args, data_args)
    if figures["skipped_images"]:
        logger.warning("%d unreadable images were skipped", figures["skipped_images"])
    return {
        "model": str(args.model),
        "task": "retrieval" if retrieval else "generation",
        "split": split,
        "num_rows": grouped.num_rows,
        **figures,
    }


def format_results(results: dict[str, Any]) -> str:
    """A two-column table of the figures: scores first, then counts."""
    lines = [f"{results['model']} on {results['split']} ({results['task']})"]
    scores = {name: value for name, value in results.items() if isinstance(value, float)}
    counts = {name: value for name, value in results.items() if isinstance(value, int)}
    width = max(map(len, [*scores, *counts]))
    lines += [f"  {name:<{width}}  {value:8.4f}" for name, value in scores.items()]
    lines += [f"  {name:<{width}}  {value:8d}" for name, value in counts.items()]
    return "\n".join(lines)
