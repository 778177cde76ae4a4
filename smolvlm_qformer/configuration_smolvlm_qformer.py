"""Configuration for SmolVLM-QFormer: a frozen vision encoder, a DistilBERT Q-Former and a small causal LM.

The defaults reproduce the reference design: ViT-Base/16 at 224 px (197 tokens x 768), a
distilbert-base-uncased Q-Former with 32 queries and cross-attention every second layer, and
SmolLM2-135M-Instruct (hidden 576, 30 layers, 9 heads / 3 KV heads, vocabulary 49152, tied embeddings).
"""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, DistilBertConfig, PretrainedConfig

QFORMER_LOSSES = ("itc", "itm", "itg")

# The reference backbones (canonical Hub ids): the one place that names them. Every default that assembles a model
# (`from_backbones`, the training commands, the examples) and the model card's `base_model` read this.
DEFAULT_BACKBONES = {
    "vision": "google/vit-base-patch16-224-in21k",
    "qformer": "distilbert/distilbert-base-uncased",
    "language_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

# SmolLM2-135M-Instruct's shapes and special tokens (HuggingFaceTB/SmolLM2-135M-Instruct config.json).
SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


class SmolVLMQFormerQFormerConfig(DistilBertConfig):
    """A `DistilBertConfig` plus what turns DistilBERT into a Q-Former.

    Args:
        num_query_tokens: learnable query embeddings; they become the image tokens the LM sees.
        cross_attention_frequency: every n-th layer (0-based index divisible by n) cross-attends to the image.
        encoder_hidden_size: width of the vision encoder's output (the keys/values of cross-attention).
        embed_dim: size of the image-text contrastive (ITC) embedding space.
        losses: which stage-1 losses to compute, any subset of ("itc", "itm", "itg").
        loss_weights: one weight per loss in `losses`.
        itc_temperature: initial ITC temperature (learnable, clamped to [0.001, 0.5]); not `temperature`, which
            transformers 5 reserves for generation.
    """

    model_type = "smolvlm_qformer_qformer"
    base_config_key = "qformer_config"

    def __init__(
        self,
        num_query_tokens: int = 32,
        cross_attention_frequency: int = 2,
        encoder_hidden_size: int = 768,
        embed_dim: int = 256,
        losses: list[str] | tuple[str, ...] = ("itc",),
        loss_weights: list[float] | tuple[float, ...] | None = None,
        itc_temperature: float = 0.07,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        unknown = set(losses) - set(QFORMER_LOSSES)
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {QFORMER_LOSSES}, got {list(losses)}")
        loss_weights = [1.0] * len(losses) if loss_weights is None else list(loss_weights)
        if len(loss_weights) != len(losses):
            raise ValueError(f"got {len(loss_weights)} loss_weights for {len(losses)} losses")
        self.num_query_tokens = num_query_tokens
        self.cross_attention_frequency = cross_attention_frequency
        self.encoder_hidden_size = encoder_hidden_size
        self.embed_dim = embed_dim
        self.losses = list(losses)
        self.loss_weights = loss_weights
        self.itc_temperature = itc_temperature


def _sub_config(config: PretrainedConfig | dict | None, default: dict) -> PretrainedConfig:
    """Builds any registered transformers config from a dict (`default` when None), or passes a config through."""
    if isinstance(config, PretrainedConfig):
        return config
    config = dict(default if config is None else config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        # transformers 5 saves the RoPE base only inside `rope_parameters`, which 4.x ignores (it would fall back
        # to 10000): keep the top-level key too, which 5.x reads as well.
        config.setdefault("rope_theta", rope["rope_theta"])
    return CONFIG_MAPPING[config.pop("model_type")](**config)


class SmolVLMQFormerConfig(PretrainedConfig):
    """Configuration of the whole model.

    Args:
        vision_config: any transformers vision encoder config (ViT, DINOv2, SigLIP/CLIP vision); default ViT-B/16.
        qformer_config: a `SmolVLMQFormerQFormerConfig`; default distilbert-base-uncased shapes.
        text_config: the causal LM's config; default SmolLM2-135M.
        image_token_id: id of the placeholder token the processor repeats `num_query_tokens` times. The processor's
            tokenizer decides it (`for_processor` carries it here); without a processor, the LM's vocabulary size,
            which is what a tokenizer of exactly that many tokens gives it. The token lives only in the tokenizer,
            so the LM's embeddings keep their shape.
        adapter_hidden_size: hidden width of the 2-layer GELU MLP from the Q-Former to the LM.
        default_prompt_ids: token ids of the prompt `generate` uses when given an image and no text (captioning),
            written by the processor; `None` means the image placeholders alone.
    """

    model_type = "smolvlm_qformer"
    # Trainer's evaluation drops these output fields (the KV cache, under the name of either release line)
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    sub_configs = {
        "vision_config": AutoConfig,
        "qformer_config": SmolVLMQFormerQFormerConfig,
        "text_config": AutoConfig,
    }

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        qformer_config: SmolVLMQFormerQFormerConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        image_token_id: int | None = None,
        adapter_hidden_size: int | None = None,
        default_prompt_ids: list[int] | None = None,
        **kwargs: Any,
    ):
        self.vision_config = _sub_config(vision_config, {"model_type": "vit"})
        self.text_config = _sub_config(text_config, SMOLLM2_135M)
        if not isinstance(qformer_config, SmolVLMQFormerQFormerConfig):
            qformer_config = SmolVLMQFormerQFormerConfig(**(qformer_config or {}))
        qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.qformer_config = qformer_config
        self.image_token_id = self.text_config.vocab_size if image_token_id is None else image_token_id
        self.adapter_hidden_size = adapter_hidden_size or self.text_config.hidden_size
        self.default_prompt_ids = default_prompt_ids
        # the LM head is tied to the LM's input embeddings exactly when the LM ties them (transformers 5 reads this
        # top-level flag, 4.x the text config's)
        kwargs["tie_word_embeddings"] = getattr(self.text_config, "tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def for_processor(cls, processor: Any, **kwargs: Any) -> SmolVLMQFormerConfig:
        """The config of a model that `processor` feeds: the image token id (decided by the processor's tokenizer)
        and the captioning prompt come from the processor, the rest from `kwargs`."""
        return cls(image_token_id=processor.image_token_id, default_prompt_ids=processor.default_prompt_ids, **kwargs)

    @property
    def num_query_tokens(self) -> int:
        return self.qformer_config.num_query_tokens

    @num_query_tokens.setter
    def num_query_tokens(self, value: int) -> None:
        self.qformer_config.num_query_tokens = value
