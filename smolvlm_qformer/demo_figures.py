"""The demo's figures: loss curves, test images with the model's answers, and where each query looks."""

from __future__ import annotations

from math import isqrt
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .data import decode_image
from .evaluation import normalize_vqa_answer


def plot_losses(path: Path, histories: dict[str, list[dict]]) -> None:
    """The training loss of each stage against its steps, from Trainer's log history."""
    figure = Figure(figsize=(5 * len(histories), 3.5), layout="constrained")
    axes = figure.subplots(1, len(histories), squeeze=False)[0]
    for ax, (name, history) in zip(axes, histories.items(), strict=True):
        points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
        ax.plot(*zip(*points, strict=True), marker=".")
        ax.set(title=name, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def plot_examples(path: Path, examples: list[dict[str, str]]) -> None:
    """Test images with the question, the model's answer and the truth (green when right)."""
    columns = 4
    rows = -(-len(examples) // columns)
    figure = Figure(figsize=(3.2 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, example in zip(axes.flat, examples, strict=False):
        ax.imshow(np.asarray(decode_image(example["image"])), interpolation="nearest")
        right = normalize_vqa_answer(example["prediction"]) == normalize_vqa_answer(example["answer"])
        ax.set_title(
            f"{example['question']}\nmodel: {example['prediction']}  (truth: {example['answer']})",
            fontsize=8,
            color="green" if right else "red",
        )
    figure.savefig(path, dpi=100)


@torch.no_grad()
def plot_query_attention(path: Path, qformer: Any, image: Any, vision_hidden_states: torch.Tensor) -> None:
    """Each query's cross-attention over the image patches (last cross-attention layer, mean over heads)."""
    vision_hidden_states = vision_hidden_states[None].to(qformer.device)
    output = qformer(vision_hidden_states=vision_hidden_states, output_attentions=True)
    attention = output.cross_attentions[-1][0].mean(dim=0).float().cpu()  # (Q, N): CLS token + patch grid
    grid = isqrt(attention.shape[1] - 1)
    maps = attention[:, -grid * grid :].reshape(-1, grid, grid)
    columns = min(8, len(maps)) + 1
    rows = -(-len(maps) // (columns - 1))
    figure = Figure(figsize=(1.6 * columns, 1.7 * rows + 0.3), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(image), interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    for q, attention_map in enumerate(maps):
        ax = axes[q // (columns - 1), 1 + q % (columns - 1)]
        ax.imshow(attention_map, cmap="viridis")
        ax.set_title(f"query {q}", fontsize=8)
    figure.suptitle("Q-Former cross-attention, last layer", fontsize=9)
    figure.savefig(path, dpi=100)
