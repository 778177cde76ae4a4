"""Scores the demo (`smolvlm-qformer demo`) reports on easy-VQA's test split beside the model's: exact-match accuracy,
the yes/no questions against answering from their wording alone, and what the frozen vision features alone give;
and the table it prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch

from ..data import FeatureCache
from ..data.easy_vqa import YES_NO, wording_answer
from .baselines import linear_probe_predictions, nearest_targets, nearest_text_scores, pool_features
from .metrics import load_metric
from .retrieval import retrieval_recall_at_k

RECALL_KS = (1, 5)


def exact_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact match after the VQA answer normalisation (case, punctuation, articles): the project's VQA accuracy."""
    return load_metric("vqa_accuracy").compute(predictions=predictions, references=references)["vqa_accuracy"]


def yes_no_metrics(questions: Sequence[str], references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy on the yes/no test questions, and what answering them from the wording alone scores (plain -> "no",
    negated -> "yes"): where stage 2 stalls when it has not learned to read the image for them."""
    chosen = [i for i, answer in enumerate(references) if answer in YES_NO]
    truth = [references[i] for i in chosen]
    return {
        "yes_no_accuracy": exact_accuracy([predictions[i] for i in chosen], truth),
        "wording_baseline": exact_accuracy([wording_answer(questions[i]) for i in chosen], truth),
        "num_test_yes_no": len(chosen),
    }


def frozen_feature_baselines(
    caches: dict[str, FeatureCache],
    train_questions: datasets.Dataset,
    train_captions: datasets.Dataset,
    test_questions: datasets.Dataset,
    test_captions: datasets.Dataset,
    test_images: datasets.Dataset,
) -> dict[str, float]:
    """What the frozen vision features alone give on the test rows (`evaluation.baselines`): the answer of the
    nearest training image asked the same question, the caption of the nearest captioned training image (and the
    retrieval R@K of those nearest-caption scores), and a linear probe's caption accuracy."""

    def pooled(split: str, paths: Sequence[str]) -> torch.Tensor:
        return pool_features(caches[split].features(paths))

    train_paths = [*train_questions["image"], *train_captions["image"]]
    test_paths = [*test_questions["image"], *test_captions["image"]]
    nearest = nearest_targets(
        pooled("test", test_paths),
        test_paths,
        [*test_questions["question"], *[None] * len(test_captions)],
        pooled("train", train_paths),
        train_paths,
        [*train_questions["question"], *[None] * len(train_captions)],
        [*train_questions["answer"], *train_captions["caption"]],
    )
    nearest = ["" if target is None else target for target in nearest]  # a question nobody was asked: wrong
    caption_features = pooled("train", train_captions["image"])
    probe = linear_probe_predictions(
        caption_features, train_captions["caption"], pooled("test", test_captions["image"])
    )
    texts = sorted(set(test_images["caption"]))
    scores = nearest_text_scores(
        pooled("test", test_images["image"]),
        test_images["image"],
        caption_features,
        train_captions["image"],
        [[caption] for caption in train_captions["caption"]],
        texts,
    )
    positives = torch.tensor([[caption == text for text in texts] for caption in test_images["caption"]])
    recall = retrieval_recall_at_k(scores, positives, RECALL_KS)
    return {
        "nearest_vqa_accuracy": exact_accuracy(nearest[: len(test_questions)], test_questions["answer"]),
        "nearest_caption_accuracy": exact_accuracy(nearest[len(test_questions) :], test_captions["caption"]),
        "probe_caption_accuracy": exact_accuracy(probe, test_captions["caption"]),
        **{f"nearest_{name}": value for name, value in recall.items() if name != "mean_recall"},
    }


def demo_table(metrics: dict[str, Any]) -> str:
    """The final table: the model on the test split against its baselines, then seconds per stage."""
    rows = [
        (f"VQA accuracy ({metrics['num_test_questions']} questions)", "vqa_accuracy", "majority_baseline"),
        (f"  yes/no ({metrics['num_test_yes_no']} of them)", "yes_no_accuracy", "wording_baseline"),
        (f"caption accuracy ({metrics['num_test_captions']} images)", "caption_accuracy", None),
    ]
    for direction, name in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        rows += [(f"{name} R@{k}", f"{direction}_r{k}", None) for k in RECALL_KS]
    baselines = metrics["frozen_feature_baselines"]
    lines = [f"{'easy-VQA test':<36}{'model':>8}{'baseline':>10}{'nearest':>9}{'probe':>7}"]
    for label, value, baseline in rows:
        line = f"{label:<36}{metrics[value]:>8.1%}" + (f"{metrics[baseline]:>10.1%}" if baseline else " " * 10)
        nearest, probe = baselines.get(f"nearest_{value}"), baselines.get(f"probe_{value}")
        line += (f"{nearest:>9.1%}" if nearest is not None else " " * 9) + (
            f"{probe:>7.1%}" if probe is not None else ""
        )
        lines.append(line.rstrip())
    lines.append(
        f"baselines: the majority answer ({metrics['majority_answer']!r}); yes/no from the wording alone, without the "
        "image (plain -> no, negated -> yes); nearest: the answer / caption of the nearest training image (cosine of "
        "the frozen vision features, pooled); probe: a linear probe on those features predicting the caption"
    )
    lines.append("seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in metrics["seconds"].items()))
    return "\n".join(lines)
