"""Tiny models and locally built tokenizers for tests, examples and benchmarks: nothing is downloaded.

The tokenizers are trained in-process (byte-level BPE for the LM, WordPiece for the Q-Former) on a small corpus of
shape/colour captions and chat prompts, so they encode any text and round-trip it.
"""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import DistilBertTokenizerFast, PreTrainedTokenizerFast, ViTImageProcessor

from .configuration_smolvlm_qformer import SmolVLMQFormerConfig
from .processing_smolvlm_qformer import SmolVLMQFormerProcessor

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


def build_qformer_tokenizer() -> DistilBertTokenizerFast:
    """A lower-casing WordPiece tokenizer with BERT's special tokens ([PAD]=0) that adds [CLS] ... [SEP]."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(_corpus() * 4, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
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
    lm_vocab = len(processor.tokenizer) - 1  # the image token lives only in the tokenizer
    image_size = processor.image_processor.size["height"]
    return SmolVLMQFormerConfig(
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
            **qformer_kwargs,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": lm_vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
            "bos_token_id": processor.tokenizer.bos_token_id,
            "eos_token_id": processor.tokenizer.eos_token_id,
            "pad_token_id": processor.tokenizer.pad_token_id,
        },
        image_token_id=processor.image_token_id,
        default_prompt_ids=processor.default_prompt_ids,
    )
