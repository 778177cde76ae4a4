"""Processor for SmolVLM-QFormer: image processor + LM tokenizer (+ the Q-Former's tokenizer for retrieval).

A prompt marks the image with one `<image>` token; the processor expands it into `num_query_tokens` placeholders,
whose embeddings the model replaces with the adapted Q-Former queries.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs

IMAGE_TOKEN = "<image>"
QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_CAPTION_PROMPT = "Describe the image."

# ChatML (SmolLM2's format). An {"type": "image"} entry becomes the image marker; a conversation without a system
# turn gets the default one, so the image sits between the system prompt and the user's words.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class SmolVLMQFormerProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {
        # the chat template writes the special tokens; the LM takes no token types
        "text_kwargs": {"padding": True, "add_special_tokens": False, "return_token_type_ids": False},
        "common_kwargs": {"return_tensors": "pt"},
    }


def make_tokenizer_config_portable(path: str | os.PathLike) -> None:
    """Rewrites what transformers 5 writes and 4.x cannot read: the `TokenizersBackend` class name and a list of
    `extra_special_tokens` (4.x's `additional_special_tokens`, which 5.x reads too)."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def to_rgb(image: Any) -> Any:
    """PIL images of any mode (CMYK, RGBA, palette, 16-bit, ...) to RGB; arrays and tensors pass through."""
    if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB":
        return image.convert("RGB")
    return image


class SmolVLMQFormerProcessor(ProcessorMixin):
    """Prepares images and prompts for `SmolVLMQFormerForConditionalGeneration` (and, with `retrieval_inputs`,
    for the stage-1 `SmolVLMQFormerForImageTextRetrieval`).

    Args:
        image_processor: the vision encoder's image processor.
        tokenizer: the LM's tokenizer; the image token is added to it as a special token if missing.
        qformer_tokenizer: the Q-Former's (DistilBERT) tokenizer.
        num_query_tokens: how many placeholders one image marker expands into (the model's query count).
        chat_template: Jinja chat template; the default is ChatML with image entries.
    """

    attributes = ["image_processor", "tokenizer", "qformer_tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"
    qformer_tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        qformer_tokenizer=None,
        num_query_tokens: int = 32,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tokenizer.padding_side = "left"  # generation appends on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.num_query_tokens = num_query_tokens
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        super().__init__(image_processor, tokenizer, qformer_tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @classmethod
    def from_backbones(
        cls,
        vision: str = "google/vit-base-patch16-224-in21k",
        qformer: str = "distilbert-base-uncased",
        language_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
        num_query_tokens: int = 32,
    ) -> SmolVLMQFormerProcessor:
        """The processor matching `from_backbones` models: each checkpoint's image processor or tokenizer."""
        return cls(
            AutoImageProcessor.from_pretrained(vision),
            AutoTokenizer.from_pretrained(language_model),
            AutoTokenizer.from_pretrained(qformer),
            num_query_tokens=num_query_tokens,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Saves the components, the Q-Former tokenizer in `qformer_tokenizer/`, and this file as remote code, in a
        layout that transformers 4.x and 5.x both load."""
        type(self).register_for_auto_class("AutoProcessor")
        self.attributes = ["image_processor", "tokenizer"]  # 4.x would write both tokenizers into the root
        try:
            files = super().save_pretrained(save_directory, **kwargs)
        finally:
            del self.attributes
        qformer_folder = os.path.join(save_directory, QFORMER_TOKENIZER_FOLDER)
        self.qformer_tokenizer.save_pretrained(qformer_folder)
        self.image_processor.save_pretrained(save_directory)  # 5.x nests it in processor_config.json only
        for folder in (save_directory, qformer_folder):
            make_tokenizer_config_portable(os.path.join(folder, "tokenizer_config.json"))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        # 4.x looks for every tokenizer in the root folder; the Q-Former's lives in its own.
        processor.qformer_tokenizer = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, subfolder=QFORMER_TOKENIZER_FOLDER
        )
        return processor

    def build_prompt(self, question: str | None = None, system_prompt: str | None = None) -> str:
        """The chat prompt for one image and a question (a captioning instruction if None), ready for generation."""
        messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        content = [{"type": "image"}, {"type": "text", "text": question or DEFAULT_CAPTION_PROMPT}]
        messages.append({"role": "user", "content": content})
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def default_prompt_ids(self) -> list[int]:
        """Token ids of the captioning prompt, image placeholders expanded (the model's `default_prompt_ids`)."""
        return self.tokenizer(self.expand_image_tokens(self.build_prompt()), add_special_tokens=False).input_ids

    def expand_image_tokens(self, prompt: str) -> str:
        return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_query_tokens)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        audio: Any = None,
        videos: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Prompts (with `<image>` markers, or plain questions that get wrapped in the chat template with one image)
        and images -> `input_ids`, `attention_mask` (left-padded) and `pixel_values`.

        With images and no text, each image gets the captioning prompt.
        """
        if audio is not None or videos is not None:
            raise ValueError(f"{type(self).__name__} takes images and text only")
        output_kwargs = self._merge_kwargs(
            SmolVLMQFormerProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        images = self._as_image_list(images)
        if text is None:
            if not images:
                raise ValueError("pass images, text or both")
            text = [self.build_prompt()] * len(images)
        texts = [text] if isinstance(text, str) else list(text)
        if images and not any(IMAGE_TOKEN in t for t in texts):
            texts = [self.build_prompt(t) for t in texts]
        num_markers = sum(t.count(IMAGE_TOKEN) for t in texts)
        if num_markers != len(images):
            raise ValueError(f"the prompts have {num_markers} {IMAGE_TOKEN} markers for {len(images)} images")

        return_tensors = output_kwargs["text_kwargs"].pop("return_tensors", None)
        data = dict(self.tokenizer([self.expand_image_tokens(t) for t in texts], **output_kwargs["text_kwargs"]))
        if images:
            data["pixel_values"] = self.image_processor(images, **output_kwargs["images_kwargs"])["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def retrieval_inputs(
        self, images: Any = None, text: str | list[str] | None = None, max_length: int = 32
    ) -> BatchFeature:
        """Inputs of the stage-1 retrieval model: `pixel_values` and/or the captions tokenised for the Q-Former
        (truncated to `max_length`)."""
        data = {}
        images = self._as_image_list(images)
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if text is not None:
            data.update(
                self.qformer_tokenizer(
                    text,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                    return_token_type_ids=False,
                )
            )
        return BatchFeature(data=data)

    @staticmethod
    def _as_image_list(images: Any) -> list:
        if images is None:
            return []
        if isinstance(images, (list, tuple)):
            return [to_rgb(image) for image in images]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [to_rgb(images)]

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs: torch.Tensor, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str]:
        """Decodes generated ids (placeholders and chat tokens dropped)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["SmolVLMQFormerProcessor"]
