"""The conversation rewrites of stage 2, in one place: the system prompt and captioning instruction drawn per sample
(the lists overridable from a JSON file), and optionally the order of independent turns, shuffled per epoch."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .conversations import Conversation

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant that can see images. Respond truthfully to the user.",
    "You are a vision assistant. Answer questions about the image accurately and concisely.",
    "You are an AI that describes images faithfully.",
]

CAPTION_PROMPTS = [
    "Describe the image.",
    "What do you see in this image?",
    "Write a short caption for this image.",
    "What is shown in the picture?",
    "Describe this picture in one sentence.",
]


@dataclass
class PromptConfig:
    """System prompts and captioning instructions; one of each is drawn per sample, reproducibly.

    `shuffle_turns`: a conversation whose images all come in its first user turn (e.g. several questions about one
    image) has its user/assistant pairs in a new order each epoch, the images staying at the start."""

    system_prompts: list[str] = field(default_factory=lambda: list(SYSTEM_PROMPTS))
    caption_prompts: list[str] = field(default_factory=lambda: list(CAPTION_PROMPTS))
    shuffle_turns: bool = False

    @classmethod
    def from_json(cls, path: str | Path) -> PromptConfig:
        """Reads `{"system_prompts": [...], "caption_prompts": [...]}` (either key may be left out)."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def draw(self, seed: int, sample_index: int) -> tuple[str, str]:
        """(system prompt, caption prompt) for a sample: the same draw for the same seed and sample, so a resumed
        run sees exactly what an uninterrupted one would."""
        rng = random.Random(f"{seed}:{sample_index}")
        return rng.choice(self.system_prompts), rng.choice(self.caption_prompts)

    def rewrite(self, conversation: Conversation, seed: int, sample_index: int, epoch: int = 0) -> Conversation:
        """The conversation as stage 2 trains on it: the drawn system prompt unless it has one, the drawn captioning
        instruction in each user turn that holds images and no words, and (`shuffle_turns`) its turns reordered."""
        system_prompt, caption_prompt = self.draw(seed, sample_index)
        messages = [_with_instruction(message, caption_prompt) for message in conversation.messages]
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        if self.shuffle_turns:
            messages = messages[:1] + _shuffled(messages[1:], random.Random(f"{seed}:{epoch}:{sample_index}"))
        return Conversation(messages, conversation.images)


def _with_instruction(message: dict, instruction: str) -> dict:
    parts = message["content"]
    if message["role"] != "user" or any(p["type"] == "text" and p["text"].strip() for p in parts) or not parts:
        return message
    return {**message, "content": [*parts, {"type": "text", "text": instruction}]}


def _shuffled(turns: list[dict], rng: random.Random) -> list[dict]:
    """User/assistant pairs in a random order, the first user turn's images moved to the new first one; other
    conversations (images in later turns, turns not in pairs) as they are."""
    pairs = [turns[i : i + 2] for i in range(0, len(turns), 2)]
    roles_paired = all([t["role"] for t in pair] == ["user", "assistant"] for pair in pairs)
    later_images = any(p["type"] == "image" for pair in pairs[1:] for t in pair for p in t["content"])
    if not roles_paired or later_images or len(pairs) < 2:
        return turns
    images = [p for p in pairs[0][0]["content"] if p["type"] == "image"]
    pairs[0] = [{**pairs[0][0], "content": [p for p in pairs[0][0]["content"] if p["type"] != "image"]}, pairs[0][1]]
    rng.shuffle(pairs)
    pairs[0] = [{**pairs[0][0], "content": images + pairs[0][0]["content"]}, pairs[0][1]]
    return [turn for pair in pairs for turn in pair]
