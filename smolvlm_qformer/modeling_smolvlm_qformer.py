"""SmolVLM-QFormer: a frozen vision encoder, a DistilBERT Q-Former and a small causal LM, BLIP-2 style.

Reading order: attention masks and attention -> Q-Former layer -> `QFormerModel` (a DistilBERT with 32 learnable
queries and cross-attention to the image) -> stage-1 losses -> what the models share (pretrained base, frozen
vision encoder) -> the stage-1 retrieval model (ITC / ITM / ITG) -> the headless `SmolVLMQFormerModel` (Q-Former
queries -> MLP adapter -> spliced into the LM's decoder) -> `SmolVLMQFormerForConditionalGeneration` (+ LM head).

Names: `vision_hidden_states` is the frozen vision encoder's output (B, N, Dv); `image_hidden_states` /
`image_features` are the adapted query embeddings (B, Q, H) that take the image placeholders' place.
Shapes: B batch, Q queries, T text tokens, N image tokens, D Q-Former width, E contrastive width, H LM width.
"""

from __future__ import annotations

import importlib.util
import re
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import get_activation
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.distilbert.modeling_distilbert import (
    DistilBertPreTrainedModel,
    Embeddings,
    TransformerBlock,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_smolvlm_qformer import DEFAULT_BACKBONES, SmolVLMQFormerConfig, SmolVLMQFormerQFormerConfig
from .processing_smolvlm_qformer import SmolVLMQFormerProcessor

try:  # transformers 5: these skip weights that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4
    from torch.nn import init

AttentionMode = Literal["unimodal", "bidirectional", "multimodal_causal"]

# transformers 4.x has `pipeline("image-to-text")` (5.x folded it into "image-text-to-text").
IMAGE_TO_TEXT_PIPELINE = importlib.util.find_spec("transformers.pipelines.image_to_text") is not None

# What the running transformers release calls the KV cache, in model outputs and `forward` arguments: `cache` from
# 5.24 on, `past_key_values` before. Read from the library's own output class, so it follows any release.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def pop_cache(kwargs: dict) -> object | None:
    """The KV cache from `forward` / generation kwargs under either name (callers and releases use both), removed
    from `kwargs` so that it is passed on under `CACHE_NAME` only."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    if cache is not None and legacy is not None:
        raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
    return cache if cache is not None else legacy


LoraTargets = Literal["attention", "all-linear"]


def lora_target_modules(language_model: nn.Module, targets: LoraTargets = "attention", prefix: str = "") -> str:
    """A regex over full module names (peft's `target_modules`) naming the LM's own linear projections: those inside
    its attention blocks, or (`"all-linear"`) those and its MLPs', found per architecture by their place in the
    module tree (fused `qkv_proj` / `gate_up_proj` and GPT-2's `Conv1D`s included), never the vision encoder's or
    the Q-Former's, nor the LM head. `prefix` is the LM's own name in the whole model."""
    kinds = {"attention": ("attn", "attention"), "all-linear": ("attn", "attention", "mlp", "feed_forward", "ffn")}
    if targets not in kinds:
        raise ValueError(f"LoRA targets must be one of {sorted(kinds)}, got {targets!r}")
    names = set()
    for name, module in language_model.named_modules():
        parents = name.split(".")[:-1]
        if isinstance(module, (nn.Linear, Conv1D)) and any(k in p for p in parents for k in kinds[targets]):
            names.add(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)))
    if not names:
        raise ValueError(f"found no {targets} projections in {type(language_model).__name__}")
    return rf"(.*\.)?{re.escape(prefix)}({'|'.join(sorted(names))})"


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def qformer_attention_mask(
    num_queries: int, text_mask: torch.Tensor | None, mode: AttentionMode
) -> torch.Tensor | None:
    """Boolean mask (B, 1, Q+T, Q+T), True = may attend, over the joint `[queries; text]` sequence.

    - unimodal: queries see queries, text sees text (ITC: the two streams stay independent).
    - bidirectional: everything sees everything (ITM).
    - multimodal_causal: queries see queries; text token t sees all queries and text tokens <= t (ITG).
    Padded text positions are never attended to. Returns None when nothing is masked.
    """
    if text_mask is None:
        return None
    batch, text_len = text_mask.shape
    length = num_queries + text_len
    pos = torch.arange(length, device=text_mask.device)
    row, col = pos[:, None], pos[None, :]
    is_query_row, is_query_col = row < num_queries, col < num_queries
    if mode == "unimodal":
        allowed = is_query_row == is_query_col
    elif mode == "bidirectional":
        allowed = torch.ones(length, length, dtype=torch.bool, device=text_mask.device)
    elif mode == "multimodal_causal":
        allowed = is_query_col | (~is_query_row & (col <= row))
    else:
        raise ValueError(f"unknown attention mode {mode!r}")
    key_valid = torch.cat([text_mask.new_ones(batch, num_queries), text_mask], dim=1).bool()
    return allowed[None, None] & key_valid[:, None, None, :]


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over projected (B, L, D) tensors; returns (B, Lq, D) and optionally the
    attention probabilities (B, heads, Lq, Lk), which SDPA does not expose and are then computed explicitly."""
    batch, q_len, dim = query.shape

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, num_heads, dim // num_heads).transpose(1, 2)

    q, k, v = split_heads(query), split_heads(key), split_heads(value)
    if output_attentions:
        scores = q @ k.transpose(-1, -2) * (dim // num_heads) ** -0.5
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        weights = F.dropout(scores.softmax(dim=-1), p=dropout)
        context = weights @ v
    else:
        weights = None
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
    return context.transpose(1, 2).reshape(batch, q_len, dim), weights


class QFormerCrossAttention(nn.Module):
    """Queries (B, Q, D) attend to the frozen vision encoder's hidden states (B, N, encoder_hidden_size);
    post-LayerNorm."""

    def __init__(self, config: SmolVLMQFormerQFormerConfig):
        super().__init__()
        self.num_heads = config.n_heads
        self.dropout = config.attention_dropout
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.encoder_hidden_size, config.dim)
        self.v_lin = nn.Linear(config.encoder_hidden_size, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.layer_norm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(
        self, queries: torch.Tensor, vision_hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, weights = multi_head_attention(
            self.q_lin(queries),
            self.k_lin(vision_hidden_states),
            self.v_lin(vision_hidden_states),
            self.num_heads,
            dropout=self.dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.layer_norm(queries + self.out_lin(context)), weights


class QFormerSelfAttention(nn.Module):
    """Self-attention over `[queries; text]` with DistilBERT's projections (`q_lin`, `k_lin`, `v_lin`, `out_lin`, so
    its weights load unchanged) and the Q-Former's boolean mask. Everything happens in `forward`: a caller never
    reaches for the projections, so an engine that fuses them (vLLM's transformers backend) keeps a working model."""

    def __init__(self, config: SmolVLMQFormerQFormerConfig):
        super().__init__()
        self.num_heads = config.n_heads
        self.dropout = config.attention_dropout
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        context, _ = multi_head_attention(
            self.q_lin(hidden_states),
            self.k_lin(hidden_states),
            self.v_lin(hidden_states),
            self.num_heads,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.out_lin(context)


class QFormerLayer(TransformerBlock):
    """A DistilBERT `TransformerBlock` (same parameters, so pretrained weights load unchanged) whose query positions
    cross-attend to the image between self-attention and the feed-forward network, when the layer has
    cross-attention. Text positions never cross-attend."""

    def __init__(self, config: SmolVLMQFormerQFormerConfig, has_cross_attention: bool):
        super().__init__(config)
        self.attention = QFormerSelfAttention(config)  # DistilBERT's own takes a different mask in each release
        self.crossattention = QFormerCrossAttention(config) if has_cross_attention else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        vision_hidden_states: torch.Tensor | None,
        num_queries: int,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states = self.sa_layer_norm(hidden_states + self.attention(hidden_states, attention_mask))

        cross_weights = None
        if self.crossattention is not None and num_queries > 0:
            queries, cross_weights = self.crossattention(
                hidden_states[:, :num_queries], vision_hidden_states, output_attentions
            )
            hidden_states = torch.cat([queries, hidden_states[:, num_queries:]], dim=1)

        hidden_states = self.output_layer_norm(hidden_states + self.ffn(hidden_states))
        return hidden_states, cross_weights


class QFormerEncoder(nn.Module):
    """The layer stack, named `transformer.layer.{i}` like DistilBERT's so its checkpoints load."""

    def __init__(self, config: SmolVLMQFormerQFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_frequency == 0)
            for i in range(config.n_layers)
        )


@dataclass
class QFormerModelOutput(ModelOutput):
    """
    last_hidden_state: (B, Q+T, D) outputs over `[queries; text]`.
    query_output: (B, Q, D) the query positions (empty when no image was given).
    text_output: (B, T, D) the text positions (empty when no text was given).
    cross_attentions: per cross-attention layer, (B, heads, Q, N), when `output_attentions=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    text_output: torch.FloatTensor | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class QFormerQueries(nn.Module):
    """The learnable query embeddings (1, Q, D), a module of their own so that stage 2 can train (and peft save)
    them with the layers while the Q-Former's unused text embeddings stay frozen."""

    def __init__(self, config: SmolVLMQFormerQFormerConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, config.num_query_tokens, config.dim))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.expand(batch_size, -1, -1)


class QFormerModel(DistilBertPreTrainedModel):
    """DistilBERT turned into a Q-Former: `num_query_tokens` learnable queries are prepended to the text, and every
    `cross_attention_frequency`-th layer lets the queries attend to the image.

    Pass `vision_hidden_states` (the frozen vision encoder's output) for the query path, `input_ids` for the text
    path, or both with an attention `mode`. `QFormerModel.from_pretrained(DEFAULT_BACKBONES["qformer"],
    encoder_hidden_size=...)` loads DistilBERT's weights; only the queries and cross-attention blocks start fresh.
    """

    config_class = SmolVLMQFormerQFormerConfig

    def __init__(self, config: SmolVLMQFormerQFormerConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.transformer = QFormerEncoder(config)
        self.queries = QFormerQueries(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, QFormerQueries):
            # Random, not zero (BLIP-2's choice): with no position embeddings, zero queries would stay identical.
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        vision_hidden_states: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: AttentionMode = "unimodal",
        output_attentions: bool = False,
    ) -> QFormerModelOutput:
        if vision_hidden_states is None and input_ids is None:
            raise ValueError("QFormerModel needs vision_hidden_states, input_ids or both")
        parts, num_queries = [], 0
        if vision_hidden_states is not None:
            queries = self.queries(vision_hidden_states.shape[0])
            # Queries share the embedding LayerNorm and dropout but have no position embedding (as in BLIP-2).
            parts.append(self.embeddings.dropout(self.embeddings.LayerNorm(queries)))
            num_queries = queries.shape[1]
            vision_hidden_states = vision_hidden_states.to(queries.dtype)
        if input_ids is not None:
            parts.append(self.embeddings(input_ids))  # word + position embeddings, positions from 0
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        hidden_states = torch.cat(parts, dim=1)
        mask = qformer_attention_mask(num_queries, attention_mask, mode) if input_ids is not None else None

        cross_attentions = []
        for layer in self.transformer.layer:
            hidden_states, weights = layer(hidden_states, mask, vision_hidden_states, num_queries, output_attentions)
            if weights is not None:
                cross_attentions.append(weights)
        return QFormerModelOutput(
            last_hidden_state=hidden_states,
            query_output=hidden_states[:, :num_queries],
            text_output=hidden_states[:, num_queries:],
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )


# --------------------------------------------------------------------------------------------------------------
# Stage-1 losses (the maths of LAVIS' BLIP-2)
# --------------------------------------------------------------------------------------------------------------


def image_text_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(B_img, Q, E) x (B_txt, E) -> (B_img, B_txt): an image's score for a text is its best-matching query."""
    return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def gather_across_ranks(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every rank's `tensor` concatenated along dim 0, gradients flowing back to each row's own rank (the autograd
    all_gather of `torch.distributed.nn`), where this rank's rows start, and the number of ranks. Ranks may hold
    different batch sizes (skipped samples): rows are padded for the exchange and dropped after. Without an
    initialised process group: `(tensor, 0, 1)`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor, 0, 1
    from torch.distributed.nn.functional import all_gather

    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    sizes = [int(size) for size in sizes]
    padding = [0, 0] * (tensor.ndim - 1) + [0, max(sizes) - tensor.shape[0]]
    parts = all_gather(F.pad(tensor, padding))
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sum(sizes[:rank]), world_size


def same_texts(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, across_ranks: bool = True
) -> torch.Tensor:
    """(B, B) True where texts i and j are the same tokens: pairs that share a caption are both positives, as
    class-like captions ("a photo of a dog" x 300) are. With `across_ranks` under torch.distributed, (B, B_global)
    against every rank's texts, in `gather_across_ranks` order."""
    if attention_mask is not None:
        input_ids = input_ids.masked_fill(attention_mask == 0, -1)
    others = input_ids
    if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        # ranks pad their batches to different lengths: compare at the longest (ids are never -1, so -1 pads)
        length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
        torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
        input_ids = F.pad(input_ids, (0, int(length) - input_ids.shape[1]), value=-1)
        others = gather_across_ranks(input_ids)[0]
    return (input_ids[:, None, :] == others[None, :, :]).all(dim=-1)


def contrastive_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temperature: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the global batch, image i matching text i and, where `positives` (B,
    B_global) says so (`same_texts`), every text identical to it: the target spreads evenly over those, as BLIP's
    ITC does for one image's several captions, so that same-caption pairs are never pushed apart as negatives.
    Under torch.distributed each rank scores its images against every rank's texts and its texts against every
    rank's images (as LAVIS' BLIP-2), scaled so that DDP's average of the ranks' gradients is the gradient of the
    mean over the global batch."""
    all_image_feats, offset, world_size = gather_across_ranks(image_feats)
    all_text_feats, _, _ = gather_across_ranks(text_feats)
    logits_image_to_text = image_text_similarity(image_feats, all_text_feats) / temperature  # (B, B_global)
    logits_text_to_image = image_text_similarity(all_image_feats, text_feats).t() / temperature  # (B, B_global)
    if positives is None:
        own = offset + torch.arange(image_feats.shape[0], device=image_feats.device)
        positives = F.one_hot(own, all_text_feats.shape[0])
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    total = F.cross_entropy(logits_image_to_text, targets, reduction="sum")
    total = total + F.cross_entropy(logits_text_to_image, targets, reduction="sum")
    return total / 2 / (all_text_feats.shape[0] / world_size)


def sample_hard_negatives(
    logits_per_image: torch.Tensor, positives: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text, and for each text a negative image, drawn in proportion to their ITC
    similarity: never the positive, nor (`positives`, (B, B) symmetric) a pair with the same text, unless the batch
    holds nothing else for that row. Returns (negative text index per image, negative image index per text)."""
    if logits_per_image.shape[0] < 2:
        raise ValueError("ITM needs a batch of at least 2 image-text pairs to draw negatives from")
    with torch.no_grad():
        own = torch.eye(logits_per_image.shape[0], dtype=torch.bool, device=logits_per_image.device)
        excluded = own if positives is None else positives | own
        excluded = torch.where(excluded.all(dim=1, keepdim=True), own, excluded)  # rows with only same-text pairs
        # The epsilon keeps a row drawable when every negative's probability underflows.
        weights_i2t = (logits_per_image.float().softmax(dim=1) + 1e-8).masked_fill(excluded, 0)
        weights_t2i = (logits_per_image.t().float().softmax(dim=1) + 1e-8).masked_fill(excluded, 0)
        return torch.multinomial(weights_i2t, 1).squeeze(1), torch.multinomial(weights_t2i, 1).squeeze(1)


class QFormerTextHead(nn.Module):
    """DistilBERT's masked-LM head shape, used for ITG; the decoder reuses the Q-Former's word embeddings."""

    def __init__(self, config: SmolVLMQFormerQFormerConfig):
        super().__init__()
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.activation = get_activation(config.activation)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden_states = self.vocab_layer_norm(self.activation(self.vocab_transform(hidden_states)))
        return F.linear(hidden_states, word_embeddings, self.bias)


# --------------------------------------------------------------------------------------------------------------
# What the three models share: the pretrained base class and the frozen vision encoder
# --------------------------------------------------------------------------------------------------------------


class SmolVLMQFormerPreTrainedModel(PreTrainedModel):
    """Weights, loading and saving (with every remote-code file and an `auto_map`) for the three models."""

    config_class = SmolVLMQFormerConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # transformers adds the `_no_split_modules` of the vision encoder and LM the model is built from
    _no_split_modules = ["QFormerLayer"]
    # `save_pretrained` writes this map plus `_auto_classes` (its own call records one auto class per model class)
    _auto_map = {
        "AutoConfig": "configuration_smolvlm_qformer.SmolVLMQFormerConfig",
        "AutoProcessor": "processing_smolvlm_qformer.SmolVLMQFormerProcessor",
    }
    _auto_classes: dict[str, str] = {}
    """Auto class -> the class of this file that a saved folder of this model loads as."""

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Saves weights, config and the three remote-code files with an `auto_map` for every Auto class."""
        self.config.auto_map = {
            **self._auto_map,
            **{auto: f"modeling_smolvlm_qformer.{name}" for auto, name in self._auto_classes.items()},
        }
        # transformers' own record (which also copies this file) names this class: register it under its own entry
        own = next(auto for auto, name in self._auto_classes.items() if name == type(self).__name__)
        type(self).register_for_auto_class(own)
        type(self.config).register_for_auto_class()
        super().save_pretrained(save_directory, *args, **kwargs)


def frozen_vision_encoder(config: SmolVLMQFormerConfig) -> PreTrainedModel:
    """The vision encoder, frozen: it never trains (a feature cache can stand in for it)."""
    return AutoModel.from_config(config.vision_config).requires_grad_(False)


def encode_images(
    vision_model: PreTrainedModel,
    pixel_values: torch.Tensor | None,
    vision_hidden_states: torch.Tensor | None,
    output_hidden_states: bool | None = None,
    output_attentions: bool | None = None,
) -> BaseModelOutputWithPooling:
    """The vision encoder's output for `pixel_values`, or `vision_hidden_states` (its last hidden state, e.g. from a
    feature cache) as given; without gradients while the encoder is frozen."""
    if vision_hidden_states is not None:
        return BaseModelOutputWithPooling(last_hidden_state=vision_hidden_states)
    if pixel_values is None:
        raise ValueError("pass pixel_values or vision_hidden_states")
    frozen = not any(p.requires_grad for p in vision_model.parameters())
    # flags left unset are not passed at all: the encoder then follows its config (an explicit None would not)
    flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
    with torch.no_grad() if frozen else nullcontext():
        return vision_model(
            pixel_values=pixel_values.to(vision_model.dtype),
            return_dict=True,
            **{name: value for name, value in flags.items() if value is not None},
        )


def load_vision_and_qformer(
    vision: str | None, qformer: str | None, stage1: str | None, qformer_config: dict | None
) -> tuple[PreTrainedModel, QFormerModel]:
    """The pretrained vision encoder and Q-Former: from `vision` and `qformer` (a DistilBERT checkpoint; safetensors
    only), or both from a stage-1 checkpoint (`stage1`, whose contrastive heads are left behind)."""
    if stage1 is not None:
        retrieval = SmolVLMQFormerForImageTextRetrieval.from_pretrained(stage1, use_safetensors=True)
        return retrieval.vision_model, retrieval.qformer
    vision_model = AutoModel.from_pretrained(vision, use_safetensors=True)
    qformer_model = QFormerModel.from_pretrained(
        qformer, encoder_hidden_size=vision_model.config.hidden_size, use_safetensors=True, **(qformer_config or {})
    )
    return vision_model, qformer_model


# --------------------------------------------------------------------------------------------------------------
# Stage 1: image-text retrieval (ITC / ITM / ITG)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SmolVLMQFormerRetrievalOutput(ModelOutput):
    """
    loss: weighted sum of the configured losses; loss_itc / loss_itm / loss_itg: each one, when computed.
    logits_per_image: (B_img, B_txt) ITC similarities divided by the temperature.
    image_embeds: (B, Q, E) normalised query embeddings; text_embeds: (B, E) normalised [CLS] embeddings.
    itm_logits: (3B, 2) ITM logits for [positives; image->negative text; negative image->text], when computed.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None


class SmolVLMQFormerForImageTextRetrieval(SmolVLMQFormerPreTrainedModel):
    """Stage 1: frozen vision encoder + Q-Former + contrastive, matching and generation heads."""

    main_input_name = "pixel_values"
    _auto_classes = {"AutoModel": "SmolVLMQFormerForImageTextRetrieval"}
    new_parameters = r"qformer\.queries|crossattention|vision_proj|text_proj|itm_head|itg_head|temperature"
    """The parameters that start from scratch (they train at `new_parts_learning_rate`); the rest of the Q-Former is
    DistilBERT's."""

    def __init__(self, config: SmolVLMQFormerConfig):
        super().__init__(config)
        qformer_config = config.qformer_config
        self.vision_model = frozen_vision_encoder(config)
        self.qformer = QFormerModel(qformer_config)
        self.vision_proj = nn.Linear(qformer_config.dim, qformer_config.embed_dim)
        self.text_proj = nn.Linear(qformer_config.dim, qformer_config.embed_dim)
        self.itm_head = nn.Linear(qformer_config.dim, 2)
        self.itg_head = QFormerTextHead(qformer_config)
        self.temperature = nn.Parameter(torch.tensor(qformer_config.itc_temperature))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.constant_(module.temperature, self.config.qformer_config.itc_temperature)

    @classmethod
    def from_backbones(
        cls,
        vision: str = DEFAULT_BACKBONES["vision"],
        qformer: str = DEFAULT_BACKBONES["qformer"],
        qformer_config: dict | None = None,
        processor: SmolVLMQFormerProcessor | None = None,
        **config_kwargs,
    ) -> SmolVLMQFormerForImageTextRetrieval:
        """A stage-1 model from a pretrained vision encoder and a DistilBERT checkpoint (Hub ids or local folders);
        `qformer_config` overrides Q-Former settings such as `num_query_tokens` or `losses`. With `processor`, the
        config carries what it shares with the processor (`SmolVLMQFormerConfig.for_processor`)."""
        vision_model, qformer_model = load_vision_and_qformer(vision, qformer, None, qformer_config)
        config_kwargs |= {"vision_config": vision_model.config, "qformer_config": qformer_model.config}
        if processor is not None:
            config = SmolVLMQFormerConfig.for_processor(processor, **config_kwargs)
        else:
            config = SmolVLMQFormerConfig(**config_kwargs)
        model = cls(config)
        model.vision_model.load_state_dict(vision_model.state_dict())
        model.qformer.load_state_dict(qformer_model.state_dict())
        return model

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, Q, E) normalised contrastive embeddings of the images' queries."""
        vision_hidden_states = encode_images(self.vision_model, pixel_values, vision_hidden_states).last_hidden_state
        query_output = self.qformer(vision_hidden_states=vision_hidden_states).query_output
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """(B, E) normalised contrastive embeddings of the texts' [CLS] token."""
        text_output = self.qformer(input_ids=input_ids, attention_mask=attention_mask).text_output
        return F.normalize(self.text_proj(text_output[:, 0]), dim=-1)

    def itm_logits(
        self, vision_hidden_states: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 2) image-text matching logits of B (image, text) pairs: the ITM head averaged over the query outputs
        of the bidirectional pass. The loss and retrieval re-ranking both score pairs with this."""
        query_output = self.qformer(vision_hidden_states, input_ids, attention_mask, mode="bidirectional").query_output
        return self.itm_head(query_output).mean(dim=1)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        return_loss: bool = True,
    ) -> SmolVLMQFormerRetrievalOutput:
        """Scores every image against every text of the batch; with `return_loss`, the configured losses (pair i is
        the positive of image i and text i). Under torch.distributed, ITC contrasts against the global batch
        (`contrastive_loss`); ITM draws its hard negatives from the local batch."""
        vision_hidden_states = encode_images(self.vision_model, pixel_values, vision_hidden_states).last_hidden_state
        image_feats = self.get_image_features(vision_hidden_states=vision_hidden_states)
        text_feats = self.get_text_features(input_ids, attention_mask)
        temperature = self.temperature.clamp(0.001, 0.5)
        logits_per_image = image_text_similarity(image_feats, text_feats) / temperature

        output = SmolVLMQFormerRetrievalOutput(
            logits_per_image=logits_per_image,
            image_embeds=image_feats,
            text_embeds=text_feats,
            temperature=temperature.detach(),
        )
        if not return_loss:
            return output
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        losses = {}
        for name in self.config.qformer_config.losses:
            if name == "itc":
                positives = same_texts(input_ids, attention_mask)  # (B, B_global)
                losses[name] = contrastive_loss(image_feats, text_feats, temperature, positives)
            elif name == "itm":
                positives = same_texts(input_ids, attention_mask, across_ranks=False)
                losses[name], output.itm_logits = self.matching_loss(
                    vision_hidden_states, input_ids, attention_mask, logits_per_image, positives
                )
            else:
                losses[name] = self.generation_loss(vision_hidden_states, input_ids, attention_mask)
            output[f"loss_{name}"] = losses[name]
        weights = self.config.qformer_config.loss_weights
        # item assignment: transformers 4.x's ModelOutput drops a field first set as an attribute (no loss for Trainer)
        output["loss"] = sum(weight * losses[name] for name, weight in zip(losses, weights, strict=True))
        return output

    def matching_loss(
        self,
        vision_hidden_states: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        logits_per_image: torch.Tensor,
        positives: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM: classify [positive; image + hard-negative text; hard-negative image + text] (`itm_logits`), the
        negatives never pairs with the same text where the batch has others (`sample_hard_negatives`)."""
        neg_text, neg_image = sample_hard_negatives(logits_per_image, positives)
        images = torch.cat([vision_hidden_states, vision_hidden_states, vision_hidden_states[neg_image]])
        ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
        mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
        logits = self.itm_logits(images, ids, mask)
        batch = input_ids.shape[0]
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        return F.cross_entropy(logits, labels), logits

    def generation_loss(
        self, vision_hidden_states: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITG: next-token loss on the caption, each token seeing all queries and the earlier text."""
        qformer_output = self.qformer(vision_hidden_states, input_ids, attention_mask, mode="multimodal_causal")
        logits = self.itg_head(qformer_output.text_output[:, :-1], self.qformer.get_input_embeddings().weight)
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


# --------------------------------------------------------------------------------------------------------------
# Stage 2: the headless model (image splice + the LM's decoder) and the generation model (+ LM head)
# --------------------------------------------------------------------------------------------------------------


class SmolVLMQFormerAdapter(nn.Module):
    """2-layer GELU MLP from the Q-Former width to the LM's embedding width."""

    def __init__(self, config: SmolVLMQFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.qformer_config.dim, config.adapter_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.adapter_hidden_size, config.text_config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


@dataclass
class SmolVLMQFormerModelOutputWithPast(BaseModelOutputWithPast):
    """transformers' decoder output (its cache field named as the running release names it), plus:

    image_hidden_states: (B, Q, H) the adapted query embeddings spliced into the prompt, when an image was given.
    image_outputs: `get_image_features`' output (the vision encoder's, with its hidden states / attentions when
        asked for, and `pooler_output` = `image_hidden_states`), when an image was given.
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class SmolVLMQFormerCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output (its cache field named as the running release names it), plus:

    image_hidden_states: (B, Q, H) the adapted query embeddings spliced into the prompt, when an image was given.

    image_outputs: `get_image_features`' output, when an image was given.

    In training with labels, `logits` are (1, N, vocab) at the N positions of the batch that predict a label, row by
    row (see `scored_positions`); `loss` is the LM loss over the positions whose label is not -100 (the answer).
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


class PlaceholderEmbedding(nn.Embedding):
    """The LM's own token embedding module (same class behaviour, weights and shape: Gemma's scaled embedding stays
    scaled) made to take the image placeholder id too: it embeds as token 0, and the model overwrites it with an image
    query embedding. Masking in the table itself, the one place, also serves engines that embed the prompt through the
    LM's own `get_input_embeddings()` (vLLM's transformers backend, which keeps an `nn.Embedding` subclass's `forward`
    around its own lookup)."""

    placeholder_id: int

    @staticmethod
    def wrap(embedding: nn.Embedding, placeholder_id: int) -> nn.Embedding:
        """`embedding` itself, its class swapped for one that also derives from this one."""
        embedding.__class__ = _placeholder_class(type(embedding))
        embedding.placeholder_id = placeholder_id
        return embedding

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return super().forward(input_ids.masked_fill(input_ids == self.placeholder_id, 0))


@lru_cache
def _placeholder_class(base: type[nn.Embedding]) -> type[nn.Embedding]:
    if issubclass(base, PlaceholderEmbedding):
        return base
    return type(f"Placeholder{base.__name__}", (PlaceholderEmbedding, base), {})


class SmolVLMQFormerModel(SmolVLMQFormerPreTrainedModel):
    """Frozen vision encoder -> Q-Former (queries only) -> MLP adapter -> the LM's decoder, without its head.

    The processor writes `num_query_tokens` placeholder tokens (`config.image_token_id`) per image; `forward` swaps
    their embeddings for the adapted query outputs, so images can sit anywhere in the prompt. The placeholder id lies
    past the LM's vocabulary (the LM keeps its embedding shape): it is never looked up as a token.
    """

    _auto_classes = {"AutoModel": "SmolVLMQFormerModel"}

    def __init__(self, config: SmolVLMQFormerConfig):
        super().__init__(config)
        self.vision_model = frozen_vision_encoder(config)
        self.qformer = QFormerModel(config.qformer_config)
        self.adapter = SmolVLMQFormerAdapter(config)
        self.language_model = AutoModel.from_config(config.text_config)
        PlaceholderEmbedding.wrap(self.language_model.get_input_embeddings(), config.image_token_id)
        # the query path never reads the Q-Former's word and position embeddings: they would never get a gradient
        self.qformer.embeddings.word_embeddings.requires_grad_(False)
        self.qformer.embeddings.position_embeddings.requires_grad_(False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def embedding_name(self) -> str:
        """The LM's name for its token embeddings (`embed_tokens`, GPT-2's `wte`, ...)."""
        table = self.get_input_embeddings()
        return next(name for name, module in self.language_model.named_modules() if module is table)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The vision encoder's output (its hidden states / attentions as asked, else as its config says), with
        `pooler_output` (B, Q, H): the image's query outputs mapped into the LM's embedding space, what `forward`
        splices into the prompt. `vision_hidden_states` (the encoder's last hidden state, e.g. from a feature cache)
        stands in for `pixel_values`."""
        image_outputs = encode_images(
            self.vision_model, pixel_values, vision_hidden_states, output_hidden_states, output_attentions
        )
        query_output = self.qformer(vision_hidden_states=image_outputs.last_hidden_state).query_output
        image_outputs.pooler_output = self.adapter(query_output)
        return image_outputs

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.Tensor:
        """(B, L, 1) True at the image placeholders, checked against the number of query embeddings to fill them."""
        image_mask = input_ids == self.config.image_token_id
        if not torch.compiler.is_compiling() and image_mask.sum() != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(
                f"the prompt has {int(image_mask.sum())} image placeholder tokens but the images give "
                f"{image_features.shape[0]} x {image_features.shape[1]} query embeddings"
            )
        return image_mask.unsqueeze(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SmolVLMQFormerModelOutputWithPast:
        """`kwargs` carry the KV cache (as `cache` or `past_key_values`) and whatever the LM's decoder takes.

        The placeholders are found in `input_ids`: images given with `inputs_embeds` alone are an error (splice
        `get_image_features(...).pooler_output` into the embeddings yourself, or pass `input_ids` too)."""
        cache = pop_cache(kwargs)
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds (a prompt), with or without images")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # a PlaceholderEmbedding: takes the placeholder
        image_features = image_outputs = None
        if pixel_values is not None or vision_hidden_states is not None:
            if input_ids is None:
                raise ValueError(
                    "images need input_ids to find their placeholder tokens; with inputs_embeds alone, splice "
                    "get_image_features(...).pooler_output into them yourself"
                )
            image_outputs = self.get_image_features(
                pixel_values,
                vision_hidden_states,
                output_hidden_states=kwargs.get("output_hidden_states"),
                output_attentions=kwargs.get("output_attentions"),
            )
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(
                self.get_placeholder_mask(input_ids, image_features), image_features
            )
        elif input_ids is not None and not torch.compiler.is_compiling():
            if (input_ids == self.config.image_token_id).any():
                raise ValueError("the prompt has image placeholder tokens but no pixel_values or vision_hidden_states")
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            # a custom (B, 1, T, T) mask, True where a token may attend (e.g. `pack_shared_prefix`'s): in the
            # additive form every attention implementation of the LM takes (eager adds it to the scores)
            attention_mask = torch.zeros_like(attention_mask, dtype=inputs_embeds.dtype).masked_fill(
                ~attention_mask, torch.finfo(inputs_embeds.dtype).min
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return SmolVLMQFormerModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            image_outputs=image_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


def decoder_of(lm: PreTrainedModel) -> nn.Module:
    """A causal LM's decoder without its head (4.57's GPT-2 gives itself as `get_decoder()`, its Gemma 3 has no
    `base_model`)."""
    decoder = lm.get_decoder()
    return lm.base_model if decoder is lm else decoder


def lm_head_like(text_config: PretrainedConfig) -> nn.Linear:
    """An LM head of the shape the LM's own causal-LM class gives it (with a bias where it has one, as Phi's), built
    on the meta device to read it."""
    with torch.device("meta"):
        head = AutoModelForCausalLM.from_config(text_config).get_output_embeddings()
    return nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)


def scale_logits(logits: torch.Tensor, text_config: PretrainedConfig) -> torch.Tensor:
    """What the LM's causal-LM class does to its head's output: Granite divides by `logits_scaling`, Cohere multiplies
    by `logit_scale`, Gemma 2 soft-caps at `final_logit_softcapping`."""
    if (scaling := getattr(text_config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    if (scale := getattr(text_config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (cap := getattr(text_config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def ignore_placeholder_labels(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook: `labels` / `shift_labels` never score an image placeholder (callers may pass `input_ids`
    as labels), whichever `forward` runs."""
    for key in ("labels", "shift_labels"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key].masked_fill(kwargs[key] == model.config.image_token_id, -100)
    return args, kwargs


def scored_positions(labels: torch.LongTensor) -> tuple[torch.BoolTensor, torch.LongTensor]:
    """The (B, T) mask of the positions whose next token has a label, and the N labels they predict, in order.

    Training only scores the answers, a few tokens per row at different places in each row: computing the LM head
    and its softmax over the whole vocabulary at these N positions alone gives the same loss at a fraction of the
    cost.
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    scored = shift_labels != -100
    return scored, shift_labels[scored]


class SmolVLMQFormerForConditionalGeneration(SmolVLMQFormerPreTrainedModel, GenerationMixin):
    """Stage 2: `SmolVLMQFormerModel` + the LM's head (tied to its embeddings as the LM ties them)."""

    _auto_classes = {
        "AutoModel": "SmolVLMQFormerModel",
        "AutoModelForImageTextToText": "SmolVLMQFormerForConditionalGeneration",
        "AutoModelForVision2Seq": "SmolVLMQFormerForConditionalGeneration",  # transformers 4.x
    }
    # transformers 5 maps each tied parameter to its source; 4.x lists the parameters tied to the input embeddings
    _tied_weights_keys = (
        {"lm_head.weight": "model.language_model.embed_tokens.weight"}
        if hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")
        else ["lm_head.weight"]
    )
    # the LM head is sharded like its tied input embeddings under tensor parallelism (as LLaVA / Llama do)
    _tp_plan = {"lm_head": "colwise_gather_output"}
    main_input_name = "pixel_values" if IMAGE_TO_TEXT_PIPELINE else "input_ids"
    """transformers 4.x's `pipeline("image-to-text")` passes the images to `generate` as the main input (see
    `generate`); 5.x has no such pipeline, and `generate(inputs_embeds=...)` needs the prompt as the main input."""
    new_parameters = r"\.adapter\.|lora_"
    """Stage 2's parameters that start from scratch (they train at `new_parts_learning_rate`)."""
    qformer_trained_modules = ["qformer.queries", "qformer.embeddings.LayerNorm", "qformer.transformer"]
    """The Q-Former's query path. Its word and position embeddings are left frozen: the query path never reads them."""
    trained_modules = [*qformer_trained_modules, "adapter"]
    accepts_loss_kwargs = False
    """Callers' token counts (`num_items_in_batch`) may include image placeholders (TRL labels every token by
    default), so `Trainer` lets each batch's loss average over its own labelled tokens; our `VLMTrainer`, whose
    labels never hold a placeholder, passes its exact count."""
    """Stage 2 trains these in full (peft's `modules_to_save`), besides LoRA on the LM: the Q-Former's query path
    and the adapter (only the adapter with `ModelArguments.train_qformer=False`)."""

    def __init__(self, config: SmolVLMQFormerConfig):
        super().__init__(config)
        self.model = SmolVLMQFormerModel(config)
        self.lm_head = lm_head_like(config.text_config)
        if isinstance(self._tied_weights_keys, dict):  # the LM names its token embeddings its own way (GPT-2: wte)
            self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{self.model.embedding_name}.weight"}
        # a hook, not `forward`: TRL replaces `forward` with its fused LM head, which scores `labels` as given
        self.register_forward_pre_hook(ignore_placeholder_labels, with_kwargs=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, *args, **kwargs) -> BaseModelOutputWithPooling:
        """`SmolVLMQFormerModel.get_image_features`."""
        return self.model.get_image_features(*args, **kwargs)

    @classmethod
    def from_backbones(
        cls,
        vision: str | None = DEFAULT_BACKBONES["vision"],
        qformer: str | None = DEFAULT_BACKBONES["qformer"],
        language_model: str = DEFAULT_BACKBONES["language_model"],
        stage1: str | None = None,
        *,
        num_query_tokens: int | None = None,
        processor: SmolVLMQFormerProcessor | None = None,
        qformer_config: dict | None = None,
        **config_kwargs,
    ) -> SmolVLMQFormerForConditionalGeneration:
        """A stage-2 model from pretrained checkpoints (Hub ids or local folders; safetensors only): the vision
        encoder and Q-Former from `vision` and `qformer`, or both from a stage-1 checkpoint (`stage1`), and the
        causal LM from `language_model`. What the model shares with its processor (image token id, query count,
        captioning prompt, the template's stop tokens, padding) is read from `processor`, by default the one
        `SmolVLMQFormerProcessor.from_backbones` builds from the same arguments."""
        if processor is None:
            processor = SmolVLMQFormerProcessor.from_backbones(
                vision, qformer, language_model, num_query_tokens=num_query_tokens, stage1=stage1
            )
        qformer_config = {**(qformer_config or {}), "num_query_tokens": processor.num_query_tokens}
        vision_model, qformer_model = load_vision_and_qformer(vision, qformer, stage1, qformer_config)
        lm = AutoModelForCausalLM.from_pretrained(language_model, use_safetensors=True)
        config = SmolVLMQFormerConfig.for_processor(
            processor,
            vision_config=vision_model.config,
            qformer_config=qformer_model.config,
            text_config=lm.config,
            **config_kwargs,
        )
        model = cls(config)
        model.model.vision_model.load_state_dict(vision_model.state_dict())
        model.model.qformer.load_state_dict(qformer_model.state_dict())
        model.model.language_model.load_state_dict(decoder_of(lm).state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        model.generation_config.eos_token_id = processor.stop_token_ids
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        return model

    def lora_target_modules(self, targets: LoraTargets = "attention") -> str:
        """peft's `target_modules` for this model's LM (see `lora_target_modules`): its attention projections, the
        default, or (`"all-linear"`) its attention and MLP projections."""
        return lora_target_modules(self.model.language_model, targets, prefix="language_model.")

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SmolVLMQFormerCausalLMOutput:
        """`labels` may be `input_ids` as they are: image placeholders never carry a label. In training, logits are
        computed only where a label is predicted (`scored_positions`): the same loss and gradients."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            vision_hidden_states=vision_hidden_states,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        shift_labels = kwargs.pop("shift_labels", None)  # a caller's (already shifted) labels are used as given
        if labels is not None:
            if self.training and shift_labels is None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
                scored, shift_labels = scored_positions(labels)
                hidden_states, shift_labels = hidden_states[scored][None], shift_labels[None]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = scale_logits(self.lm_head(hidden_states[:, keep]), self.config.text_config)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                shift_labels=shift_labels,
                **kwargs,
            )
        return SmolVLMQFormerCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """The image goes in at prefill only; later steps reuse the KV cache. (`inputs_embeds` named: generate
        looks for it here to allow generating from embeddings.)"""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        # An empty (or no) cache means the whole prompt runs now: the same test on every release.
        cache = model_inputs.get(CACHE_NAME)
        is_prefill = cache is None or cache.get_seq_length() == 0
        model_inputs["pixel_values"] = pixel_values if is_prefill else None
        model_inputs["vision_hidden_states"] = vision_hidden_states if is_prefill else None
        return model_inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """`GenerationMixin.generate`, plus captioning from images alone: with no prompt (neither `input_ids` nor
        `inputs_embeds`) it is `config.default_prompt_ids` for each image, and only the new tokens are returned."""
        if input_ids is not None and input_ids.is_floating_point():  # 4.x's image-to-text pipeline: the images
            pixel_values, input_ids = input_ids, None
        caption_only = input_ids is None and "inputs_embeds" not in generate_kwargs
        if caption_only:
            images = pixel_values if pixel_values is not None else vision_hidden_states
            if images is None:
                raise ValueError("generate needs a prompt (input_ids or inputs_embeds), images, or both")
            prompt = self.config.default_prompt_ids or [self.config.image_token_id] * self.config.num_query_tokens
            input_ids = torch.tensor([prompt], device=images.device).expand(images.shape[0], -1)
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None:  # the frozen vision encoder runs once, at prefill
            vision_hidden_states = encode_images(self.model.vision_model, pixel_values, None).last_hidden_state
        self.main_input_name = "input_ids"  # generation reads the prompt (or `inputs_embeds`) as its main input
        try:
            output = super().generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                vision_hidden_states=vision_hidden_states,
                **generate_kwargs,
            )
        finally:
            del self.main_input_name
        return output[:, input_ids.shape[1] :] if caption_only else output


__all__ = [
    "QFormerModel",
    "SmolVLMQFormerPreTrainedModel",
    "SmolVLMQFormerForImageTextRetrieval",
    "SmolVLMQFormerModel",
    "SmolVLMQFormerForConditionalGeneration",
]
