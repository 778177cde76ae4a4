"""The prompt lists stage 2 draws from: one place, overridable from a JSON file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

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
    """System prompts and captioning instructions; one of each is drawn per sample, reproducibly."""

    system_prompts: list[str] = field(default_factory=lambda: list(SYSTEM_PROMPTS))
    caption_prompts: list[str] = field(default_factory=lambda: list(CAPTION_PROMPTS))

    @classmethod
    def from_json(cls, path: str | Path) -> PromptConfig:
        """Reads `{"system_prompts": [...], "caption_prompts": [...]}` (either key may be left out)."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def draw(self, seed: int, sample_index: int) -> tuple[str, str]:
        """(system prompt, caption prompt) for a sample: the same draw for the same seed and sample, so a resumed
        run sees exactly what an uninterrupted one would."""
        rng = random.Random(f"{seed}:{sample_index}")
        return rng.choice(self.system_prompts), rng.choice(self.caption_prompts)
