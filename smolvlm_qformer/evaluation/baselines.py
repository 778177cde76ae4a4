"""What the frozen vision features alone score on an evaluation split: the baselines `evaluate` prints beside the
model, so a user sees whether the VLM learned more than retrieval from the features it was given.

- **Nearest neighbour**: each evaluated image takes the caption (for a question: the answer) of the training image
  nearest to it, by cosine similarity of pooled features, and is scored with the model's own metrics. An answer comes
  from the nearest training image asked the same question; a question no other training image was asked gets an
  empty answer (wrong). The evaluated image itself is never its own neighbour (`evaluate --split train` then scores
  leave-one-out). For retrieval, an image scores a text by its similarity to the nearest training image with that
  caption (-inf for a text no training image has: free-text captions give this baseline nothing to retrieve).
- **Linear probe**: where the captions are class-like (`is_class_like`: every distinct training caption is given to
  at least two training images, each of which has one caption), a multinomial logistic regression on the pooled
  features predicts the caption; its accuracy is exact match after the VQA answer normalisation, as the model's
  `caption_accuracy`.

Pooled features (`pool_features`): the vision encoder's first output token ([CLS] in ViT and DINOv2) concatenated with
the mean of the other tokens, as DINOv2's linear evaluation pools. They come from a feature cache where it holds the
image (`smolvlm-qformer cache-features`), otherwise from the vision encoder, a batch at a time.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.feature_cache import FeatureCache, encode_image_batch
from .vqa_normalization import normalize_vqa_answer

logger = logging.getLogger(__name__)

PROBE_STEPS = 100
PROBE_WEIGHT_DECAY = 1e-3


def pool_features(vision_hidden_states: torch.Tensor) -> torch.Tensor:
    """(n, 2 * width) float32: the first token ([CLS]) and the mean of the others, of (n, tokens, width) outputs."""
    hidden = vision_hidden_states.float()
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)


def pooled_image_features(
    images: Sequence[tuple[str, Any]],
    caches: Sequence[FeatureCache] = (),
    load_encoder: Callable[[], tuple[torch.nn.Module, Any]] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (n, 2 * width) of (image key, undecoded image) pairs and a bool mask of the readable ones.

    An image a cache holds (by its key) is read from the first such cache; the others go through the vision encoder
    that `load_encoder` returns (with its image processor), called only if some image needs it. Unreadable images
    get zeros."""
    located: list[tuple[FeatureCache, int] | None] = []
    for key, _ in images:
        cache = next((cache for cache in caches if key in cache.index), None)
        located.append(None if cache is None else (cache, cache.index[key]))
    pooled: list[torch.Tensor | None] = [None] * len(images)
    valid = torch.zeros(len(images), dtype=torch.bool)
    for cache in caches:
        positions = [i for i, where in enumerate(located) if where is not None and where[0] is cache]
        for start in range(0, len(positions), batch_size):
            batch = positions[start : start + batch_size]
            features, readable = cache.get([located[i][1] for i in batch])
            for i, feature, ok in zip(batch, pool_features(features), readable, strict=True):
                pooled[i], valid[i] = feature, ok
    missing = [i for i, where in enumerate(located) if where is None]
    if missing:
        if load_encoder is None:
            raise ValueError(f"{len(missing)} images are in no feature cache and no vision encoder was given")
        vision_model, image_processor = load_encoder()
        logger.info("baselines: encoding %d images the feature cache does not hold", len(missing))
        progress = tqdm(total=len(missing), unit="img", desc="baseline features", file=sys.stderr)
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            features, readable = encode_image_batch(
                vision_model, image_processor, [(images[i][1], images[i][0]) for i in batch], device
            )
            for i, feature, ok in zip(batch, pool_features(features), readable, strict=True):
                pooled[i], valid[i] = feature, ok
            progress.update(len(batch))
        progress.close()
    width = next((feature.shape[-1] for feature in pooled if feature is not None), 0)
    return torch.stack(pooled) if pooled else torch.zeros(0, width), valid


def nearest_neighbours(
    queries: torch.Tensor, keys: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The index of each query's most cosine-similar key, and that similarity; `exclude` (num_queries, num_keys)
    marks pairs that may not match (-1 and -inf where a query has no candidate left). Ties go to the lower index."""
    similarity = cosine_similarity(queries, keys)
    if exclude is not None:
        similarity = similarity.masked_fill(exclude, float("-inf"))
    if not similarity.shape[1]:
        return torch.full((len(queries),), -1), torch.full((len(queries),), float("-inf"))
    best, index = similarity.max(dim=1)
    return torch.where(best > float("-inf"), index, -1), best


def cosine_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(num_queries, num_keys) cosine similarities of two sets of row vectors."""
    queries, keys = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (queries, keys))
    return queries @ keys.T


def nearest_targets(
    query_features: torch.Tensor,
    query_keys: Sequence[str],
    query_groups: Sequence[Hashable],
    train_features: torch.Tensor,
    train_keys: Sequence[str],
    train_groups: Sequence[Hashable],
    train_targets: Sequence[str],
) -> list[str | None]:
    """For each query (an image's features, its key and its group: the question, or None for a caption), the target of
    the most similar training item of the same group whose image is not the query's own; None where there is none."""
    by_group: dict[Hashable, list[int]] = {}
    for index, group in enumerate(train_groups):
        by_group.setdefault(group, []).append(index)
    targets: list[str | None] = [None] * len(query_keys)
    query_by_group: dict[Hashable, list[int]] = {}
    for index, group in enumerate(query_groups):
        query_by_group.setdefault(group, []).append(index)
    for group, queries in query_by_group.items():
        candidates = by_group.get(group, [])
        own = [[query_keys[q] == train_keys[c] for c in candidates] for q in queries]
        own = torch.tensor(own, dtype=torch.bool).view(len(queries), len(candidates))
        index, _ = nearest_neighbours(query_features[queries], train_features[candidates], own)
        for query, found in zip(queries, index.tolist(), strict=True):
            targets[query] = train_targets[candidates[found]] if found >= 0 else None
    return targets


def nearest_text_scores(
    query_features: torch.Tensor,
    query_keys: Sequence[str],
    train_features: torch.Tensor,
    train_keys: Sequence[str],
    train_texts: Sequence[Sequence[str]],
    texts: Sequence[str],
) -> torch.Tensor:
    """(num_queries, num_texts): each query image's similarity to the nearest training image (not itself) that has
    that text among its captions; -inf where none has."""
    similarity = cosine_similarity(query_features, train_features)
    own = [[key == train_key for train_key in train_keys] for key in query_keys]
    own = torch.tensor(own, dtype=torch.bool).view(similarity.shape)
    similarity = similarity.masked_fill(own, float("-inf"))
    holders: dict[str, list[int]] = {}
    for index, image_texts in enumerate(train_texts):
        for text in image_texts:
            holders.setdefault(text, []).append(index)
    scores = torch.full((len(query_keys), len(texts)), float("-inf"))
    for column, text in enumerate(texts):
        if text in holders:
            scores[:, column] = similarity[:, holders[text]].amax(dim=1)
    return scores


def is_class_like(captions: Sequence[Sequence[str]]) -> bool:
    """Whether training images' captions are class labels a probe can learn: each image has exactly one caption, and
    every distinct caption (at least two of them) belongs to at least two images."""
    if not captions or any(len(image_captions) != 1 for image_captions in captions):
        return False
    counts = Counter(image_captions[0] for image_captions in captions)
    return len(counts) >= 2 and min(counts.values()) >= 2


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = PROBE_STEPS,
    weight_decay: float = PROBE_WEIGHT_DECAY,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression on standardised features, fitted full-batch with L-BFGS from zero weights
    (deterministic, and seconds for thousands of images); returns a function from features to class logits."""
    features = features.float()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    standardised = (features - mean) / std
    linear = torch.nn.Linear(features.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(standardised), labels)
        loss = loss + weight_decay / 2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    linear.requires_grad_(False)
    return lambda x: linear((x.float() - mean) / std)


def linear_probe_predictions(
    train_features: torch.Tensor, train_captions: Sequence[str], eval_features: torch.Tensor
) -> list[str]:
    """The caption a linear probe (`fit_linear_probe`) trained on (features, caption) pairs gives each eval image."""
    classes = sorted(set(train_captions))
    labels = torch.tensor([classes.index(caption) for caption in train_captions])
    probe = fit_linear_probe(train_features, labels, len(classes))
    return [classes[index] for index in probe(eval_features).argmax(dim=1).tolist()]


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The share of predictions equal to one of their references after the VQA answer normalisation (case,
    punctuation, articles): whether a caption names its image's class."""
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(
        normalize_vqa_answer(prediction) in {normalize_vqa_answer(reference) for reference in refs}
        for prediction, refs in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)
