"""Language model: a GGUF causal LM (llama.cpp's format) dequantized into a float32 transformers checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from ..configuration_smolvlm_qformer import SMOLLM2_135M
from ..processing_smolvlm_qformer import make_tokenizer_config_portable
from .cache import TOLERANCE, AssetError


def convert_gguf_causal_lm(gguf_path: Path, folder: Path) -> None:
    """Dequantizes a GGUF causal LM into a float32 safetensors checkpoint, with its tokenizer and chat template."""
    # Asking for dequantization up front yields plain float32 `nn.Linear`s and drops the quantizer's state
    # (`hf_quantizer`, `config.quantization_config`); when transformers falls back to dequantizing by itself (no GGUF
    # kernels installed), that state stays behind and `save_pretrained` refuses to write the model.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # A causal LM takes no token types (transformers 4.x would return them), and the GGUF sets no length limit.
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=model.config.max_position_embeddings,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    make_tokenizer_config_portable(folder / "tokenizer_config.json")
    make_rope_config_portable(folder / "config.json")


def make_rope_config_portable(path: Path) -> None:
    """Adds the top-level `rope_theta` that transformers 4.x reads: 5.x writes only `rope_parameters`, and 4.x would
    silently fall back to a base of 10000 (SmolLM2's is 100000). 5.x reads either."""
    config = json.loads(path.read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def verify_smollm2(gguf_path: Path, folder: Path) -> dict[str, Any]:
    """The folder has SmolLM2-135M's shapes, keeps the chat template, reproduces the GGUF model's logits and answers
    a factual question sensibly under greedy decoding."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shape_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    shapes = {key: getattr(model.config, key) for key in shape_keys}
    if shapes != {key: SMOLLM2_135M[key] for key in shape_keys}:
        raise AssetError(f"unexpected shapes {shapes}")
    source_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template or tokenizer.chat_template != source_tokenizer.chat_template:
        raise AssetError("the chat template was not kept")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    source = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
    )
    with torch.no_grad():
        diff = (model(**inputs).logits - source(**inputs).logits).abs().max().item()
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    if diff > TOLERANCE:
        raise AssetError(f"logits differ from the GGUF model's by {diff:.2e}")
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if "Paris" not in answer:
        raise AssetError(f"greedy answer to {messages[0]['content']!r} lacks 'Paris': {answer!r}")
    return {"max_abs_logit_diff": diff, "prompt": messages[0]["content"], "answer": answer}
