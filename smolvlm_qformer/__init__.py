"""smolvlm-qformer: give a small text-only LM vision, BLIP-2 style (frozen ViT -> Q-Former -> MLP -> LM + LoRA)."""

from .configuration_smolvlm_qformer import SmolVLMQFormerConfig, SmolVLMQFormerQFormerConfig
from .modeling_smolvlm_qformer import (
    QFormerModel,
    SmolVLMQFormerForConditionalGeneration,
    SmolVLMQFormerForImageTextRetrieval,
    SmolVLMQFormerModel,
    SmolVLMQFormerPreTrainedModel,
)
from .processing_smolvlm_qformer import SmolVLMQFormerProcessor

__version__ = "0.1.0"

__all__ = [
    "QFormerModel",
    "SmolVLMQFormerConfig",
    "SmolVLMQFormerForConditionalGeneration",
    "SmolVLMQFormerForImageTextRetrieval",
    "SmolVLMQFormerModel",
    "SmolVLMQFormerPreTrainedModel",
    "SmolVLMQFormerProcessor",
    "SmolVLMQFormerQFormerConfig",
]
