"""Batching for both stages. Images are decoded here (or come cached from the dataset): a row whose image cannot be
decoded, or (stage 2) that is not a usable conversation, is dropped from its batch and counted in `num_skipped`,
which the trainers log and report."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jinja2 import TemplateError

from ..processing_smolvlm_qformer import SmolVLMQFormerProcessor
from .conversations import BadRow, Conversation, conversation_from_row, independent_exchanges
from .images import decode_or_skip
from .prompts import PromptConfig

logger = logging.getLogger(__name__)


@dataclass
class RetrievalCollator:
    """Stage 1: pixel values (or cached vision features) + captions tokenised for the Q-Former; a row whose image
    cannot be decoded (or was unreadable when the cache was built) is left out and counted in `num_skipped`."""

    processor: SmolVLMQFormerProcessor
    max_caption_tokens: int = 32

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept, batch = self._image_inputs(rows)
        batch["num_skipped"] = torch.tensor([len(rows) - len(kept)])  # 1-d: batches may be concatenated
        if kept:
            captions = [row["caption"] for row in kept]
            batch.update(self.processor.retrieval_inputs(text=captions, max_length=self.max_caption_tokens))
        return batch

    def _image_inputs(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The usable rows and their image inputs: cached `vision_hidden_states`, else decoded `pixel_values`."""
        if "vision_hidden_states" in rows[0]:
            kept = [row for row in rows if row["vision_hidden_states"] is not None]
            features = {"vision_hidden_states": torch.stack([row["vision_hidden_states"][0] for row in kept])}
            return kept, features if kept else {}
        decoded = [(row, decode_or_skip(row["image"], f"of sample {row.get('sample_index')}")) for row in rows]
        kept = [row for row, image in decoded if image is not None]
        images = [image for _, image in decoded if image is not None]
        if not kept:
            return kept, {}
        return kept, {"pixel_values": self.processor.image_processor(images, return_tensors="pt")["pixel_values"]}


@dataclass
class ChatCollator:
    """Stage 2: each row as a conversation (see `conversations`), rewritten by `prompts` (system prompt and
    captioning instruction drawn per sample, reproducibly from `seed` and the row's `sample_index`), tokenized by
    the processor's chat template, right-padded, with labels on the assistant's words and end-of-turn tokens only
    (the template's `generation` spans).

    Texts are cut on token ids (a user text to `max_question_tokens`, an assistant text to `max_answer_tokens`); a
    conversation over `max_length` tokens loses whole later turns (counted in `num_dropped_turns`). A row that is
    not a usable conversation, or one of whose images cannot be decoded, is left out and counted in `num_skipped`.
    """

    processor: SmolVLMQFormerProcessor
    prompts: PromptConfig = field(default_factory=PromptConfig)
    seed: int = 0
    max_answer_tokens: int = 64
    max_question_tokens: int = 128
    max_length: int = 2048
    pad_to_multiple_of: int | None = None
    """Pad each batch to a multiple of this many tokens (None: to its longest row). On a CPU every padded position
    is computed like a token (padding the demo's rows to 8 made stage 2 about 8% slower)."""

    independent_turns: bool = False
    """Each user/assistant exchange is a sample of its own about the conversation's images (e.g. several questions
    about one image): one row per conversation all the same, in which the exchanges share their common prompt prefix
    (system prompt, image) and see nothing of each other (`pack_shared_prefix`)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features, groups, dropped = [], [], 0
        for row in rows:
            name = f"sample {row.get('sample_index')}"
            if "vision_hidden_states" in row and row["vision_hidden_states"] is None:
                logger.warning("skipping %s: an image of it was unreadable when the feature cache was built", name)
                continue
            try:
                conversation, row_dropped = self.conversation(row)
                group = independent_exchanges(conversation) if self.independent_turns else [conversation]
            except BadRow as error:
                logger.warning("skipping %s: %s", name, error)
                continue
            if "vision_hidden_states" in row:  # the conversation's images are their cached features
                features.extend(image for sample in group for image in sample.images)
            else:
                images = [decode_or_skip(image, f"of {name}") for image in conversation.images]
                if any(image is None for image in images):
                    continue
                group = [with_images(sample, images) for sample in group]
            groups.append(group)
            dropped += row_dropped
        batch: dict[str, Any] = {"num_skipped": torch.tensor([len(rows) - len(groups)])}
        batch["num_dropped_turns"] = torch.tensor([dropped])  # 1-d: batches may be concatenated
        if groups:
            samples = [sample.messages for group in groups for sample in group]
            encoded = self.encode(samples, vision_hidden_states=features if features else None)
            if self.independent_turns:
                encoded = pack_shared_prefix(
                    encoded,
                    [len(group) for group in groups],
                    [len(group[0].images) for group in groups],
                    self.processor.tokenizer.pad_token_id,
                    self.pad_to_multiple_of,
                )
            else:
                encoded = end_at_last_label(encoded, self.processor.tokenizer.pad_token_id, self.pad_to_multiple_of)
            batch.update(encoded)
        return batch

    def conversation(self, row: dict[str, Any]) -> tuple[Conversation, int]:
        """The row's conversation as it is trained on (rewritten, texts cut, later turns dropped to fit
        `max_length`) and how many turns were dropped; `BadRow` if there is none."""
        conversation = conversation_from_row(row)
        conversation = self.prompts.rewrite(conversation, self.seed, row.get("sample_index", 0), row.get("epoch", 0))
        conversation = self._cut_texts(conversation)
        return self._fit(conversation)

    def encode(self, conversations: list[list[dict]], **processor_kwargs: Any) -> dict[str, torch.Tensor]:
        """The processor's chat template over a batch of conversations: `input_ids`, `attention_mask`, `labels`
        (the assistant spans), and the image inputs."""
        processor_kwargs = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of, **processor_kwargs}
        if processor_kwargs.get("vision_hidden_states") is None:
            processor_kwargs.pop("vision_hidden_states", None)
        batch = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            **chat_template_processor_kwargs(self.processor, processor_kwargs),
        )
        batch = dict(batch)
        assistant = torch.as_tensor(batch.pop("assistant_masks")).bool() & batch["attention_mask"].bool()
        batch["labels"] = batch["input_ids"].masked_fill(~assistant, -100)
        return batch

    def _cut_texts(self, conversation: Conversation) -> Conversation:
        limits = {"user": self.max_question_tokens, "assistant": self.max_answer_tokens}
        messages = [
            {**m, "content": [self._cut(p, limits[m["role"]]) for p in m["content"]]} if m["role"] in limits else m
            for m in conversation.messages
        ]
        return Conversation(messages, conversation.images)

    def _cut(self, part: dict, max_tokens: int) -> dict:
        if part["type"] != "text":
            return part
        return {**part, "text": cut_to_tokens(self.processor.tokenizer, part["text"], max_tokens)}

    def _fit(self, conversation: Conversation) -> tuple[Conversation, int]:
        """Drops whole user/assistant exchanges from the end until the conversation fits `max_length`."""
        messages, dropped = list(conversation.messages), 0
        while (length := self._length(messages)) > self.max_length:
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
            if not any(m["role"] == "assistant" for m in messages[:last_user]):
                raise BadRow(f"its first exchange alone is {length} tokens, over max_length={self.max_length}")
            dropped += len(messages) - last_user
            messages = messages[:last_user]
        return Conversation(messages, conversation.images[: Conversation(messages, []).num_image_parts]), dropped

    def _length(self, messages: list[dict]) -> int:
        """Tokens of the conversation as the chat template writes it; `BadRow` if the template cannot (a role or
        order it rejects, assistant text it rewrites)."""
        try:
            prompt = self.processor.apply_chat_template(messages, tokenize=False, return_assistant_tokens_mask=True)
        except (TemplateError, ValueError) as error:
            raise BadRow(f"the chat template cannot render it: {error}") from error
        return len(self.processor.encode_text([prompt], padding=False)["input_ids"][0])


def label_ends(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where each right-padded sample ends for training: just after its last label (what follows it predicts
    nothing), or at its last token if it has no label."""
    labelled = batch["labels"] != -100
    last = (labelled * torch.arange(1, labelled.shape[1] + 1)).amax(dim=1)
    return torch.where(labelled.any(dim=1), last, batch["attention_mask"].sum(dim=1))


def end_at_last_label(
    batch: dict[str, torch.Tensor], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded samples (`input_ids` / `attention_mask` / `labels`) cut at `label_ends` and the batch narrowed
    to its longest: the causal LM's loss never reads those positions (ChatML's newline after the last end-of-turn),
    so they would only cost compute. Loss and gradients are unchanged."""
    ends = label_ends(batch)
    length = _round_up(int(ends.max()), pad_to_multiple_of)
    keep = torch.arange(length) < ends[:, None]
    return {
        **batch,
        "input_ids": batch["input_ids"][:, :length].masked_fill(~keep, pad_token_id),
        "attention_mask": batch["attention_mask"][:, :length] * keep,
        "labels": batch["labels"][:, :length],
    }


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


def pack_shared_prefix(
    batch: dict[str, torch.Tensor],
    group_sizes: list[int],
    images_per_sample: list[int],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Each group of consecutive encoded samples (right-padded `input_ids` / `attention_mask` / `labels`, images in
    order) as one row: their longest common prefix once, then each sample's remainder. The 4-D boolean
    `attention_mask` (B, 1, T, T) lets a remainder see the prefix and itself only, and `position_ids` continue the
    prefix in every remainder, so each sample gets the loss and gradients it has as a row of its own, while the
    prefix (system prompt, image) is computed once. The prefix stops before any position that predicts a label, and
    each remainder at its last label.
    A group's samples share their images: the first sample's are kept."""
    rows, keep_images, sample, image = [], [], 0, 0
    ends = label_ends(batch)
    for size, num_images in zip(group_sizes, images_per_sample, strict=True):
        members = range(sample, sample + size)
        ids, labels, limits = [], [], []
        for i in members:
            labelled = (batch["labels"][i] != -100).nonzero().flatten()
            end = int(ends[i])
            ids.append(batch["input_ids"][i][:end])
            labels.append(batch["labels"][i][:end])
            # the prefix's last position predicts each sample's next token: that token must carry no label
            limits.append(int(labelled[0]) - 1 if len(labelled) else end)
        shared = max(0, min(_common_prefix_length(ids), *limits))
        rows.append(
            {
                "input_ids": torch.cat([ids[0][:shared]] + [x[shared:] for x in ids]),
                "labels": torch.cat([labels[0][:shared]] + [x[shared:] for x in labels]),
                "position_ids": torch.cat([torch.arange(shared)] + [torch.arange(shared, len(x)) for x in ids]),
                "segment": torch.cat(
                    [torch.full((shared,), -1)] + [torch.full((len(x) - shared,), k) for k, x in enumerate(ids)]
                ),
            }
        )
        keep_images.extend(range(image, image + num_images))
        sample, image = sample + size, image + num_images * size
    length = _round_up(max(len(row["input_ids"]) for row in rows), pad_to_multiple_of)
    pads = {"input_ids": pad_token_id, "labels": -100, "position_ids": 0, "segment": -2}
    packed = {
        key: torch.stack([F.pad(row[key], (0, length - len(row[key])), value=value) for row in rows])
        for key, value in pads.items()
    }
    segment = packed.pop("segment")
    sees = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)
    sees &= torch.ones(length, length, dtype=torch.bool).tril() & (segment != -2)[:, None, :]
    packed["attention_mask"] = (sees | torch.eye(length, dtype=torch.bool)).unsqueeze(1)  # a pad sees itself
    for key in ("pixel_values", "vision_hidden_states"):
        if key in batch:
            packed[key] = batch[key][keep_images]
    return packed


def _common_prefix_length(sequences: list[torch.Tensor]) -> int:
    length = min(len(x) for x in sequences)
    same = torch.stack([x[:length] == sequences[0][:length] for x in sequences]).all(dim=0)
    return int(same.long().cumprod(0).sum())


def cut_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """`text` stripped, and cut to its first `max_tokens` tokens if longer (the one place texts are truncated)."""
    text = text.strip()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:  # the common case: no decode and re-encode per sample
        return text
    keep = max_tokens
    # a cut inside a word can re-encode into more tokens: cut shorter until the text itself fits
    while len(tokenizer(cut := tokenizer.decode(ids[:keep]), add_special_tokens=False).input_ids) > max_tokens:
        keep -= 1
    return cut


def with_images(conversation: Conversation, images: list[Any]) -> Conversation:
    """The conversation with each image part holding its (decoded) image, as `apply_chat_template` reads them."""
    images = iter(images)
    messages = [
        {**m, "content": [{**p, "image": next(images)} if p["type"] == "image" else p for p in m["content"]]}
        for m in conversation.messages
    ]
    return Conversation(messages, conversation.images)


def chat_template_processor_kwargs(processor: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """How `apply_chat_template` takes arguments for the processor call: in `processor_kwargs` (transformers >= 5.4)
    or among its own keyword arguments (4.x)."""
    if "processor_kwargs" in inspect.signature(processor.apply_chat_template).parameters:
        return {"processor_kwargs": kwargs}
    return kwargs
