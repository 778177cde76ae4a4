"""Image-text sources: anything `datasets.load_dataset` reads, with the columns renamed to one schema.

Rows come out as `{"image": <undecoded image>, "caption": str}` (plus `"question"` / `"answer"` for VQA data), or as
conversations: `{"messages": [...], "image" or "images": ...}` (TRL's messages or LLaVA's conversations, see
`conversations`), and a `"sample_index"`. Images stay undecoded here: the collators decode them, so one bad file
is a counted skip in its batch rather than a crash when the dataset is built or iterated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from .conversations import row_images
from .easy_vqa import easy_vqa_dataset
from .feature_cache import FeatureCache

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "images")
# Sources built in-process instead of by `load_dataset`: `--dataset` name -> (split, `--dataset_config`) -> Dataset.
LOCAL_SOURCES: dict[str, Callable[[str, str | None], datasets.Dataset]] = {"easy-vqa": easy_vqa_dataset}


@dataclass
class DataArguments:
    """Where the image-text pairs come from and what their columns are called."""

    dataset: str = "imagefolder"
    """A `load_dataset` path: Hub id, local folder (the `imagefolder` convention, metadata.jsonl/csv), or a builder
    name such as "parquet" / "webdataset" / "imagefolder" together with `data_files` or `data_dir`; or one of
    `LOCAL_SOURCES` ("easy-vqa", with `dataset_config` "captions" or "vqa")."""
    dataset_config: str | None = None
    data_dir: str | None = None
    data_files: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    """An eval split name, or None to hold out `eval_fraction` of the training rows."""
    eval_fraction: float = 0.02
    streaming: bool = False
    image_column: str = "image"
    """The image column; a dataset without it whose "images" column holds a list per row uses that."""
    conversation_column: str | None = None
    """A column of conversations (TRL messages: role / content; or LLaVA: from / value). Default: "messages" or
    "conversations" when the dataset has one; the caption / question / answer columns are then not read."""
    caption_column: str | None = "caption"
    question_column: str | None = None
    answer_column: str | None = None
    max_samples: int | None = None
    """Keep the first N rows with a non-empty caption/answer (e.g. 50,000 Conceptual Captions pairs)."""
    max_eval_samples: int | None = 1000
    max_caption_tokens: int = 32
    """Q-Former caption length (stage 1); longer captions are truncated."""
    max_answer_tokens: int = 64
    """LM answer length (stage 2); longer answers are truncated."""
    max_question_tokens: int = 128
    """LM question length (stage 2); longer questions are truncated, so no prompt outgrows the LM's context."""
    prompts_file: str | None = None
    """JSON with "system_prompts" / "caption_prompts" lists for stage 2."""
    shuffle_turns: bool = False
    """Stage 2: the user/assistant pairs of a conversation about one image in a new order each epoch."""
    independent_turns: bool = False
    """Stage 2: each user/assistant pair of a conversation is a sample of its own about the conversation's images
    (e.g. VQA data grouped into one conversation per image): it learns as a row of its own would, from the image and
    its question only, while the system prompt and the image are computed once per conversation."""
    pad_to_multiple_of: int | None = None
    """Stage 2: pad batches to a multiple of this many tokens (None: to the longest row)."""
    feature_cache: str | None = None
    """A folder written by `smolvlm-qformer cache-features`: train on cached vision features instead of images
    (`evaluate` reads them for its frozen-feature baselines)."""


class IndexedDataset:
    """A map-style dataset whose rows also carry their position (`sample_index`, the key of the per-sample prompt
    draw) and the epoch (`set_epoch`, which the Trainer's data loader calls); given a feature cache, each row carries
    its images' cached vision features (`vision_hidden_states`, one tensor per image, None if one was unreadable)
    in place of the images."""

    def __init__(self, dataset: datasets.Dataset, feature_cache: FeatureCache | None = None, empty_text_rows: int = 0):
        self.image_indices: list[list[int]] = []
        if feature_cache is not None:
            image_columns = [c for c in IMAGE_COLUMNS if c in dataset.column_names]
            for index, row in enumerate(dataset.select_columns(image_columns)):
                try:
                    self.image_indices.append(feature_cache.lookup(row_images(row)))
                except KeyError as error:
                    raise ValueError(
                        f"sample {index}: {error.args[0]}: the cache was built for other data (rebuild it with the "
                        "same data arguments)"
                    ) from None
            dataset = dataset.remove_columns(image_columns)  # not read at all: the cache replaces them
        self.dataset = dataset
        self.feature_cache = feature_cache
        self.empty_text_rows = empty_text_rows  # rows dropped at load for an empty caption / answer
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def lengths(self) -> list[int]:
        """Each row's number of text characters, a proxy for its tokens that reads no image: what batching rows of
        similar length together (Trainer's `group_by_length`) sorts by."""
        text = self.dataset.select_columns([c for c in self.dataset.column_names if c not in IMAGE_COLUMNS])
        return [_text_length(row) for row in text]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = {**self.dataset[index], "sample_index": index, "epoch": self.epoch}
        if self.feature_cache is not None:
            indices = self.image_indices[index]
            features, valid = self.feature_cache.get(indices) if indices else ([], torch.ones(0, dtype=torch.bool))
            row["vision_hidden_states"] = list(features) if valid.all() else None  # None: an image was unreadable
        return row


def _text_length(value: Any) -> int:
    """The characters of every string in a row (nested lists and dicts included, as in conversations)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = list(value.values())
    return sum(_text_length(item) for item in value) if isinstance(value, list) else 0


def load_image_text_dataset(args: DataArguments, split: str) -> IndexedDataset | datasets.IterableDataset:
    """Loads one split, renames its columns to image / caption (/ question / answer) and drops rows whose text is
    empty (counted in the log)."""
    if args.dataset in LOCAL_SOURCES:
        dataset = LOCAL_SOURCES[args.dataset](split, args.dataset_config)
        dataset = dataset.to_iterable_dataset() if args.streaming else dataset
    else:
        dataset = datasets.load_dataset(
            args.dataset,
            args.dataset_config,
            data_dir=args.data_dir,
            data_files=args.data_files,
            split=split,
            streaming=args.streaming,
        )
    dataset = _canonical_columns(dataset, args)
    text_columns = [c for c in ("caption", "answer") if c in dataset.column_names]
    loaded = dataset
    dataset = dataset.filter(lambda row: all(isinstance(row[c], str) and row[c].strip() for c in text_columns))
    if args.streaming:
        dataset = dataset.take(args.max_samples) if args.max_samples is not None else dataset
        return dataset.map(lambda row, index: {**row, "sample_index": index}, with_indices=True)
    empty = len(loaded) - len(dataset)
    if args.max_samples is not None:
        dataset = _first(dataset, args.max_samples)
    logger.info("%s[%s]: %d image-text rows (%d with empty text dropped)", args.dataset, split, len(dataset), empty)
    return IndexedDataset(dataset, empty_text_rows=empty)


def split_train_eval(
    args: DataArguments, seed: int
) -> tuple[IndexedDataset | datasets.IterableDataset, IndexedDataset | None]:
    """The training rows and an evaluation set: the named eval split, or a held-out fraction of train."""
    train = load_image_text_dataset(args, args.train_split)
    if args.eval_split is not None:
        evaluation = load_image_text_dataset(args, args.eval_split)
    elif args.streaming or not args.eval_fraction:
        return train, None
    else:
        parts = train.dataset.train_test_split(test_size=args.eval_fraction, seed=seed)
        train, evaluation = (
            IndexedDataset(parts["train"], empty_text_rows=train.empty_text_rows),
            IndexedDataset(parts["test"]),
        )
    if args.max_eval_samples is not None and not args.streaming:
        evaluation = IndexedDataset(_first(evaluation.dataset, args.max_eval_samples))
    return train, evaluation


def _first(dataset: datasets.Dataset, n: int) -> datasets.Dataset:
    return dataset.select(range(min(n, len(dataset))))


def _canonical_columns(dataset: datasets.Dataset | datasets.IterableDataset, args: DataArguments):
    columns = dataset.column_names or list(dataset.features or {})
    image = args.image_column if args.image_column in columns or "images" not in columns else "images"
    conversation = args.conversation_column or next((c for c in ("messages", "conversations") if c in columns), None)
    if conversation is not None:
        wanted = {conversation: "messages", image: "images" if image == "images" else "image"}
        wanted = {source: target for source, target in wanted.items() if source in columns or source == conversation}
    else:
        wanted = {
            image: "image",
            args.caption_column: "caption",
            args.question_column: "question",
            args.answer_column: "answer",
        }
        wanted = {source: target for source, target in wanted.items() if source is not None}
        if "caption" not in wanted.values() and "answer" not in wanted.values():
            raise ValueError("give a caption column, or question and answer columns, or a conversation column")
    missing = [source for source in wanted if source not in columns]
    if missing:
        raise ValueError(
            f"{args.dataset}: column(s) {missing} not found; the dataset has {columns}. Set --image_column / "
            "--caption_column / --question_column / --answer_column, or --conversation_column."
        )
    dataset = dataset.select_columns(list(wanted))
    dataset = dataset.rename_columns({s: t for s, t in wanted.items() if s != t})
    for name in IMAGE_COLUMNS:  # decoded (or skipped) by the collator
        feature = (dataset.features or {}).get(name)
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of images per row
            dataset = dataset.cast_column(name, type(feature)(datasets.Image(decode=False)))
        elif isinstance(feature, list) and feature and isinstance(feature[0], datasets.Image):
            dataset = dataset.cast_column(name, [datasets.Image(decode=False)])
    return dataset
