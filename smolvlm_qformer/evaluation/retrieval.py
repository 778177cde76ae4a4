"""Image-text retrieval evaluation of the stage-1 model: R@K both ways, from ITC scores, optionally ITM re-ranked.

As in LAVIS' BLIP-2: images and texts are embedded once each, every image is scored against every text with the
best-matching query (`image_text_similarity`), and with `itm_top_k` the top-k candidates of each image and of each
text are re-scored with the ITM head (ITM positive logit + ITC score; candidates outside the top-k get -inf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..modeling_smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval, encode_images, image_text_similarity
from ..processing_smolvlm_qformer import SmolVLMQFormerProcessor


def retrieval_recall_at_k(
    similarity: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    text_to_image_similarity: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall at each k, as fractions, plus their mean (`mean_recall`).

    Args:
        similarity: (num_images, num_texts) scores; each image ranks the texts by its row.
        text_to_image: the image of each text (an image's positives are all its texts), or a (num_images, num_texts)
            boolean matrix of positives when a text fits several images (e.g. images that share a caption).
        ks: the cut-offs.
        text_to_image_similarity: (num_images, num_texts) scores each text ranks the images by (its column), when they
            differ from `similarity` (ITM re-ranking re-scores each direction's own top-k).

    A query's rank is the number of wrong candidates scoring at least as high as its best right one: ties count
    against the model, so a constant score does not get perfect recall.
    """
    text_to_image = torch.as_tensor(text_to_image, device=similarity.device)
    if text_to_image.ndim == 2:
        positives = text_to_image.bool()
    else:
        images = torch.arange(similarity.shape[0], device=similarity.device)
        positives = text_to_image.unsqueeze(0) == images.unsqueeze(1)
    t2i = similarity if text_to_image_similarity is None else text_to_image_similarity

    best_text = similarity.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    image_ranks = ((similarity >= best_text) & ~positives).sum(dim=1)
    best_image = t2i.masked_fill(~positives, float("-inf")).amax(dim=0, keepdim=True)
    text_ranks = ((t2i >= best_image) & ~positives).sum(dim=0)

    results = {f"image_to_text_r{k}": (image_ranks < k).sum().item() / len(image_ranks) for k in ks}
    results |= {f"text_to_image_r{k}": (text_ranks < k).sum().item() / len(text_ranks) for k in ks}
    results["mean_recall"] = sum(results.values()) / len(results)
    return results


@dataclass
class RetrievalScores:
    """(num_images, num_texts) scores each image ranks the texts by, and each text ranks the images by (the same
    tensor without ITM re-ranking)."""

    image_to_text: torch.Tensor
    text_to_image: torch.Tensor


@torch.no_grad()
def retrieval_scores(
    model: SmolVLMQFormerForImageTextRetrieval,
    processor: SmolVLMQFormerProcessor,
    images: Sequence[Any] | torch.Tensor,
    texts: Sequence[str],
    batch_size: int = 64,
    itm_top_k: int | None = None,
    max_length: int = 32,
) -> RetrievalScores:
    """Scores every image against every text with the ITC similarity, images and texts each embedded once in
    batches; with `itm_top_k`, each direction's top-k re-ranked by ITM (pick k >= the largest recall cut-off).
    `images` may also be the vision encoder's outputs (num_images, N, Dv), e.g. from a feature cache.

    Without ITM only (B, Q, E) image features live at a time; with it, the vision encoder's outputs for all images
    are kept on the model's device.
    """
    device = model.device
    text_inputs = processor.retrieval_inputs(text=list(texts), max_length=max_length).to(device)
    text_feats = torch.cat(
        [
            model.get_text_features(
                text_inputs.input_ids[i : i + batch_size], text_inputs.attention_mask[i : i + batch_size]
            )
            for i in range(0, len(texts), batch_size)
        ]
    )
    rows, vision_outputs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if isinstance(images, torch.Tensor):  # the vision encoder's outputs, already computed
            vision_hidden_states = batch.to(device)
        else:
            pixel_values = processor.retrieval_inputs(images=list(batch)).pixel_values.to(device)
            vision_hidden_states = encode_images(model.vision_model, pixel_values, None).last_hidden_state
        image_feats = model.get_image_features(vision_hidden_states=vision_hidden_states)
        rows.append(image_text_similarity(image_feats, text_feats).float())
        if itm_top_k is not None:
            vision_outputs.append(vision_hidden_states)
    similarity = torch.cat(rows)
    if itm_top_k is None:
        return RetrievalScores(image_to_text=similarity.cpu(), text_to_image=similarity.cpu())

    vision_hidden_states = torch.cat(vision_outputs)
    ids, mask = text_inputs.input_ids, text_inputs.attention_mask

    def itm_positive(images: torch.Tensor, pair_ids: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        return model.itm_logits(images, pair_ids, pair_mask)[:, 1].float()

    image_to_text = torch.full_like(similarity, float("-inf"))
    for i in range(similarity.shape[0]):
        top_sim, top = similarity[i].topk(min(itm_top_k, similarity.shape[1]))
        pair_images = vision_hidden_states[i : i + 1].expand(len(top), -1, -1)
        image_to_text[i, top] = top_sim + itm_positive(pair_images, ids[top], mask[top])
    text_to_image = torch.full_like(similarity, float("-inf"))
    for t in range(similarity.shape[1]):
        top_sim, top = similarity[:, t].topk(min(itm_top_k, similarity.shape[0]))
        pair_ids, pair_mask = ids[t : t + 1].expand(len(top), -1), mask[t : t + 1].expand(len(top), -1)
        text_to_image[top, t] = top_sim + itm_positive(vision_hidden_states[top], pair_ids, pair_mask)
    return RetrievalScores(image_to_text=image_to_text.cpu(), text_to_image=text_to_image.cpu())


def evaluate_retrieval(
    model: SmolVLMQFormerForImageTextRetrieval,
    processor: SmolVLMQFormerProcessor,
    images: Sequence[Any],
    captions: Sequence[Sequence[str]],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    itm_top_k: int | None = None,
) -> dict[str, float]:
    """R@K both ways over a test set given as images and the captions of each image (e.g. COCO's 5 per image)."""
    texts = [caption for image_captions in captions for caption in image_captions]
    text_to_image = [i for i, image_captions in enumerate(captions) for _ in image_captions]
    scores = retrieval_scores(model, processor, images, texts, batch_size=batch_size, itm_top_k=itm_top_k)
    return retrieval_recall_at_k(scores.image_to_text, text_to_image, ks, scores.text_to_image)
