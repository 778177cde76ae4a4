"""Facts that live in one place: each test reads the fact from its place and fails if a copy appears elsewhere
(in the package, the examples or the benchmarks) or if a reader disagrees with it."""

import re
from pathlib import Path

import torch

from smolvlm_qformer.configuration_smolvlm_qformer import DEFAULT_BACKBONES, SmolVLMQFormerConfig
from smolvlm_qformer.data import RetrievalCollator
from smolvlm_qformer.model_card import REFERENCE_BACKBONES
from smolvlm_qformer.testing_utils import tiny_lm_config
from smolvlm_qformer.training import ModelArguments

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "smolvlm_qformer" / "configuration_smolvlm_qformer.py"
PROCESSING = ROOT / "smolvlm_qformer" / "processing_smolvlm_qformer.py"


def code_files() -> list[Path]:
    return sorted(p for folder in ("smolvlm_qformer", "examples", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def files_containing(pattern: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in code_files() if re.search(pattern, p.read_text(encoding="utf-8"))}


def test_the_reference_backbone_ids_are_named_only_in_the_configuration():
    for hub_id in DEFAULT_BACKBONES.values():
        name = hub_id.split("/")[-1]  # the id, or its name alone as a string (a Hub alias)
        pattern = rf"{re.escape(hub_id)}|[\"']{re.escape(name)}[\"']"
        assert files_containing(pattern) == {str(CONFIGURATION.relative_to(ROOT))}, hub_id


def test_every_default_reads_the_reference_backbones():
    args = ModelArguments()
    assert (args.vision_model, args.qformer_model, args.language_model) == tuple(DEFAULT_BACKBONES.values())
    assert REFERENCE_BACKBONES == tuple(DEFAULT_BACKBONES.values())


def test_the_image_token_id_is_the_processors_and_only_the_configuration_sets_it(processor):
    # an LM whose vocabulary is larger than its tokenizer (as Qwen's is): the vocabulary size would be wrong
    text_config = tiny_lm_config("llama", processor.tokenizer)
    text_config.vocab_size = len(processor.tokenizer) + 64
    config = SmolVLMQFormerConfig.for_processor(processor, text_config=text_config)
    assert config.image_token_id == processor.image_token_id != config.text_config.vocab_size
    assert config.default_prompt_ids == processor.default_prompt_ids
    assert files_containing(r"image_token_id=processor\.") == {str(CONFIGURATION.relative_to(ROOT))}


def test_captions_are_tokenised_for_the_qformer_in_one_place(processor):
    captions = ["a red circle", "a blue square that is rather large and has a long caption"]
    rows = [{"caption": c, "vision_hidden_states": (torch.zeros(4, 32),)} for c in captions]
    batch = RetrievalCollator(processor, max_caption_tokens=8)(rows)
    expected = processor.retrieval_inputs(text=captions, max_length=8)
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and batch["input_ids"].shape[1] == 8
    assert files_containing(r"\.qformer_tokenizer\(") == {str(PROCESSING.relative_to(ROOT))}
