"""Q-Former init: a BERT checkpoint mapped exactly onto a DistilBERT, the architecture `QFormerModel` extends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertModel, DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

from ..modeling_smolvlm_qformer import QFormerModel
from ..processing_smolvlm_qformer import make_tokenizer_config_portable
from .cache import TOLERANCE, AssetError

# BERT layer parameter -> DistilBERT layer parameter (prefixes `encoder.layer.{i}.` / `transformer.layer.{i}.`).
BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
DISTILBERT_LAYER_NORM_EPS = 1e-12  # hard-coded in DistilBERT; BERT's is configurable


def convert_bert_to_distilbert(bert_folder: Path, folder: Path) -> None:
    """Maps a BERT checkpoint (weights and tokenizer) exactly onto a DistilBERT of the same shape.

    DistilBERT has no token types: BERT's type-0 embedding (the only one single-segment text uses) is folded into the
    position embeddings. The pooler is dropped.
    """
    bert = BertModel.from_pretrained(bert_folder)
    bert_config = bert.config
    if bert_config.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        raise AssetError(f"DistilBERT's LayerNorms use eps=1e-12, the BERT's {bert_config.layer_norm_eps}")
    config = DistilBertConfig(
        vocab_size=bert_config.vocab_size,
        max_position_embeddings=bert_config.max_position_embeddings,
        dim=bert_config.hidden_size,
        n_layers=bert_config.num_hidden_layers,
        n_heads=bert_config.num_attention_heads,
        hidden_dim=bert_config.intermediate_size,
        activation=bert_config.hidden_act,
        dropout=bert_config.hidden_dropout_prob,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        initializer_range=bert_config.initializer_range,
        pad_token_id=bert_config.pad_token_id,
    )
    source = bert.state_dict()
    state = {
        "embeddings.word_embeddings.weight": source["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": source["embeddings.position_embeddings.weight"]
        + source["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": source["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": source["embeddings.LayerNorm.bias"],
    }
    state.update(
        {
            f"transformer.layer.{i}.{distilbert_name}.{param}": source[f"encoder.layer.{i}.{bert_name}.{param}"]
            for i in range(config.n_layers)
            for bert_name, distilbert_name in BERT_TO_DISTILBERT_LAYER.items()
            for param in ("weight", "bias")
        }
    )
    model = DistilBertModel(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    DistilBertTokenizerFast.from_pretrained(bert_folder).save_pretrained(folder)
    make_tokenizer_config_portable(folder / "tokenizer_config.json")


VERIFY_SENTENCES = [
    "A red circle on a white background.",
    "Two dogs play fetch in the park while their owners watch from a bench.",
    "What colour is the car?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]


def verify_bert_distilbert(bert_folder: Path, folder: Path) -> dict[str, Any]:
    """The DistilBERT folder tokenizes like the BERT source and reproduces its last hidden states on padded
    sentences; `QFormerModel` loads it with only the queries and cross-attention new, and its text path agrees."""
    bert = BertModel.from_pretrained(bert_folder)
    distilbert = DistilBertModel.from_pretrained(folder)
    qformer, info = QFormerModel.from_pretrained(
        folder, encoder_hidden_size=distilbert.config.dim, output_loading_info=True
    )
    new_params = [k for k in info["missing_keys"] if k != "queries.weight" and ".crossattention." not in k]
    if new_params or info["unexpected_keys"] or info["mismatched_keys"]:
        raise AssetError(f"QFormerModel does not load the folder cleanly: {info}")

    inputs = AutoTokenizer.from_pretrained(bert_folder)(VERIFY_SENTENCES, padding=True, return_tensors="pt")
    converted = AutoTokenizer.from_pretrained(folder)(VERIFY_SENTENCES, padding=True, return_tensors="pt")
    if not torch.equal(inputs["input_ids"], converted["input_ids"]):
        raise AssetError("the converted tokenizer encodes differently from the source's")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = distilbert(input_ids=ids, attention_mask=mask).last_hidden_state
        text = qformer(input_ids=ids, attention_mask=mask).text_output
    valid = mask.bool()  # padded positions carry no meaning
    diff = (actual - expected)[valid].abs().max().item()
    qformer_diff = (text - expected)[valid].abs().max().item()
    if max(diff, qformer_diff) > TOLERANCE:
        raise AssetError(f"hidden states differ from BERT's by {diff:.2e} (DistilBERT) / {qformer_diff:.2e} (Q-Former)")
    return {"max_abs_diff": diff, "qformer_text_max_abs_diff": qformer_diff, "tokens": int(valid.sum())}
