"""Image-text data: sources, prompts, collators and the frozen-vision feature cache."""

from .collators import ChatCollator, RetrievalCollator
from .feature_cache import FeatureCache, build_feature_cache
from .images import decode_image, decode_or_skip, image_key
from .prompts import PromptConfig
from .sources import DataArguments, IndexedDataset, load_image_text_dataset, split_train_eval

__all__ = [
    "ChatCollator",
    "DataArguments",
    "FeatureCache",
    "IndexedDataset",
    "PromptConfig",
    "RetrievalCollator",
    "build_feature_cache",
    "decode_image",
    "decode_or_skip",
    "image_key",
    "load_image_text_dataset",
    "split_train_eval",
]
