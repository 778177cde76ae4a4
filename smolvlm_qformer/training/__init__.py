"""Both training stages: arguments, `Trainer` subclasses and entry points."""

from .arguments import ModelArguments, QFormerTrainingArguments, SmolVLMTrainingArguments, VLMTrainingArguments
from .run import (
    build_processor,
    build_stage1,
    build_stage2,
    fit_stage1,
    fit_stage2,
    parameter_summary,
    save_stage2,
    stage2_collator,
    train_qformer,
    train_vlm,
)
from .trainers import QFormerTrainer, VLMTrainer

__all__ = [
    "ModelArguments",
    "QFormerTrainer",
    "QFormerTrainingArguments",
    "SmolVLMTrainingArguments",
    "VLMTrainer",
    "VLMTrainingArguments",
    "build_processor",
    "build_stage1",
    "build_stage2",
    "fit_stage1",
    "fit_stage2",
    "parameter_summary",
    "save_stage2",
    "stage2_collator",
    "train_qformer",
    "train_vlm",
]
