"""The two stages as stock `transformers.Trainer` subclasses: they override only what differs.

Both count the samples the collators skipped (unreadable images, unusable conversations) and the conversation turns
they dropped to fit the context, optimise with per-group learning rates, evaluate
through Trainer's own loop and write checkpoints atomically.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..data.sources import IndexedDataset
from ..modeling_smolvlm_qformer import same_texts
from .arguments import groups_by_length
from .checkpointing import AtomicCheckpointTrainer

logger = logging.getLogger(__name__)


class _SmolVLMTrainer(AtomicCheckpointTrainer):
    """What both stages share: skipped-sample counting, per-group learning rates, extra training metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_samples = 0
        self.dropped_turns = 0
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = int(inputs.pop("num_skipped", torch.zeros(1)).sum())
        dropped = int(inputs.pop("num_dropped_turns", torch.zeros(1)).sum())
        if model.training:
            self.skipped_samples += skipped
            self.dropped_turns += dropped
        if "input_ids" not in inputs and self.args.world_size > 1:
            # the other ranks would wait forever in the ITC gather and DDP's gradient all-reduce: fail instead
            raise RuntimeError(
                "every sample of this rank's batch was unreadable; raise the batch size or clean the data"
            )
        if "input_ids" not in inputs:  # every row of the batch was unreadable: a zero step, not a crash
            loss = sum(p.flatten()[0] for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler; with `group_by_length`, also for an `IndexedDataset`, whose raw rows Trainer cannot
        measure (it reads a length column or `input_ids`): grouped by `IndexedDataset.lengths`."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if groups_by_length(self.args) and isinstance(dataset, IndexedDataset):
            batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch_size, lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)

    def _accumulate(self, **metrics: float) -> None:
        for name, value in metrics.items():
            self._metric_sums[name] += value
        self._metric_steps += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the training metrics averaged since the last log, and the running counts of skipped samples and
        dropped turns."""
        if "loss" in logs:
            for name, total in self._metric_sums.items():
                logs[name] = round(total / max(self._metric_steps, 1), 4)
            self._metric_sums.clear()
            self._metric_steps = 0
            logs["skipped_samples"] = self.skipped_samples
            logs["dropped_turns"] = self.dropped_turns
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None):
        """AdamW (or `args.optim`) over four groups: {pretrained, new} x {decay, no decay on norms, biases and the
        temperature}."""
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        base_lr = self.args.learning_rate
        new_lr = self.args.new_parts_learning_rate or 5 * base_lr
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
        # which parameters start from scratch is declared by the model (`new_parameters`, read through peft too)
        new_parameters = re.compile(model.new_parameters)
        for name, param in model.named_parameters():
            if param.requires_grad:
                has_decay = name in decay and param.ndim > 1  # never on norms, biases or the temperature
                groups[(bool(new_parameters.search(name)), has_decay)].append(param)
        param_groups = [
            {"params": params, "lr": new_lr if is_new else base_lr, "weight_decay": self.args.weight_decay * has_decay}
            for (is_new, has_decay), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        sizes = {
            f"{'new' if is_new else 'pretrained'}{'' if has_decay else ' (no decay)'}": sum(p.numel() for p in params)
            for (is_new, has_decay), params in sorted(groups.items())
        }
        logger.info("optimizer groups (trainable parameters): %s; lr %.2e / new parts %.2e", sizes, base_lr, new_lr)
        return self.optimizer


def retrieval_hits(logits_per_image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(B, 2): whether each image's best text, and each text's best image, is a positive of the batch (its own pair
    or one with the same text: `same_texts`)."""
    positives = same_texts(input_ids, attention_mask, across_ranks=False)
    rows = torch.arange(len(positives), device=positives.device)
    return torch.stack(
        [positives[rows, logits_per_image.argmax(dim=1)], positives[logits_per_image.argmax(dim=0), rows]], 1
    )


def retrieval_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """In-batch retrieval accuracy both ways, from `retrieval_hits` (the predictions; the labels are all 1)."""
    hits = prediction.predictions == prediction.label_ids[:, None]
    return {"image_to_text_accuracy": float(np.mean(hits[:, 0])), "text_to_image_accuracy": float(np.mean(hits[:, 1]))}


class QFormerTrainer(_SmolVLMTrainer):
    """Stage 1: align the Q-Former with image-text contrastive (and optionally matching / generation) losses.

    Logs each loss, the temperature and the in-batch image-to-text accuracy; evaluates the loss and in-batch
    retrieval accuracy both ways.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", retrieval_accuracy)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if model.training and outputs is not None:
            hits = retrieval_hits(outputs.logits_per_image.detach(), inputs["input_ids"], inputs["attention_mask"])
            metrics = {
                f"loss_{n}": getattr(outputs, f"loss_{n}").item()
                for n in ("itc", "itm", "itg")
                if getattr(outputs, f"loss_{n}") is not None
            }
            self._accumulate(
                **metrics, temperature=outputs.temperature.item(), batch_i2t_accuracy=hits[:, 0].float().mean().item()
            )
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only or outputs is None:
            return loss.detach(), None, None
        hits = retrieval_hits(outputs.logits_per_image, inputs["input_ids"], inputs["attention_mask"]).long()
        return loss.detach(), hits, torch.ones(len(hits), dtype=torch.long, device=hits.device)


def answer_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Teacher-forced answer accuracy: a sample counts when every answer token (and the end of turn) is the
    argmax, which is exactly when greedy decoding reproduces the answer."""
    predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    answer = labels != -100
    correct = (predicted == labels) | ~answer
    return {
        "answer_accuracy": float(np.mean(correct.all(axis=1)[answer.any(axis=1)])),
        "answer_token_accuracy": float(np.mean((predicted == labels)[answer])),
    }


def _argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


class VLMTrainer(_SmolVLMTrainer):
    """Stage 2: Q-Former + MLP adapter + LoRA on the LM loss (answer tokens only); vision and base LM frozen.

    Evaluates the LM loss and answer accuracy.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", answer_accuracy)
        kwargs.setdefault("preprocess_logits_for_metrics", _argmax_logits)
        super().__init__(*args, **kwargs)
        # our collator never labels an image placeholder: the token count over the accumulated batches is exact
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The LM loss, without building a KV cache: nothing reads it, and under `--torch_compile` each layer's
        cache update would be a compiled graph of its own."""
        return super().compute_loss(
            model, {**inputs, "use_cache": False}, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
