"""Entry points of the two stages: assemble model, processor and data, train, save a folder that loads anywhere."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed

from ..data import ChatCollator, FeatureCache, IndexedDataset, PromptConfig, RetrievalCollator, split_train_eval
from ..data.sources import DataArguments
from ..hardware import fast_dtype
from ..modeling_smolvlm_qformer import SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerForImageTextRetrieval
from ..processing_smolvlm_qformer import SmolVLMQFormerProcessor
from .arguments import ModelArguments, SmolVLMTrainingArguments
from .trainers import QFormerTrainer, VLMTrainer

logger = logging.getLogger(__name__)


def build_processor(model_args: ModelArguments) -> SmolVLMQFormerProcessor:
    """The processor of `from_backbones` models (stage 2: the stage-1 folder's image processor and Q-Former tokenizer
    with the LM's tokenizer); a checkpoint that cannot be loaded is an `OSError` naming the flag. Stage 1 needs the
    LM's tokenizer too: it saves it with the processor for stage 2."""
    try:
        return SmolVLMQFormerProcessor.from_backbones(
            model_args.vision_model,
            model_args.qformer_model,
            model_args.language_model,
            num_query_tokens=model_args.num_query_tokens,
            stage1=model_args.stage1_model,
        )
    except (OSError, ValueError) as error:  # ValueError: transformers 4.x's word for a path that is not there
        flags = (
            "--vision_model, --qformer_model (or --stage1_model) and --language_model (the LM's tokenizer: stage 1 "
            "saves it for stage 2)"
        )
        raise OSError(f"{error}\nCheck {flags}: Hub ids or local folders.") from error


def build_stage1(model_args: ModelArguments) -> tuple[SmolVLMQFormerForImageTextRetrieval, SmolVLMQFormerProcessor]:
    """The retrieval model from the vision encoder and DistilBERT checkpoints, and its processor."""
    processor = build_processor(model_args)
    qformer_config = {"num_query_tokens": processor.num_query_tokens, "losses": model_args.losses}
    if model_args.loss_weights is not None:
        qformer_config["loss_weights"] = model_args.loss_weights
    model = SmolVLMQFormerForImageTextRetrieval.from_backbones(
        vision=model_args.vision_model,
        qformer=model_args.qformer_model,
        qformer_config=qformer_config,
        processor=processor,
    )
    return model, processor


def build_stage2(model_args: ModelArguments, device: str = "cpu") -> tuple[PeftModel, SmolVLMQFormerProcessor]:
    """The generation model from the stage-1 folder (or fresh backbones), wrapped for LoRA: the LM's projections
    that `lora_target_modules` names get LoRA, the adapter and (with `train_qformer`) the Q-Former's query path train
    in full (`SmolVLMQFormerForConditionalGeneration.trained_modules`), the rest is frozen (the frozen LM in
    `frozen_lm_dtype` for `device`, with `lm_attn_implementation`)."""
    processor = build_processor(model_args)
    model = SmolVLMQFormerForConditionalGeneration.from_backbones(
        model_args.vision_model,
        model_args.qformer_model,
        model_args.language_model,
        stage1=model_args.stage1_model,
        processor=processor,
    )
    if model_args.lm_attn_implementation is not None:
        model.model.language_model.set_attn_implementation(model_args.lm_attn_implementation)
    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=_lora_targets(model, model_args.lora_target_modules),
        modules_to_save=_trained_modules(model_args.train_qformer),
    )
    model = get_peft_model(model, lora)
    names = model.targeted_module_names
    kinds = sorted({re.sub(r"\.\d+\.", ".N.", name.split("language_model.")[-1]) for name in names})
    logger.info("LoRA on %d modules of the LM: %s", len(names), ", ".join(kinds))
    if model_args.frozen_lm_dtype is not None:
        dtype = (
            fast_dtype(device) if model_args.frozen_lm_dtype == "auto" else getattr(torch, model_args.frozen_lm_dtype)
        )
        for param in model.get_decoder().parameters():
            if not param.requires_grad:  # LoRA's own weights stay float32
                param.data = param.data.to(dtype)
    return model, processor


def _lora_targets(model: SmolVLMQFormerForConditionalGeneration, targets: str) -> str:
    """`ModelArguments.lora_target_modules` as peft's `target_modules`: "attention" / "all-linear" resolved for the
    model's LM, anything else as the regex it is."""
    return model.lora_target_modules(targets) if targets in ("attention", "all-linear") else targets


def _trained_modules(train_qformer: bool) -> list[str]:
    """Stage 2's `modules_to_save`: the model's `trained_modules`, less the Q-Former's unless `train_qformer`."""
    model = SmolVLMQFormerForConditionalGeneration
    return [m for m in model.trained_modules if train_qformer or m not in model.qformer_trained_modules]


def parameter_summary(model) -> dict[str, dict[str, int]]:
    """Parameter counts per part (LoRA, Q-Former, adapter, vision encoder, LM, heads): trainable, and of those
    new (`new_parameters`: they train at `new_parts_learning_rate`), and frozen."""
    new = re.compile(model.new_parameters)
    groups: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        parts = ("lora_", "qformer", "adapter", "vision_model", "language_model")
        part = next((p for p in parts if p in name), "heads")
        counts = groups.setdefault(part, {"trainable": 0, "new": 0, "frozen": 0})
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
        counts["new"] += param.numel() if param.requires_grad and new.search(name) else 0
    return groups


def _log_trainable(model) -> None:
    summary = ", ".join(
        f"{part} {c['trainable'] / 1e6:.2f}M trainable ({c['new'] / 1e6:.2f}M new) / {c['frozen'] / 1e6:.2f}M frozen"
        for part, c in parameter_summary(model).items()
    )
    logger.info("parameters: %s", summary)


def _datasets(data_args: DataArguments, seed: int) -> tuple[IndexedDataset, IndexedDataset | None]:
    """Train and eval sets; with `--feature_cache`, their rows carry cached vision features instead of images."""
    train, evaluation = split_train_eval(data_args, seed)
    if data_args.feature_cache is None:
        return train, evaluation
    root = Path(data_args.feature_cache)
    train = IndexedDataset(train.dataset, FeatureCache(root / "train"), train.empty_text_rows)
    if evaluation is not None:
        evaluation = IndexedDataset(evaluation.dataset, FeatureCache(root / "eval"))
    return train, evaluation


def apply_min_steps(training_args: SmolVLMTrainingArguments, num_samples: int | None) -> None:
    """Sets `max_steps` to `min_steps` where `num_train_epochs` over `num_samples` would train fewer steps (and
    `max_steps` is not set): a few hundred photos need more passes than a large set. A stream (`num_samples` None)
    trains `max_steps`, which Trainer requires of it."""
    if training_args.max_steps > 0 or not training_args.min_steps or num_samples is None:
        return
    batch = training_args.train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    steps = math.ceil(training_args.num_train_epochs * math.ceil(num_samples / batch))
    if steps < training_args.min_steps:
        logger.info(
            "%d samples, %g epochs: %d steps; training the minimum of %d (--min_steps) instead",
            num_samples,
            training_args.num_train_epochs,
            steps,
            training_args.min_steps,
        )
        training_args.max_steps = training_args.min_steps


def _train(trainer, training_args: SmolVLMTrainingArguments) -> dict[str, float]:
    dataset = trainer.train_dataset
    apply_min_steps(training_args, len(dataset) if hasattr(dataset, "__len__") else None)
    resume = training_args.resume_from_checkpoint
    if resume == "auto":  # pick up the newest checkpoint in output_dir, if any
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {
        **result.metrics,
        "train_skipped_samples": trainer.skipped_samples,
        "train_dropped_turns": trainer.dropped_turns,
        "train_empty_text_rows": getattr(trainer.train_dataset, "empty_text_rows", 0),
        "train_bf16": training_args.bf16,  # what `--bf16` (auto by default) decided
    }
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    if metrics["train_skipped_samples"]:
        logger.warning(
            "%d training samples were skipped (unreadable images or unusable conversations; the log says which)",
            metrics["train_skipped_samples"],
        )
    if metrics["train_dropped_turns"]:
        logger.warning("%d turns were dropped to fit the LM's context", metrics["train_dropped_turns"])
    return metrics


def fit_stage1(
    model: SmolVLMQFormerForImageTextRetrieval,
    processor: SmolVLMQFormerProcessor,
    train: IndexedDataset,
    evaluation: IndexedDataset | None,
    data_args: DataArguments,
    training_args: SmolVLMTrainingArguments,
) -> tuple[dict[str, float], QFormerTrainer]:
    """Trains stage 1 and writes the retrieval model + processor to `output_dir`; returns the metrics and trainer."""
    positions = model.config.qformer_config.max_position_embeddings
    if data_args.max_caption_tokens > positions:
        raise ValueError(
            f"--max_caption_tokens {data_args.max_caption_tokens} exceeds the Q-Former's {positions} positions"
        )
    _log_trainable(model)
    trainer = QFormerTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=RetrievalCollator(processor, max_caption_tokens=data_args.max_caption_tokens),
    )
    metrics = _train(trainer, training_args)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():  # one writer per file under torchrun / accelerate
        processor.save_pretrained(training_args.output_dir)
    return metrics, trainer


def stage2_collator(
    model: PeftModel, processor: SmolVLMQFormerProcessor, data_args: DataArguments, seed: int
) -> ChatCollator:
    """How stage 2 turns rows into batches: prompts drawn per sample from `seed`, texts cut and conversations fit
    to the LM's context as `data_args` says."""
    prompts = PromptConfig.from_json(data_args.prompts_file) if data_args.prompts_file else PromptConfig()
    prompts.shuffle_turns = data_args.shuffle_turns
    return ChatCollator(
        processor,
        prompts=prompts,
        seed=seed,
        max_answer_tokens=data_args.max_answer_tokens,
        max_question_tokens=data_args.max_question_tokens,
        max_length=model.config.text_config.max_position_embeddings,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
        independent_turns=data_args.independent_turns,
    )


def fit_stage2(
    model: PeftModel,
    processor: SmolVLMQFormerProcessor,
    train: IndexedDataset,
    evaluation: IndexedDataset | None,
    data_args: DataArguments,
    training_args: SmolVLMTrainingArguments,
) -> tuple[dict[str, float], VLMTrainer]:
    """Trains stage 2 and writes the merged model + processor to `output_dir` and the unmerged adapter to
    `output_dir/adapter`; returns the metrics and trainer."""
    _log_trainable(model)
    collator = stage2_collator(model, processor, data_args, training_args.seed)
    trainer = VLMTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, data_collator=collator
    )
    metrics = _train(trainer, training_args)
    if trainer.is_world_process_zero():
        save_stage2(trainer.model, processor, training_args.output_dir)
    return metrics, trainer


def train_qformer(
    model_args: ModelArguments, data_args: DataArguments, training_args: SmolVLMTrainingArguments
) -> dict[str, float]:
    """Stage 1 (`smolvlm-qformer train-qformer`): build, load the data, fit. Returns the final metrics."""
    set_seed(training_args.seed)  # before the new parts are initialised
    model, processor = build_stage1(model_args)
    return fit_stage1(model, processor, *_datasets(data_args, training_args.seed), data_args, training_args)[0]


def train_vlm(
    model_args: ModelArguments, data_args: DataArguments, training_args: SmolVLMTrainingArguments
) -> dict[str, float]:
    """Stage 2 (`smolvlm-qformer train-vlm`): build, load the data, fit. Returns the final metrics."""
    set_seed(training_args.seed)  # before the new parts and LoRA are initialised
    model, processor = build_stage2(model_args, device=str(training_args.device))
    return fit_stage2(model, processor, *_datasets(data_args, training_args.seed), data_args, training_args)[0]


def save_stage2(model: PeftModel, processor: SmolVLMQFormerProcessor, output_dir: str | os.PathLike) -> None:
    """The unmerged adapter to `output_dir/adapter`, then the LoRA-merged model (float32) and the processor to
    `output_dir`: a plain folder that loads with the Auto classes."""
    model.save_pretrained(Path(output_dir) / "adapter")
    merged = model.float().merge_and_unload()
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
