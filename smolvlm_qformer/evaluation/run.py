"""`smolvlm-qformer evaluate`: a saved model scored on any split the data layer reads.

A stage-2 folder (`SmolVLMQFormerForConditionalGeneration`) generates greedily, in batches: one caption per image
for the rows without a question (CIDEr-D, BLEU-4 against every caption of that image) and one answer per distinct
question about an image (VQA accuracy, each row against its own answer). A stage-1 folder
(`SmolVLMQFormerForImageTextRetrieval`) is scored with image<->text R@1/5/10 over the split's images and distinct
captions, a caption matching every image it is given for. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data import (
    ChatCollator,
    DataArguments,
    IndexedDataset,
    decode_image,
    load_image_text_dataset,
    split_train_eval,
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


def image_key(value: Any, row_index: int) -> str:
    """What identifies an image across rows: its bytes' hash where the row carries them, else its path (an image
    with neither counts as its row's own)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return "sha1:" + hashlib.sha1(value).hexdigest()
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, Image.Image):
        return "sha1:" + hashlib.sha1(value.tobytes() + f"{value.mode}{value.size}".encode()).hexdigest()
    return f"row:{row_index}"


def group_rows(rows: Iterable[dict[str, Any]]) -> EvaluationRows:
    """Groups canonical rows (image, caption / question / answer) by image and question."""
    grouped = EvaluationRows()
    for index, row in enumerate(rows):
        grouped.num_rows += 1
        key = image_key(row["image"], index)
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


class _ImageDecoder:
    """Decodes images by key, remembering which could not be read (each is logged and counted once)."""

    def __init__(self, images: dict[str, Any]):
        self.images = images
        self.unreadable: set[str] = set()

    def __call__(self, key: str) -> Image.Image | None:
        if key in self.unreadable:
            return None
        try:
            return decode_image(self.images[key])
        except Exception as error:  # noqa: BLE001 - any undecodable file is a skip, never a crash
            logger.warning("skipping image %s: %s", key, error)
            self.unreadable.add(key)
            return None


class _LazyImages(Sequence):
    """Images decoded when a batch of them is read, so a split never sits in memory decoded."""

    def __init__(self, values: list[Any]):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [decode_image(value) for value in self.values[index]]
        return decode_image(self.values[index])


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


@torch.no_grad()
def generate(
    model: Any,
    processor: Any,
    decoder: _ImageDecoder,
    items: Sequence[tuple[str, str | None]],
    batch_size: int,
    max_new_tokens: int,
    system_prompt: str | None,
) -> list[str | None]:
    """Greedy generations for (image key, question or None for a caption) items, in batches; None where the image
    is unreadable."""
    outputs: list[str | None] = []
    context = model.config.text_config.max_position_embeddings
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        images = [decoder(key) for key, _ in batch]
        kept = [(image, question) for image, (_, question) in zip(images, batch, strict=True) if image is not None]
        answers = iter([])
        if kept:
            prompts = [processor.build_prompt(question, system_prompt) for _, question in kept]
            inputs = processor(images=[image for image, _ in kept], text=prompts).to(model.device)
            if inputs.input_ids.shape[1] + max_new_tokens > context:
                raise ValueError(
                    f"a prompt is {inputs.input_ids.shape[1]} tokens; with --max_new_tokens {max_new_tokens} it "
                    f"exceeds the model's context of {context} tokens: lower --max_question_tokens"
                )
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs.input_ids.shape[1] :]
            answers = iter(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
        outputs += [None if image is None else next(answers) for image in images]
        logger.info("generated %d / %d", len(outputs), len(items))
    return outputs


def evaluate_generation(
    folder: str, grouped: EvaluationRows, args: EvaluateArguments, data_args: DataArguments
) -> dict[str, Any]:
    """Stage 2: a caption per image and an answer per distinct question generated and scored, with the counts of
    what was scored."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    model = model.to(args.device).eval()
    truncate = ChatCollator(processor, max_question_tokens=data_args.max_question_tokens).truncate_question
    items = [(key, None) for key in grouped.captions] + [(key, truncate(q)) for key, q in grouped.answers]
    decoder = _ImageDecoder(grouped.images)
    predictions = generate(model, processor, decoder, items, args.batch_size, args.max_new_tokens, args.system_prompt)
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
        raise ValueError(f"nothing to evaluate: all {len(decoder.unreadable)} images are unreadable")
    return {
        **generation_metrics(*_unzip(captions), *_unzip(answers)),
        "num_captioned_images": len(captions),
        "num_questions": len(answers),
        "skipped_images": len(decoder.unreadable),
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

    decoder = _ImageDecoder(grouped.images)
    captioned = [key for key, texts in grouped.retrieval_texts.items() if texts]
    if not captioned:
        raise ValueError("retrieval needs captions and the split has none: set --caption_column")
    readable = [key for key in captioned if decoder(key) is not None]  # decoded again, a batch at a time, below
    if not readable:
        raise ValueError(f"nothing to evaluate: all {len(decoder.unreadable)} images are unreadable")
    texts = list(dict.fromkeys(text for key in readable for text in grouped.retrieval_texts[key]))
    positives = torch.tensor([[text in grouped.retrieval_texts[key] for text in texts] for key in readable])

    processor = SmolVLMQFormerProcessor.from_pretrained(folder)
    model = SmolVLMQFormerForImageTextRetrieval.from_pretrained(folder, use_safetensors=True)
    model = model.to(args.device).eval()
    scores = retrieval_scores(
        model,
        processor,
        _LazyImages([grouped.images[key] for key in readable]),
        texts,
        batch_size=args.batch_size,
        itm_top_k=args.itm_top_k,
        max_length=data_args.max_caption_tokens,
    )
    return {
        **retrieval_recall_at_k(scores.image_to_text, positives, RECALL_KS, scores.text_to_image),
        "num_images": len(readable),
        "num_texts": len(texts),
        "skipped_images": len(decoder.unreadable),
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
