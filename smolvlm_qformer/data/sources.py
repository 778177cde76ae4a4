"""Image-text sources: anything `datasets.load_dataset` reads, with the columns renamed to one schema.

Rows come out as `{"image": <undecoded image>, "caption": str}` (plus `"question"` / `"answer"` for VQA data) and a
`"sample_index"`. Images stay undecoded here: the collators decode them, so one bad file is a counted skip in
its batch rather than a crash when the dataset is built or iterated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

from .easy_vqa import easy_vqa_dataset
from .feature_cache import FeatureCache

logger = logging.getLogger(__name__)

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
    feature_cache: str | None = None
    """A folder written by `smolvlm-qformer cache-features`: train on cached vision features instead of images."""


class IndexedDataset:
    """A map-style dataset whose rows also carry their position (the key of the feature cache and of the per-sample
    prompt draw) and, given a feature cache, the sample's cached vision features in place of its image."""

    def __init__(self, dataset: datasets.Dataset, feature_cache: FeatureCache | None = None, empty_text_rows: int = 0):
        if feature_cache is not None:
            if len(feature_cache) != len(dataset):
                raise ValueError(
                    f"feature cache {feature_cache.folder} holds {len(feature_cache)} samples but the dataset has "
                    f"{len(dataset)}: it was built for other data (rebuild it with the same data arguments)"
                )
            dataset = dataset.remove_columns("image")  # not read at all: the cache replaces it
        self.dataset = dataset
        self.feature_cache = feature_cache
        self.empty_text_rows = empty_text_rows  # rows dropped at load for an empty caption / answer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = {**self.dataset[index], "sample_index": index}
        if self.feature_cache is not None:
            features, valid = self.feature_cache.get([index])
            row["vision_hidden_states"] = features[0] if valid[0] else None  # None: the image was unreadable
        return row


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
    wanted = {
        args.image_column: "image",
        args.caption_column: "caption",
        args.question_column: "question",
        args.answer_column: "answer",
    }
    wanted = {source: target for source, target in wanted.items() if source is not None}
    columns = dataset.column_names or list(dataset.features or {})
    missing = [source for source in wanted if source not in columns]
    if missing:
        raise ValueError(
            f"{args.dataset}: column(s) {missing} not found; the dataset has {columns}. "
            "Set --image_column / --caption_column / --question_column / --answer_column."
        )
    if "caption" not in wanted.values() and "answer" not in wanted.values():
        raise ValueError("give a caption column, or question and answer columns")
    dataset = dataset.select_columns(list(wanted))
    dataset = dataset.rename_columns({s: t for s, t in wanted.items() if s != t})
    if isinstance(dataset.features.get("image") if dataset.features else None, datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # decoded (or skipped) by the collator
    return dataset
