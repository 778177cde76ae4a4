"""Batching for both stages. Images are decoded here (or come cached from the dataset): a row whose image cannot be
decoded is dropped from its batch and counted in `num_skipped`, which the trainers log and report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..processing_smolvlm_qformer import SmolVLMQFormerProcessor
from .images import decode_or_skip
from .prompts import PromptConfig


@dataclass
class _ImageCollator:
    """Shared by both stages: keeps the rows whose image decodes (or whose cached features are valid)."""

    processor: SmolVLMQFormerProcessor

    def _image_inputs(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The usable rows and their image inputs: cached `vision_hidden_states`, else decoded `pixel_values`."""
        if "vision_hidden_states" in rows[0]:
            kept = [row for row in rows if row["vision_hidden_states"] is not None]
            features = {"vision_hidden_states": torch.stack([row["vision_hidden_states"] for row in kept])}
            return kept, features if kept else {}
        decoded = [(row, decode_or_skip(row["image"], f"of sample {row.get('sample_index')}")) for row in rows]
        kept = [row for row, image in decoded if image is not None]
        images = [image for _, image in decoded if image is not None]
        if not kept:
            return kept, {}
        return kept, {"pixel_values": self.processor.image_processor(images, return_tensors="pt")["pixel_values"]}


@dataclass
class RetrievalCollator(_ImageCollator):
    """Stage 1: pixel values (or cached image embeddings) + captions tokenised for the Q-Former."""

    max_caption_tokens: int = 32

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept, batch = self._image_inputs(rows)
        batch["num_skipped"] = torch.tensor([len(rows) - len(kept)])  # 1-d: batches may be concatenated
        if kept:
            text = self.processor.qformer_tokenizer(
                [row["caption"] for row in kept],
                padding=True,
                truncation=True,
                max_length=self.max_caption_tokens,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            batch.update(text)
        return batch


@dataclass
class ChatCollator(_ImageCollator):
    """Stage 2: [system prompt][image placeholders][user prompt][answer] as one chat, right-padded, with labels on
    the answer and its end-of-turn token only.

    The user prompt is the row's question (VQA data) or a captioning instruction; the system and captioning prompts
    are drawn per sample from `prompts`, reproducibly (`seed`, `sample_index`).
    """

    prompts: PromptConfig = field(default_factory=PromptConfig)
    seed: int = 0
    max_answer_tokens: int = 64
    max_question_tokens: int = 128

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept, batch = self._image_inputs(rows)
        batch["num_skipped"] = torch.tensor([len(rows) - len(kept)])  # 1-d: batches may be concatenated
        if not kept:
            return batch
        tokenizer = self.processor.tokenizer
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        sequences, labels = [], []
        for row in kept:
            prompt_ids, answer_ids = self.encode(row)
            answer_ids = answer_ids[: self.max_answer_tokens] + [end_of_turn]
            sequences.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        length = max(map(len, sequences))
        pad = tokenizer.pad_token_id
        batch["input_ids"] = torch.tensor([s + [pad] * (length - len(s)) for s in sequences])
        batch["attention_mask"] = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
        batch["labels"] = torch.tensor([label + [-100] * (length - len(label)) for label in labels])
        return batch

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """Token ids of the chat prompt (image placeholders expanded, ready for the answer) and of the answer."""
        system_prompt, caption_prompt = self.prompts.draw(self.seed, row["sample_index"])
        question = self.truncate_question(row.get("question")) or caption_prompt
        answer = row.get("answer") or row["caption"]
        prompt = self.processor.expand_image_tokens(self.processor.build_prompt(question, system_prompt))
        tokenizer = self.processor.tokenizer
        return (
            tokenizer(prompt, add_special_tokens=False).input_ids,
            tokenizer(answer.strip(), add_special_tokens=False).input_ids,
        )

    def truncate_question(self, question: str | None) -> str | None:
        """The question cut to its first `max_question_tokens` LM tokens (the chat prompt around it stays whole)."""
        if not question:
            return question
        ids = self.processor.tokenizer(question, add_special_tokens=False).input_ids
        return (
            question
            if len(ids) <= self.max_question_tokens
            else self.processor.tokenizer.decode(ids[: self.max_question_tokens])
        )
