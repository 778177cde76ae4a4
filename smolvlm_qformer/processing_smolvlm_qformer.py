"""Processor for SmolVLM-QFormer: image processor + LM tokenizer (+ the Q-Former's tokenizer for retrieval).

A prompt marks the image with one `<image>` token; the processor expands it into `num_query_tokens` placeholders,
whose embeddings the model replaces with the adapted Q-Former queries.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin, processing_utils
from transformers.image_utils import load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs

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


EXIF_ORIENTATION = 0x0112
# EXIF orientation -> what shows an (H, W, C) array upright (the transposes of PIL's `ImageOps.exif_transpose`).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def to_rgb_array(image: Any) -> np.ndarray:
    """Any image as the image processor gets it: an upright (H, W, 3) uint8 RGB array.

    PIL images of any mode: EXIF orientation applied, transparency composited onto white, 16-bit, 32-bit and float
    pixels scaled to 0-255 (`convert("RGB")` would clip them to white); an animated image gives its current frame.
    Arrays and tensors: (H, W), (H, W, C) or (C, H, W) with C in 1 / 3 / 4; bool, integers (uint16 and wider
    holding more than 8 bits are scaled down) or floats (in [0, 1] or [0, 255]). Raises `ValueError` saying what is
    wrong with anything else.
    """
    if hasattr(image, "getexif"):  # a PIL image, recognised without importing PIL
        if image.mode in _HIGH_BIT_DEPTH_MODES:
            array = np.asarray(image)
        elif "A" in image.getbands() or "transparency" in image.info:
            array = np.asarray(image.convert("RGBA"))
        else:
            array = np.asarray(image.convert("RGB"))
        upright = _UPRIGHT.get(image.getexif().get(EXIF_ORIENTATION), lambda a: a)
        return np.ascontiguousarray(upright(_array_to_rgb(array)))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    return _array_to_rgb(image)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W[, C]) / (C, H, W) of any real dtype -> (H, W, 3) uint8; alpha composited onto white."""
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image is empty ({array.shape[0]} x {array.shape[1]} pixels)")
    if array.dtype == bool:
        array = array * 255.0
    elif np.issubdtype(array.dtype, np.integer):
        wide = array.dtype.itemsize > 1 and (array.dtype == np.uint16 or array.max() > 255)
        array = array / 257.0 if wide else array.astype(np.float64)  # 65535 / 257 = 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image has NaN or infinite pixel values")
        array = array * 255.0 if array.max() <= 1 else array.astype(np.float64)
    else:
        raise ValueError(f"unsupported pixel dtype {array.dtype}")
    array = array.clip(0, 255)
    if array.shape[-1] == 4:
        alpha = array[..., 3:] / 255.0
        array = array[..., :3] * alpha + 255.0 * (1 - alpha)
    if array.shape[-1] == 1:
        array = array.repeat(3, axis=-1)
    return array.round().astype(np.uint8)


def decode_image(value: Any) -> Image.Image:
    """An upright RGB PIL image (see `to_rgb_array`) from a PIL image, an array or tensor, `{"bytes", "path"}` (a
    dataset row), raw bytes, a path, or a URL / base64 string (through transformers' `load_image`).

    Raises (`OSError`, `ValueError`, ...) when the data is not a readable image, including one over PIL's
    decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, which PIL alone enforces only at twice the limit): decoding
    it could exhaust memory.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value.startswith(("http://", "https://", "data:")):
        value = load_image(value)
    if not isinstance(value, (str, Path, bytes, bytearray)):
        return Image.fromarray(to_rgb_array(value))
    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:  # closed here: an animated file would otherwise keep its handle open
            image.load()
            return Image.fromarray(to_rgb_array(image))


def describe_image(image: Any) -> str:
    """A short name for an image in error messages: its file name if it has one, else its type, mode and size."""
    if isinstance(image, (str, Path)):
        return repr(str(image))
    if getattr(image, "filename", None):
        return repr(image.filename)
    size = getattr(image, "size", None) if hasattr(image, "getexif") else getattr(image, "shape", None)
    return " ".join(str(part) for part in (type(image).__name__, getattr(image, "mode", None), size) if part)


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
    if not hasattr(processing_utils, "MODALITY_TO_AUTOPROCESSOR_MAPPING"):
        # transformers 4.x looks each component's class up here; 5.x loads the image processor through
        # AutoImageProcessor and calls naming it deprecated
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
        return prompt.replace(IMAGE_TOKEN, self.replace_image_token())

    def replace_image_token(self, image_inputs: dict | None = None, image_idx: int = 0, **kwargs: Any) -> str:
        """What one `<image>` marker expands into: `num_query_tokens` placeholders, whatever the image's size."""
        return IMAGE_TOKEN * self.num_query_tokens

    def text_replacement_offsets(self, prompt: str) -> list[dict]:
        """Where `expand_image_tokens` expands each marker of `prompt`, in the layout transformers 5's processors
        return under `text_replacement_offsets` (serving engines such as vLLM read it to place each image's
        embeddings): per marker its modality, its character span before and after expansion, the marker and what
        replaced it."""
        replacement = self.replace_image_token()
        offsets, start = [], prompt.find(IMAGE_TOKEN)
        while start != -1:
            new_start = start + len(offsets) * (len(replacement) - len(IMAGE_TOKEN))
            offsets.append(
                {
                    "type": "image",
                    "span": (start, start + len(IMAGE_TOKEN)),
                    "new_span": (new_start, new_start + len(replacement)),
                    "text": IMAGE_TOKEN,
                    "replacement": replacement,
                }
            )
            start = prompt.find(IMAGE_TOKEN, start + len(IMAGE_TOKEN))
        return offsets

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs: Any) -> MultiModalData:
        """Placeholder tokens per image (`num_query_tokens`, whatever the size: images are resized to the vision
        encoder's input) and rows of `pixel_values` per image (one), for images of the given (height, width)."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_query_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    def encode_prompts(self, prompts: list[str], **text_kwargs: Any) -> dict:
        """Chat prompts with `<image>` markers -> `input_ids` / `attention_mask`, each marker expanded into its
        placeholders; `text_kwargs` default to the processor's (padded, no special tokens added, PyTorch tensors).
        What `__call__` does with the text, usable without images (e.g. with cached vision features)."""
        text_kwargs = {**SmolVLMQFormerProcessorKwargs._defaults["text_kwargs"], "return_tensors": "pt", **text_kwargs}
        return self.tokenizer([self.expand_image_tokens(prompt) for prompt in prompts], **text_kwargs)

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
        # taken out before merging: transformers 4.x does not know the second and would drop it with a warning
        return_mm_token_type_ids = kwargs.pop("return_mm_token_type_ids", False)
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
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

        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", False) or return_mm_token_type_ids
        return_offsets = text_kwargs.pop("return_text_replacement_offsets", False) or return_offsets
        data = dict(self.encode_prompts(texts, **text_kwargs, return_tensors=None))
        if return_mm_token_type_ids:  # 1 at the image placeholders, 0 elsewhere
            data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in data["input_ids"]]
        if images:
            data["pixel_values"] = self._pixel_values(images, **output_kwargs["images_kwargs"])
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        if return_offsets:  # nested dicts: kept out of the tensor conversion
            batch["text_replacement_offsets"] = [self.text_replacement_offsets(t) for t in texts]
        return batch

    def retrieval_inputs(
        self, images: Any = None, text: str | list[str] | None = None, max_length: int = 32
    ) -> BatchFeature:
        """Inputs of the stage-1 retrieval model: `pixel_values` and/or the captions tokenised for the Q-Former
        (truncated to `max_length`)."""
        data = {}
        images = self._as_image_list(images)
        if images:
            data["pixel_values"] = self._pixel_values(images, return_tensors="pt")
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
        """One entry per image: a list/tuple as given (lists of images per prompt, as `apply_chat_template`, the
        pipelines and TRL pass them, flattened in order), a 4-d array or tensor split along its first axis."""
        if images is None:
            return []
        if isinstance(images, (list, tuple)):
            return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [images]

    def _pixel_values(self, images: list, **kwargs: Any) -> Any:
        """The image processor's `pixel_values` for images of any mode or layout, or paths / URLs of them (see
        `decode_image`); an image that cannot be used raises a `ValueError` naming it."""
        arrays = []
        for index, image in enumerate(images):
            try:
                arrays.append(np.asarray(decode_image(image)))
            except (OSError, ValueError) as error:  # OSError: a lazily opened file that turns out truncated
                raise ValueError(f"image {index} ({describe_image(image)}) cannot be used: {error}") from error
        return self.image_processor(arrays, input_data_format="channels_last", **kwargs)["pixel_values"]

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
