"""Processor for SmolVLM-QFormer: image processor + LM tokenizer (+ the Q-Former's tokenizer for retrieval).

A prompt marks each image with one `<image>` token. The processor tokenizes the prompt, then expands each marker's
id into `num_query_tokens` placeholder ids, whose embeddings the model replaces with that image's adapted Q-Former
queries. The chat template marks the assistant's words (`{% generation %}`), so that training labels come from
`apply_chat_template(..., return_assistant_tokens_mask=True)`.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin, processing_utils
from transformers.image_utils import load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs

from .configuration_smolvlm_qformer import DEFAULT_BACKBONES

IMAGE_TOKEN = "<image>"
QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_CAPTION_PROMPT = "Describe the image."

# The template for an LM whose tokenizer has none: ChatML, with the assistant's words and end of turn marked as the
# `generation` span. Every template receives contents as strings (see `flatten_messages`).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class SmolVLMQFormerProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {
        # the chat template writes the special tokens; left padding, so that generation appends to every prompt
        "text_kwargs": {"padding": True, "padding_side": "left", "add_special_tokens": False},
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


# --------------------------------------------------------------------------------------------------------------
# Any LM's own chat template: images as markers, the system turn where the template keeps it, and the assistant's
# words found in what the template renders (most templates have no `{% generation %}` span)
# --------------------------------------------------------------------------------------------------------------

# Rendering a conversation with each assistant text swapped for a sentinel shows where the template puts it; private-
# use characters survive the `trim` / `strip` that templates apply.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_PATTERN = re.compile("\ue000(\\d+)\ue001")
_GENERATION_PATTERN = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Template variables every render gets unless the caller sets them: the VLM answers directly, so templates that think
# by default (Qwen3, SmolLM3) are rendered without it, in training and at inference alike.
TEMPLATE_DEFAULTS = {"enable_thinking": False}


def flatten_messages(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """The messages with string contents (each image part written as the image marker, in place) and the images the
    parts carry (`image`, `url` or `path`), in order: nearly every LM's template reads string contents only."""
    messages, images = [], []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    texts.append(IMAGE_TOKEN)
                    images.extend(part[key] for key in ("image", "url", "path") if part.get(key) is not None)
                elif kind == "text":
                    texts.append(part["text"])
                else:
                    raise ValueError(f"unsupported content part {part!r:.80} (expected type 'image' or 'text')")
            content = "".join(texts)
        messages.append({**message, "content": content})
    return messages, images


@dataclass(frozen=True)
class ChatFormat:
    """What an LM's chat template does with a conversation, learned once by rendering probe conversations.

    folds_system: the template rejects a system turn (Gemma 2) or drops it (Mistral, when the conversation ends with
        the assistant): its text then goes before the first user turn's, as Gemma 3's template does itself.
    end_of_turn: the special token the template writes right after an assistant turn's words (`<|im_end|>`,
        `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, ...): labelled in training, and where generation stops.
    """

    folds_system: bool
    end_of_turn: str | None

    @classmethod
    def of(cls, tokenizer: Any, template: str) -> ChatFormat:
        def render(messages: list[dict[str, Any]]) -> str:
            return render_chat(tokenizer, template, messages)

        system = [{"role": "system", "content": "\ue002"}, {"role": "user", "content": "Hi"}]
        try:
            folds_system = "\ue002" not in render([*system, {"role": "assistant", "content": "Yo"}])
        except TemplateError:
            folds_system = True
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL.format(0)}]
        after = render([*turns, {"role": "user", "content": "Bye"}]).split(_SENTINEL.format(0))[1]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        end_of_turn = tokenizer.convert_ids_to_tokens(first[0]) if first and first[0] in special else None
        return cls(folds_system, end_of_turn)

    def fit(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """String-content messages as this template can render them (a system turn folded where it must be)."""
        if not (self.folds_system and messages and messages[0]["role"] == "system"):
            return messages
        system, rest = messages[0]["content"], list(messages[1:])
        first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if first_user is not None:
            rest[first_user] = {**rest[first_user], "content": f"{system}\n\n{rest[first_user]['content']}"}
        return rest


_PREAMBLE_TAG = "{#- smolvlm-qformer: image parts as markers -#}"


def chat_preamble(folds_system: bool) -> str:
    """Jinja put before the LM's template in the saved processor and tokenizer: the same rewrite as
    `flatten_messages`, `ChatFormat.fit` and `TEMPLATE_DEFAULTS`, so that whoever renders the template itself (vLLM,
    which passes lists of parts; `tokenizer.apply_chat_template`) writes the prompts the processor writes. A
    conversation without a system turn gets `DEFAULT_SYSTEM_PROMPT` (stage 2 trains every one with a system prompt),
    never the template's own default (SmolLM2's names itself, Qwen2.5's says it is Qwen)."""
    store = "{%- set ns_chat.system = ns_part.text ~ '\\n\\n' -%}{%- else -%}"
    return (
        _PREAMBLE_TAG + "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': '"
        + DEFAULT_SYSTEM_PROMPT
        + "'}] + messages -%}{%- endif -%}"
        "{%- set ns_chat = namespace(messages=[], system='') -%}{%- for message in messages -%}"
        "{%- set ns_part = namespace(text='') -%}"
        "{%- if message['content'] is string -%}{%- set ns_part.text = message['content'] -%}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns_part.text = ns_part.text ~ '" + IMAGE_TOKEN + "' -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns_part.text = ns_part.text ~ part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        + ("{%- if loop.first and message['role'] == 'system' -%}" + store if folds_system else "{%- if true -%}")
        + "{%- if message['role'] == 'user' and ns_chat.system -%}"
        "{%- set ns_part.text = ns_chat.system ~ ns_part.text -%}{%- set ns_chat.system = '' -%}{%- endif -%}"
        "{%- set ns_chat.messages = ns_chat.messages + [dict(message, content=ns_part.text)] -%}{%- endif -%}"
        "{%- endfor -%}{%- set messages = ns_chat.messages -%}"
    )


def render_chat(tokenizer: Any, template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The template's text for string-content messages (`TEMPLATE_DEFAULTS` under `kwargs`)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, **{**TEMPLATE_DEFAULTS, **kwargs}
    )


def assistant_spans(
    render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]], end_of_turn: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn's words and end-of-turn token in it.

    The template renders the conversation once as it is and once with sentinels for the assistant texts: the text
    between sentinels is the template's own, and each assistant text is what fills the gap (as given, or trimmed as
    templates trim it). A `ValueError` when the template does not write every assistant turn once, in order."""
    text = render(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    sentinels = [dict(m) for m in messages]
    for k, i in enumerate(assistant):
        sentinels[i]["content"] = _SENTINEL.format(k)
    pieces = _SENTINEL_PATTERN.split(render(sentinels))
    literals = pieces[0::2]
    if [int(k) for k in pieces[1::2]] != list(range(len(assistant))) or not text.startswith(literals[0]):
        raise ValueError("the chat template does not write every assistant turn once, in order")
    spans, position = [], len(literals[0])
    for k, i in enumerate(assistant):
        content, following = messages[i]["content"], literals[k + 1]
        variants = (content, content.strip(), content.lstrip("\n"), content.rstrip())
        written = next((v for v in variants if text.startswith(v + following, position)), None)
        if written is None:
            raise ValueError(f"the chat template changes assistant turn {k}'s text beyond trimming it")
        end = position + len(written)
        closed = end_of_turn is not None and text.startswith(end_of_turn, end)
        spans.append((position, end + len(end_of_turn) * closed))
        position = end + len(following)
    return text, spans


def with_generation_markers(tokenizer: Any, template: str, chat_format: ChatFormat) -> str | None:
    """The template with `{% generation %}` around each assistant turn's words and end of turn, so that tools that
    read the span from the template (transformers' `return_assistant_tokens_mask`, TRL's `assistant_only_loss`) get
    the labels `assistant_spans` finds. The print that writes the message content is split at the content, inside an
    `if` on the message's role; a rewrite is kept only if it renders probe conversations exactly as the template does
    and marks exactly their assistant spans. None when no rewrite passes."""
    for match in re.finditer(r"\{\{(-?)(.*?)(-?)\}\}", template, re.S):
        operands = _split_concatenation(match.group(2))
        content = next((k for k, op in enumerate(operands) if re.search(r"\bcontent\b", op)), None)
        if content is None:
            continue
        owner = re.search(r"(\w+)(?:\[['\"]content['\"]\]|\.content\b)", operands[content])
        loops = re.findall(r"\{%-?\s*for\s+(\w+)\s+in\s+messages\b", template[: match.start()])
        message = owner.group(1) if owner else (loops[-1] if loops else None)
        if message is None:
            continue
        newline = "\n" if template[match.end() : match.end() + 1] == "\n" else ""  # trim_blocks eats one after endif
        for inside, after in _generation_splits(operands[content:], chat_format.end_of_turn):
            before = " + ".join(operands[:content]) or "''"
            rewritten = (
                f"{{%{match.group(1)} if {message}.role == 'assistant' %}}{{{{ {before} }}}}"
                f"{{% generation %}}{{{{ {inside} }}}}{{% endgeneration %}}{{{{ {after} }}}}"
                f"{{% else %}}{match.group(0)}{{% endif {match.group(3)}%}}{newline}"
            )
            candidate = template[: match.start()] + rewritten + template[match.end() :]
            if _marks_assistant_spans(tokenizer, template, candidate, chat_format):
                return candidate
    return None


def _split_concatenation(expression: str) -> list[str]:
    """A Jinja expression's top-level `+` operands (outside strings and brackets), stripped."""
    operands, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(expression):
        if quote:
            quote = None if char == quote and expression[index - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "+" and depth == 0:
            operands.append(expression[start:index].strip())
            start = index + 1
    return [*operands, expression[start:].strip()]


def _generation_splits(operands: list[str], end_of_turn: str | None) -> list[tuple[str, str]]:
    """(inside, after) Jinja expressions: the content and the operands that follow it, cut after each operand, and
    a string literal that starts with the end-of-turn token cut right after the token."""
    splits = []
    for cut in range(1, len(operands) + 1):
        inside, after = operands[:cut], operands[cut:]
        splits.append((" + ".join(inside), " + ".join(after) or "''"))
        if after and end_of_turn:
            try:
                literal = ast.literal_eval(after[0])
            except (ValueError, SyntaxError):
                continue
            if isinstance(literal, str) and literal.startswith(end_of_turn) and literal != end_of_turn:
                rest = [repr(literal[len(end_of_turn) :]), *after[1:]]
                splits.append((" + ".join([*inside, repr(end_of_turn)]), " + ".join(rest)))
    return splits


def _marks_assistant_spans(tokenizer: Any, template: str, candidate: str, chat_format: ChatFormat) -> bool:
    """Whether `candidate` renders probe conversations as `template` does, with exactly their assistant spans as
    `generation` (compared token by token, as `return_assistant_tokens_mask` gives them)."""
    probes = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Bye now"},
        ],
    ]
    try:
        for probe in probes:
            probe = chat_format.fit(probe)
            text, spans = assistant_spans(partial(render_chat, tokenizer, template), probe, chat_format.end_of_turn)
            if render_chat(tokenizer, candidate, probe) != text:
                return False
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            marked = tokenizer.apply_chat_template(
                probe,
                chat_template=candidate,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                add_special_tokens=False,
                **TEMPLATE_DEFAULTS,
            )["assistant_masks"]
            if list(marked) != _token_mask(encoded["offset_mapping"], spans):
                return False
    except (TemplateError, ValueError):
        return False
    return True


def _as_lists(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else value


def _token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token (given by its character span; padding is zero-width) that starts inside one of `spans`."""
    return [int(end > start and any(s <= start < e for s, e in spans)) for start, end in offsets]


# Processor arguments that 4.x-style callers pass among `apply_chat_template`'s keyword arguments.
_PROCESSOR_ARGUMENTS = {
    "images",
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "add_special_tokens",
    "return_offsets_mapping",
    "vision_hidden_states",
    "return_mm_token_type_ids",
}


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
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.num_query_tokens = num_query_tokens
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._chat_formats: dict[str, ChatFormat] = {}
        template = chat_template or tokenizer.chat_template or CHAT_TEMPLATE
        if not template.startswith(_PREAMBLE_TAG):
            chat_format = self._chat_format(template, tokenizer)
            if not _GENERATION_PATTERN.search(template):
                template = with_generation_markers(tokenizer, template, chat_format) or template
            template = chat_preamble(chat_format.folds_system) + template
        # the tokenizer gets the same template: engines that render with the tokenizer's (vLLM) see the same prompts
        tokenizer.chat_template = template
        super().__init__(image_processor, tokenizer, qformer_tokenizer, chat_template=template)

    @classmethod
    def from_backbones(
        cls,
        vision: str = DEFAULT_BACKBONES["vision"],
        qformer: str = DEFAULT_BACKBONES["qformer"],
        language_model: str = DEFAULT_BACKBONES["language_model"],
        num_query_tokens: int | None = None,
        stage1: str | None = None,
    ) -> SmolVLMQFormerProcessor:
        """The processor matching `from_backbones` models: the vision encoder's image processor and the Q-Former's
        tokenizer (from `vision` and `qformer`, or the stage-1 folder `stage1`), and the LM's tokenizer with its own
        chat template (ChatML if it has none). `num_query_tokens` defaults to stage 1's, else 32."""
        if stage1 is not None:
            # trust_remote_code: the folder carries our own code; without it, transformers asks on a terminal (15 s)
            stage1_processor = cls.from_pretrained(stage1, trust_remote_code=True)
            image_processor, qformer_tokenizer = stage1_processor.image_processor, stage1_processor.qformer_tokenizer
            if num_query_tokens not in (None, stage1_processor.num_query_tokens):
                raise ValueError(
                    f"num_query_tokens={num_query_tokens}, but the stage-1 Q-Former in {stage1} has "
                    f"{stage1_processor.num_query_tokens} queries"
                )
            num_query_tokens = stage1_processor.num_query_tokens
        else:
            image_processor, qformer_tokenizer = (
                AutoImageProcessor.from_pretrained(vision),
                AutoTokenizer.from_pretrained(qformer),
            )
        return cls(
            image_processor,
            AutoTokenizer.from_pretrained(language_model),
            qformer_tokenizer,
            num_query_tokens=num_query_tokens or 32,
        )

    def _chat_format(self, template: str, tokenizer: Any = None) -> ChatFormat:
        if template not in self._chat_formats:
            self._chat_formats[template] = ChatFormat.of(tokenizer or self.tokenizer, template)
        return self._chat_formats[template]

    @property
    def chat_format(self) -> ChatFormat:
        """What the processor's chat template does with system turns, and its end-of-turn token."""
        return self._chat_format(self.chat_template)

    @property
    def stop_token_ids(self) -> list[int]:
        """Where generation stops: the template's end-of-turn token and the LM's end-of-sequence token."""
        tokens = [self.chat_format.end_of_turn, self.tokenizer.eos_token]
        return list(dict.fromkeys(self.tokenizer.convert_tokens_to_ids(t) for t in tokens if t is not None))

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
        """The chat prompt for one image and a question (a captioning instruction if None), ready for generation;
        with no system prompt the template writes `DEFAULT_SYSTEM_PROMPT` (see `chat_preamble`)."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        content = [{"type": "image"}, {"type": "text", "text": question or DEFAULT_CAPTION_PROMPT}]
        messages.append({"role": "user", "content": content})
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | BatchFeature | Any:
        """transformers' `apply_chat_template` for any LM's template: contents become strings with an image marker per
        image part, a system turn is folded into the first user turn where the template rejects or drops it, and
        `assistant_masks` mark each assistant turn's words and end-of-turn token (`assistant_spans`), whether or not
        the template has `{% generation %}` spans. Images come from the image parts (`image` / `url` / `path`) or
        `processor_kwargs["images"]`. Processor arguments go in `processor_kwargs` (transformers 5) or, as in 4.x,
        among `kwargs` when they are the processor's own; the other `kwargs` are template variables."""
        processor_kwargs = dict(processor_kwargs or {})
        for name in [n for n in kwargs if n in _PROCESSOR_ARGUMENTS]:
            processor_kwargs[name] = kwargs.pop(name)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        template = chat_template or self.chat_template
        chat_format = self._chat_format(template)
        render = partial(
            render_chat,
            self.tokenizer,
            template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
        prompts, images, spans = [], [], []
        for messages in conversation if batched else [conversation]:
            messages, found = flatten_messages(messages)
            messages = chat_format.fit(messages)
            images.extend(found)
            if return_assistant_tokens_mask:
                text, turns = assistant_spans(render, messages, chat_format.end_of_turn)
                spans.append(turns)
            else:
                text = render(messages)
            prompts.append(text)
        if not tokenize:
            return prompts if batched else prompts[0]
        images = processor_kwargs.pop("images", None) or images or None
        if return_tensors not in (None, "auto"):
            processor_kwargs["return_tensors"] = return_tensors
        offsets = processor_kwargs.pop("return_offsets_mapping", False)
        out = self(
            text=prompts,
            images=images,
            return_offsets_mapping=return_assistant_tokens_mask or offsets,
            **processor_kwargs,
        )
        if return_assistant_tokens_mask:
            rows = out["offset_mapping"] if offsets else out.pop("offset_mapping")
            masks = [
                _token_mask(list(map(tuple, row)), turns) for row, turns in zip(_as_lists(rows), spans, strict=True)
            ]
            out["assistant_masks"] = torch.tensor(masks) if isinstance(out["input_ids"], torch.Tensor) else masks
        return out if return_dict else out["input_ids"]

    @property
    def default_prompt_ids(self) -> list[int]:
        """Token ids of the captioning prompt, image placeholders expanded (the model's `default_prompt_ids`)."""
        return self.encode_text([self.build_prompt()], padding=False)["input_ids"][0]

    def replace_image_token(self, image_inputs: dict | None = None, image_idx: int = 0, **kwargs: Any) -> str:
        """What one `<image>` marker expands into: `num_query_tokens` placeholders, whatever the image's size."""
        return IMAGE_TOKEN * self.num_query_tokens

    def text_replacement_offsets(self, prompt: str) -> list[dict]:
        """Where each marker of `prompt` expands, in the layout transformers 5's processors return under
        `text_replacement_offsets` (serving engines such as vLLM read it to place each image's embeddings): per
        marker its modality, its character span before and after expansion, the marker and what replaced it."""
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

    def encode_text(
        self,
        texts: list[str],
        padding: bool | str = True,
        padding_side: str = "left",
        truncation: bool | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_offsets_mapping: bool = False,
        expanded_offsets: bool = False,
        **tokenizer_kwargs: Any,
    ) -> dict[str, list]:
        """Prompts with `<image>` markers -> `input_ids` / `attention_mask` lists: each prompt tokenized as written,
        then each marker's id repeated `num_query_tokens` times, then padded on `padding_side`.

        `truncation` with `max_length` cuts ids from the end, never into an image's placeholders (a `ValueError`
        says so). `offset_mapping` gives each token's character span in the prompt as given (each placeholder
        carries its marker's span), or, with `expanded_offsets`, in the prompt with every marker expanded (the
        layout `text_replacement_offsets` describes). Padding is zero-width at the edge it pads."""
        tokenizer_kwargs.pop("return_tensors", None)
        encoded = self.tokenizer(
            texts, return_offsets_mapping=return_offsets_mapping, padding=False, truncation=False, **tokenizer_kwargs
        )
        grown = len(self.replace_image_token()) - len(IMAGE_TOKEN)
        sequences, offsets = [], []
        for index, ids in enumerate(encoded["input_ids"]):
            spans = encoded["offset_mapping"][index] if return_offsets_mapping else [(0, 0)] * len(ids)
            expanded_ids, expanded_spans, markers = [], [], 0
            for token, (start, end) in zip(ids, spans, strict=True):
                shift = markers * grown if expanded_offsets else 0
                if token != self.image_token_id:
                    expanded_ids.append(token)
                    expanded_spans.append((start + shift, end + shift))
                    continue
                for k in range(self.num_query_tokens):
                    expanded_ids.append(token)
                    first = start + shift + k * len(IMAGE_TOKEN) if expanded_offsets else start
                    expanded_spans.append((first, first + (end - start)))
                markers += 1
            if truncation and max_length is not None and len(expanded_ids) > max_length:
                if self.image_token_id in expanded_ids[max_length:]:
                    raise ValueError(
                        f"prompt {index} is {len(expanded_ids)} tokens: cutting it to max_length={max_length} would "
                        "cut its image placeholders; raise max_length or shorten the text"
                    )
                expanded_ids, expanded_spans = expanded_ids[:max_length], expanded_spans[:max_length]
            sequences.append(expanded_ids)
            offsets.append(expanded_spans)

        length = max(map(len, sequences), default=0) if padding and padding != "do_not_pad" else 0
        if padding == "max_length" and max_length is not None:
            length = max_length
        if pad_to_multiple_of and length % pad_to_multiple_of:
            length += pad_to_multiple_of - length % pad_to_multiple_of
        data: dict[str, list] = {"input_ids": [], "attention_mask": []}
        if return_offsets_mapping:
            data["offset_mapping"] = []
        for ids, spans, text in zip(sequences, offsets, texts, strict=True):
            missing = max(length - len(ids), 0)
            edge = 0 if padding_side == "left" else len(text) + text.count(IMAGE_TOKEN) * grown * expanded_offsets
            pad = ([self.tokenizer.pad_token_id] * missing, [0] * missing, [(edge, edge)] * missing)
            if padding_side == "left":
                data["input_ids"].append(pad[0] + ids)
                data["attention_mask"].append(pad[1] + [1] * len(ids))
                spans = pad[2] + spans
            else:
                data["input_ids"].append(ids + pad[0])
                data["attention_mask"].append([1] * len(ids) + pad[1])
                spans = spans + pad[2]
            if return_offsets_mapping:
                data["offset_mapping"].append(spans)
        return data

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        audio: Any = None,
        videos: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Prompts (with `<image>` markers, or plain questions that get wrapped in the chat template with one image)
        and images -> `input_ids`, `attention_mask` (left-padded unless `padding_side="right"`) and `pixel_values`.

        With images and no text, each image gets the captioning prompt. `vision_hidden_states` (one (N, Dv) tensor
        per marker, from a feature cache) may replace `images`: they are passed on as they are.
        """
        if audio is not None or videos is not None:
            raise ValueError(f"{type(self).__name__} takes images and text only")
        # taken out before merging: transformers 4.x does not know the last two and would drop them with a warning
        vision_hidden_states = kwargs.pop("vision_hidden_states", None)
        return_mm_token_type_ids = kwargs.pop("return_mm_token_type_ids", False)
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        output_kwargs = self._merge_kwargs(
            SmolVLMQFormerProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        images = self._as_image_list(images)
        num_images = len(images) if vision_hidden_states is None else len(vision_hidden_states)
        if text is None:
            if not num_images:
                raise ValueError("pass images, text or both")
            text = [self.build_prompt()] * num_images
        texts = [text] if isinstance(text, str) else list(text)
        if num_images and not any(IMAGE_TOKEN in t for t in texts):
            texts = [self.build_prompt(t) for t in texts]
        num_markers = sum(t.count(IMAGE_TOKEN) for t in texts)
        if num_markers != num_images:
            raise ValueError(f"the prompts have {num_markers} {IMAGE_TOKEN} markers for {num_images} images")

        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", False) or return_mm_token_type_ids
        return_offsets = text_kwargs.pop("return_text_replacement_offsets", False) or return_offsets
        data = self.encode_text(texts, expanded_offsets=return_offsets, **text_kwargs)
        if return_mm_token_type_ids:  # 1 at the image placeholders, 0 elsewhere
            data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in data["input_ids"]]
        if images:
            data["pixel_values"] = self._pixel_values(images, **output_kwargs["images_kwargs"])
        elif vision_hidden_states is not None:
            data["vision_hidden_states"] = torch.stack(list(vision_hidden_states))
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
