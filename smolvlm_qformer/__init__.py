"""smolvlm-qformer: give a small text-only LM vision, BLIP-2 style (frozen ViT -> Q-Former -> MLP -> LM + LoRA)."""

from .configuration_smolvlm_qformer import SmolVLMQFormerConfig, SmolVLMQFormerQFormerConfig
from .modeling_smolvlm_qformer import (
    LORA_ALL_LINEAR_MODULES,
    LORA_TARGET_MODULES,
    QFormerModel,
    SmolVLMQFormerForConditionalGeneration,
    SmolVLMQFormerForImageTextRetrieval,
    SmolVLMQFormerModel,
    SmolVLMQFormerPreTrainedModel,
)
from .processing_smolvlm_qformer import SmolVLMQFormerProcessor

__version__ = "0.1.0"

__all__ = [
    "LORA_ALL_LINEAR_MODULES",
    "LORA_TARGET_MODULES",
    "QFormerModel",
    "SmolVLMQFormerConfig",
    "SmolVLMQFormerForConditionalGeneration",
    "SmolVLMQFormerForImageTextRetrieval",
    "SmolVLMQFormerModel",
    "SmolVLMQFormerPreTrainedModel",
    "SmolVLMQFormerProcessor",
    "SmolVLMQFormerQFormerConfig",
]
