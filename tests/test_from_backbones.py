"""Assembling the model from three pretrained checkpoints, and stage 2 from a stage-1 checkpoint."""

import torch
from transformers import AutoModel, AutoModelForCausalLM, DistilBertConfig, DistilBertModel

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerForImageTextRetrieval


def _save_backbones(config, root):
    vision = AutoModel.from_config(config.vision_config)
    vision.save_pretrained(root / "vision")
    q = config.qformer_config
    bert_config = DistilBertConfig(
        vocab_size=q.vocab_size, dim=q.dim, hidden_dim=q.hidden_dim, n_layers=q.n_layers, n_heads=q.n_heads
    )
    distilbert = DistilBertModel(bert_config)
    distilbert.save_pretrained(root / "qformer")
    lm = AutoModelForCausalLM.from_config(config.text_config)
    lm.save_pretrained(root / "lm")
    return vision, distilbert, lm


def _assert_same_weights(module, reference, new: tuple[str, ...] = ()):
    """Every weight of `reference` is in `module`, unchanged; `module` has no others but those starting with `new`."""
    state, reference_state = module.state_dict(), reference.state_dict()
    assert set(reference_state) <= set(state), set(reference_state) - set(state)
    assert all(name.startswith(new) for name in set(state) - set(reference_state)), set(state) - set(reference_state)
    for name, tensor in reference_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_from_backbones_loads_each_checkpoint_and_freezes_vision(config, processor, tmp_path):
    vision, distilbert, lm = _save_backbones(config, tmp_path)
    model = SmolVLMQFormerForConditionalGeneration.from_backbones(
        vision=str(tmp_path / "vision"),
        qformer=str(tmp_path / "qformer"),
        language_model=str(tmp_path / "lm"),
        processor=processor,
    )
    _assert_same_weights(model.model.vision_model, vision)
    cross_attention = tuple(f"transformer.layer.{i}.crossattention." for i in range(0, 2, 2))
    _assert_same_weights(model.model.qformer, distilbert, new=("queries.", *cross_attention))
    _assert_same_weights(model.model.language_model, lm.model)
    _assert_same_weights(model.lm_head, lm.lm_head)
    assert model.config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size
    assert model.model.qformer.queries.weight.shape == (1, 4, config.qformer_config.dim)
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())


def test_stage_two_starts_from_the_stage_one_checkpoint(config, processor, tmp_path):
    _save_backbones(config, tmp_path)
    stage1 = SmolVLMQFormerForImageTextRetrieval(config)
    stage1.save_pretrained(tmp_path / "stage1")
    model = SmolVLMQFormerForConditionalGeneration.from_backbones(
        stage1=str(tmp_path / "stage1"), language_model=str(tmp_path / "lm"), processor=processor
    )
    _assert_same_weights(model.model.qformer, stage1.qformer)
    _assert_same_weights(model.model.vision_model, stage1.vision_model)
    assert model.config.image_token_id == config.image_token_id
