"""Tiny models and locally built tokenizers for tests, examples and benchmarks: nothing is downloaded.

The tokenizers are trained in-process (byte-level BPE for the LM, WordPiece for the Q-Former) on a small corpus of
shape/colour captions and chat prompts, so they encode any text and round-trip it.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CONFIG_MAPPING,
    AutoModel,
    AutoModelForCausalLM,
    DistilBertConfig,
    DistilBertModel,
    DistilBertTokenizerFast,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ViTImageProcessor,
)

from .configuration_smolvlm_qformer import SmolVLMQFormerConfig
from .processing_smolvlm_qformer import EXIF_ORIENTATION, IMAGE_TOKEN, SmolVLMQFormerProcessor

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "brown", "teal"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "cross"]
LM_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    captions = [f"a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    prompts = [
        "system",
        "user",
        "assistant",
        "You are a helpful assistant.",
        "Describe the image.",
        "What colour is the shape? What shape is it? Is there a circle? yes no",
        "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    ]
    return captions + prompts


def build_lm_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE chat tokenizer with SmolLM2's special tokens (<|endoftext|>=0, <|im_start|>=1,
    <|im_end|>=2); its base vocabulary has exactly `vocab_size` entries."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LM_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus() * 4, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training produced {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def build_chat_tokenizer(template: dict[str, Any] | None = None) -> PreTrainedTokenizerFast:
    """`build_lm_tokenizer`'s BPE with another LM's chat template and special tokens (bos, eos, end of turn and the
    special tokens of its turn markers), given as an entry of `shared/data/chat_templates.json`: a stand-in for that
    LM's tokenizer as far as chat formatting goes. None: no chat template (ChatML's tokens, as SmolLM2's)."""
    tokenizer = build_lm_tokenizer()
    if template is None:
        return tokenizer
    markers = re.findall(r"<\|[^|<>]+\|>|<[a-z_]+>|\[/?INST\]", "".join(template["turn_markers"]))
    specials = [*markers, template["bos_token"], template["eos_token"], template["end_of_turn"]]
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in dict.fromkeys(specials) if t and t not in vocab]}
    )
    tokenizer.bos_token, tokenizer.eos_token = template["bos_token"], template["eos_token"]
    tokenizer.chat_template = template["chat_template"]
    return tokenizer


# Per architecture, what a 2-layer, 32-wide LM of it needs beyond the common sizes.
TINY_LM_OVERRIDES = {
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0},
    "gemma3_text": {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8},
    "granite": {"logits_scaling": 2.0, "embedding_multiplier": 2.0},
    "phi": {"partial_rotary_factor": 0.5},
    "stablelm": {"partial_rotary_factor": 0.5},
    "gpt2": {"n_inner": 64},
}


def tiny_lm_config(model_type: str, tokenizer: Any) -> PretrainedConfig:
    """A 2-layer, 32-wide causal LM config of any architecture for `tokenizer`'s vocabulary (less the image token,
    which lives only in the tokenizer), with weights wide enough for confident logits (as a pretrained LM's are)."""
    vocab = len(tokenizer) - int(IMAGE_TOKEN in tokenizer.get_vocab())
    common = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.5,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # no padding_idx: it would zero <|im_end|>'s (tied) embedding, which a pretrained LM has learned
        "pad_token_id": None,
    }
    return CONFIG_MAPPING[model_type](**{**common, **TINY_LM_OVERRIDES.get(model_type, {})})


def build_qformer_tokenizer() -> DistilBertTokenizerFast:
    """A lower-casing WordPiece tokenizer with BERT's special tokens ([PAD]=0) that adds [CLS] ... [SEP].

    The vocabulary is listed, not trained: `WordPieceTrainer` numbers its alphabet in hash-map order, which made
    every process's tiny models (and so the tests' numbers) different."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {word for text in _corpus() for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    characters = sorted({character for word in words for character in word})
    pieces = sorted(words) + characters + [f"##{character}" for character in characters]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(special + pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return DistilBertTokenizerFast(tokenizer_object=tokenizer)


def tiny_processor(image_size: int = 32, num_query_tokens: int = 4) -> SmolVLMQFormerProcessor:
    image_processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return SmolVLMQFormerProcessor(
        image_processor, build_lm_tokenizer(), build_qformer_tokenizer(), num_query_tokens=num_query_tokens
    )


def tiny_config(processor: SmolVLMQFormerProcessor | None = None, **qformer_kwargs) -> SmolVLMQFormerConfig:
    """Vision 2 layers x 32 wide, Q-Former 2 layers x 32, LM 2 layers x 32: a model that runs in milliseconds."""
    processor = processor or tiny_processor()
    image_size = processor.image_processor.size["height"]
    return SmolVLMQFormerConfig.for_processor(
        processor,
        vision_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": image_size,
            "patch_size": 8,
        },
        qformer_config={
            "vocab_size": len(processor.qformer_tokenizer),
            "dim": 32,
            "hidden_dim": 64,
            "n_layers": 2,
            "n_heads": 2,
            "max_position_embeddings": 128,
            "num_query_tokens": processor.num_query_tokens,
            "embed_dim": 16,
            # Wider than BERT's 0.02, like trained weights: distinct texts must give distinct [CLS] outputs.
            "initializer_range": 0.2,
            **qformer_kwargs,
        },
        text_config=tiny_lm_config("llama", processor.tokenizer),
    )


def tiny_generation_model(config: SmolVLMQFormerConfig) -> torch.nn.Module:
    """A tiny generation model whose random LM weights are widened so that greedy decoding produces varied tokens
    (near-uniform logits would repeat one), with no end-of-sequence stop: for comparing generations."""
    from .modeling_smolvlm_qformer import SmolVLMQFormerForConditionalGeneration

    model = SmolVLMQFormerForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    model.generation_config.eos_token_id = None
    return model


def save_tiny_vlm(folder: str | Path, processor: SmolVLMQFormerProcessor, seed: int = 0) -> Path:
    """A tiny stage-2 model for `processor` (the same weights for the same `seed`) saved with it to `folder`, as a
    trained folder is: weights, processor and remote code."""
    from .modeling_smolvlm_qformer import SmolVLMQFormerForConditionalGeneration

    torch.manual_seed(seed)
    SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_backbones(
    root: str | Path,
    processor: SmolVLMQFormerProcessor | None = None,
    seed: int = 0,
    lm_type: str = "llama",
    lm_tokenizer: PreTrainedTokenizerFast | None = None,
) -> dict[str, str]:
    """Writes a tiny ViT (+ image processor), DistilBERT (+ tokenizer) and causal LM (+ chat tokenizer; by default a
    Llama with `processor`'s template, else an `lm_type` for `lm_tokenizer`) as three pretrained folders, the
    stand-ins for the Hub checkpoints `from_backbones` takes; the same weights for the same `seed`. Returns their
    paths."""
    root = Path(root)
    processor = processor or tiny_processor()
    config = tiny_config(processor)
    torch.manual_seed(seed)
    q = config.qformer_config
    paths = {"vision": str(root / "vision"), "qformer": str(root / "qformer"), "language_model": str(root / "lm")}
    AutoModel.from_config(config.vision_config).save_pretrained(paths["vision"])
    processor.image_processor.save_pretrained(paths["vision"])
    bert_config = DistilBertConfig(
        vocab_size=q.vocab_size,
        dim=q.dim,
        hidden_dim=q.hidden_dim,
        n_layers=q.n_layers,
        n_heads=q.n_heads,
        initializer_range=q.initializer_range,
    )
    DistilBertModel(bert_config).save_pretrained(paths["qformer"])
    processor.qformer_tokenizer.save_pretrained(paths["qformer"])
    if lm_tokenizer is None:
        lm_tokenizer = build_lm_tokenizer()
        lm_tokenizer.chat_template = processor.chat_template
        lm_config = config.text_config
    else:
        lm_config = tiny_lm_config(lm_type, lm_tokenizer)
    AutoModelForCausalLM.from_config(lm_config).save_pretrained(paths["language_model"])
    lm_tokenizer.save_pretrained(paths["language_model"])
    return paths


def draw_shape(colour: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A `colour` `shape` at a random position and scale on a white background."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.25, 0.4) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def make_shapes_dataset(folder: str | Path, num_images: int, size: int = 32, seed: int = 0) -> Path:
    """An `imagefolder` dataset of coloured shapes: PNGs plus metadata.jsonl with a caption and a question/answer
    per image (half ask for the colour, half for the shape)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    rows = []
    for i in range(num_images):
        colour, shape = colours[(i + seed) % len(colours)], shapes[(i // len(colours) + seed) % len(shapes)]
        name = f"{i:05d}.png"
        draw_shape(colour, shape, size, seed=seed * 100_003 + i).save(folder / name)
        question, answer = ("What colour is the shape?", colour) if i % 2 else ("What shape is it?", shape)
        rows.append({"file_name": name, "caption": f"a {colour} {shape}", "question": question, "answer": answer})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels and that has no pixel data: PIL reads the size on
    open, so it stands in for a decompression bomb without the memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# A red-left / blue-right test card: orientation and colour are both checkable after decoding.
def _card(width: int = 40, height: int = 20) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


def write_odd_images(folder: str | Path) -> dict[str, Path]:
    """Valid images in unusual forms, each decodable to a known RGB result (see `tests/test_bad_inputs.py`):
    CMYK JPEG, RGBA / palette-with-transparency / 16-bit grayscale / 1-bit PNG, a 1x1 PNG, a large JPEG, an
    EXIF-rotated JPEG and an animated GIF."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((20, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # left: opaque red; right: fully transparent (black underneath)
    palette = Image.new("P", (40, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (20, 0, 40, 20))  # left: index 0 (red, transparent below); right: index 1 (blue)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 40 x 20, shown rotated 90 degrees clockwise: 20 x 40
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("green", "red", "blue")]
    gradient = np.linspace(0, 65535, 20 * 40).reshape(20, 40).astype(np.uint16)
    files = {
        "cmyk.jpg": _encoded(Image.new("CMYK", (40, 20), (0, 255, 255, 0)), "JPEG", quality=95),
        "rgba.png": _encoded(Image.fromarray(rgba), "PNG"),
        "palette_transparent.png": _encoded(palette, "PNG", transparency=0),
        "gray16.png": _encoded(Image.fromarray(gradient), "PNG"),
        "bilevel.png": _encoded(Image.new("1", (40, 20), 1), "PNG"),
        "one_pixel.png": _encoded(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
        "large.jpg": _encoded(_card(3000, 2000), "JPEG", quality=90),
        "exif_rotated.jpg": _encoded(_card(), "JPEG", quality=95, exif=exif),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def write_bad_images(folder: str | Path) -> dict[str, Path]:
    """Files with image names that are not usable images: truncated and corrupt JPEG/PNG, a zero-byte file, text
    and an HTML error page, a decompression bomb (a header claiming 30,000 x 30,000 pixels), and a path that does
    not exist (returned, never written)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg, png = _encoded(noise, "JPEG"), _encoded(noise, "PNG")
    broken_png = bytearray(png)
    broken_png[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zlib stream and CRC broken
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "corrupt_header.jpg": jpeg[:2] + bytes(range(200)) + jpeg[202:],
        "corrupt_data.png": bytes(broken_png),
        "zero_bytes.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "not_found.png": b"<html><body><h1>404 Not Found</h1></body></html>",
        "bomb.png": _png_header_only(30_000, 30_000),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {**{name: folder / name for name in files}, "missing.png": folder / "missing.png"}
