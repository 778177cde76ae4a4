"""Both stages under DDP, for test_distributed.py: `torchrun --nproc_per_node N tests/ddp_run.py SETUP OUT`.

SETUP is a JSON file {"backbones": {...}, "data_dir": ..., "batch_size": per-device batch, "steps": ...}. Each rank
writes OUT/stage{1,2}-rank{r}.safetensors (its trainable parameters after training) and OUT/stage1-rank{r}.json
(its batches' sample indices and, on rank 0, the logged losses). `run_stage1` also serves the single-process run.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import set_seed

from smolvlm_qformer.data import ChatCollator, DataArguments, RetrievalCollator, split_train_eval
from smolvlm_qformer.training import (
    ModelArguments,
    QFormerTrainer,
    SmolVLMTrainingArguments,
    VLMTrainer,
    build_stage1,
    build_stage2,
)


class RecordingCollator(RetrievalCollator):
    """Remembers the sample indices of every batch it builds."""

    batches: list[list[int]]

    def __call__(self, rows):
        self.batches.append([row["sample_index"] for row in rows])
        return super().__call__(rows)


def _arguments(setup: dict, output_dir: str, batch_size: int) -> SmolVLMTrainingArguments:
    return SmolVLMTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=setup["steps"],
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,  # without it, Trainer on a CPU-only machine leaves each process training alone
        bf16=False,  # compared with one process to float32 precision
        disable_tqdm=True,
        seed=42,
    )


def _model_args(setup: dict) -> ModelArguments:
    backbones = setup["backbones"]
    return ModelArguments(
        vision_model=backbones["vision"],
        qformer_model=backbones["qformer"],
        language_model=backbones["language_model"],
        num_query_tokens=4,
        lora_r=4,
        lora_dropout=0.0,
    )


def run_stage1(setup: dict, output_dir: str, batch_size: int) -> tuple[QFormerTrainer, list[list[int]]]:
    """Stage 1 (ITC) for `steps` steps; returns the trainer and the sample indices of each of its batches."""
    set_seed(42)
    model, processor = build_stage1(_model_args(setup))
    train, _ = split_train_eval(DataArguments(data_dir=setup["data_dir"], eval_fraction=0), seed=42)
    collator = RecordingCollator(processor)
    collator.batches = []
    trainer = QFormerTrainer(
        model=model, args=_arguments(setup, output_dir, batch_size), train_dataset=train, data_collator=collator
    )
    trainer.train()
    return trainer, collator.batches[: setup["steps"]]  # the data loader collates one batch ahead


def run_stage2(setup: dict, output_dir: str, batch_size: int) -> VLMTrainer:
    set_seed(42)
    model, processor = build_stage2(_model_args(setup))
    data = DataArguments(
        data_dir=setup["data_dir"], eval_fraction=0, question_column="question", answer_column="answer"
    )
    train, _ = split_train_eval(data, seed=42)
    trainer = VLMTrainer(
        model=model,
        args=_arguments(setup, output_dir, batch_size),
        train_dataset=train,
        data_collator=ChatCollator(processor),
    )
    trainer.train()
    return trainer


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    setup, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    trainer, batches = run_stage1(setup, str(out / "stage1"), setup["batch_size"])
    rank = trainer.args.process_index
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    report = {"world_size": trainer.args.world_size, "batches": batches, "losses": losses}
    (out / f"stage1-rank{rank}.json").write_text(json.dumps(report))
    save_file(trainable_parameters(trainer.model), out / f"stage1-rank{rank}.safetensors")
    trainer = run_stage2(setup, str(out / "stage2"), setup["batch_size"])
    save_file(trainable_parameters(trainer.model), out / f"stage2-rank{rank}.safetensors")
