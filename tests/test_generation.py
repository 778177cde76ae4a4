"""The generation model: the image splice, equivalence with the bare LM, LoRA targets, and cached generation."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.testing_utils import tiny_config

QUESTIONS = ["What colour is the shape?", "What shape?"]


@pytest.fixture
def model(config):
    model = SmolVLMQFormerForConditionalGeneration(config).eval()
    # Random-init weights give near-uniform logits; widen them so greedy decoding actually varies.
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


def test_image_features_replace_exactly_the_placeholders(model, processor, images):
    """The LM sees the adapted queries at the placeholders and the text's own embeddings elsewhere: its logits equal
    the bare LM's run on those spliced embeddings."""
    batch = processor(images=images[:2], text=QUESTIONS)
    image_outputs = model.get_image_features(pixel_values=batch.pixel_values)
    image_features = image_outputs.pooler_output
    assert image_features.shape == (2, processor.num_query_tokens, model.config.text_config.hidden_size)
    assert image_outputs.last_hidden_state.shape[0] == 2  # the vision encoder's output comes along
    is_image = batch.input_ids == processor.image_token_id
    assert is_image.sum(dim=1).tolist() == [processor.num_query_tokens] * 2
    embeds = model.get_input_embeddings()(batch.input_ids.masked_fill(is_image, 0))
    embeds[is_image] = image_features.flatten(0, 1)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    out = model(**batch)
    torch.testing.assert_close(out.logits, model.lm_head(hidden))
    torch.testing.assert_close(out.image_hidden_states, image_features)


def test_headless_model_times_the_lm_head_gives_the_logits(model, processor, images, tmp_path):
    """`AutoModel` on a saved folder is the headless model (what vLLM and TRL call `base_model`)."""
    from transformers import AutoModel

    model.save_pretrained(tmp_path)
    headless = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(headless).__name__ == "SmolVLMQFormerModel" and model.base_model is model.model
    batch = processor(images=images[:2], text=QUESTIONS)
    hidden = headless(**batch).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_the_lm_embedding_table_takes_the_placeholder_id(model, processor, images):
    """Engines that embed a prompt through the LM's own table (vLLM's transformers backend) may pass it the
    placeholders: they embed as token 0 (the image overwrites them). The table keeps the LM's shape, and any other
    id past it is still an error."""
    table = model.model.language_model.get_input_embeddings()
    assert table is model.get_input_embeddings() and table.weight.shape[0] == model.config.text_config.vocab_size
    ids = processor(images=images[:1], text=QUESTIONS[:1]).input_ids
    is_image = ids == processor.image_token_id
    assert is_image.any()
    torch.testing.assert_close(table(ids), table.weight[ids.masked_fill(is_image, 0)])
    with pytest.raises(IndexError):
        table(torch.tensor([processor.image_token_id + 1]))


def test_labels_may_be_the_input_ids_as_they_are(model, processor, images):
    """The placeholders lie past the LM's vocabulary: as labels they are ignored, not an out-of-range target."""
    batch = processor(images=images[:2], text=QUESTIONS)
    labels = batch.input_ids.clone()
    out = model(**batch, labels=labels)
    masked = labels.masked_fill(labels == processor.image_token_id, -100)
    logits = out.logits[:, :-1].flatten(0, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, masked[:, 1:].flatten()))


def test_return_dict_false_gives_the_same_tuple(model, processor, images):
    batch = processor(images=images[:2], text=QUESTIONS)
    labels = batch.input_ids.clone()
    as_dict = model(**batch, labels=labels)
    as_tuple = model(**batch, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


def test_embeddings_without_input_ids_cannot_silently_drop_the_image(model, processor, images):
    batch = processor(images=images[:2], text=QUESTIONS)
    embeds = model.get_input_embeddings()(batch.input_ids)
    with pytest.raises(ValueError, match="need input_ids"):
        model(inputs_embeds=embeds, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    text = processor.tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    from_ids = model(**text).logits
    from_embeds = model(inputs_embeds=model.get_input_embeddings()(text.input_ids), attention_mask=text.attention_mask)
    torch.testing.assert_close(from_embeds.logits, from_ids)


def test_generate_from_inputs_embeds_equals_the_bare_lm(model, processor):
    text = processor.tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(text.input_ids)
    model.generation_config.eos_token_id = None
    bare_lm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    bare_lm.model.load_state_dict(model.model.language_model.state_dict())
    bare_lm.lm_head.load_state_dict(model.lm_head.state_dict())
    bare_lm.generation_config.eos_token_id = None
    kwargs = {"attention_mask": text.attention_mask, "max_new_tokens": 4, "do_sample": False}
    ours = model.generate(input_ids=text.input_ids, inputs_embeds=embeds, **kwargs)
    theirs = bare_lm.generate(input_ids=text.input_ids, inputs_embeds=embeds, **kwargs)
    assert ours.tolist() == theirs.tolist()


def test_generate_without_images_or_prompt_says_what_is_missing(model):
    with pytest.raises(ValueError, match="needs a prompt"):
        model.generate(max_new_tokens=2)


def test_placeholder_count_mismatch_is_a_clear_error(model, processor, images):
    batch = processor(images=images[:2], text=QUESTIONS)
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(input_ids=batch.input_ids, pixel_values=batch.pixel_values[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch.input_ids)


def test_labels_give_the_lm_loss_on_answer_tokens_only(model, processor, images):
    batch = processor(images=images[:2], text=QUESTIONS)
    labels = torch.full_like(batch.input_ids, -100)
    labels[:, -3:] = batch.input_ids[:, -3:]
    out = model(**batch, labels=labels)
    logits = out.logits[:, :-1].flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_training_scores_only_labelled_positions_with_the_same_loss_and_gradients(model, processor, images):
    """In training, logits are computed only at the positions that predict a label, row by row: the loss and every
    gradient equal the full-vocabulary, all-positions computation (forced with an explicit `logits_to_keep`)."""
    batch = processor(images=images[:3], text=[*QUESTIONS, "Is it red?"])
    labels = torch.full_like(batch.input_ids, -100)
    labels[0, -3:] = batch.input_ids[0, -3:]
    labels[1, -5:-2] = batch.input_ids[1, -5:-2]  # 3 + 3 positions predict a label, 5 columns of the batch
    model.train()

    def loss_and_grads(**kwargs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both runs
        out = model(**batch, labels=labels, **kwargs)
        out.loss.backward()
        return out.loss.detach(), out.logits, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, logits, grads = loss_and_grads()
    full_loss, full_logits, full_grads = loss_and_grads(logits_to_keep=labels.shape[1])
    assert logits.shape[:2] == (1, 6) and full_logits.shape[:2] == labels.shape
    torch.testing.assert_close(loss, full_loss)
    assert len(grads) == len(full_grads) > 0
    for grad, full_grad in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(grad, full_grad)


def test_with_lora_disabled_and_no_image_logits_equal_the_bare_lm(model, processor):
    bare_lm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    bare_lm.model.load_state_dict(model.model.language_model.state_dict())
    bare_lm.lm_head.load_state_dict(model.lm_head.state_dict())
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=model.lora_target_modules(), init_lora_weights=False)
    )
    lora_modules = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all(".language_model." in name for name in lora_modules)
    assert len(lora_modules) == 4 * model.config.text_config.num_hidden_layers

    batch = processor.tokenizer(["a red circle", "What shape is it?"], padding=True, return_tensors="pt")
    expected = bare_lm(**batch).logits
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-6, rtol=1e-5)
    assert (peft_model(**batch).logits - expected).abs().amax() > 1e-3  # the adapter does act when enabled


def _greedy_without_cache(model, batch, steps):
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    for _ in range(steps):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids,
            pixel_values=batch.pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).logits[:, -1]
        next_token = logits.argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids


def test_cached_generate_equals_uncached_greedy_batched_left_padded(model, processor, images):
    batch = processor(images=images[:2], text=["What colour is the big shape on the left?", "Shape?"])
    assert (batch.attention_mask[:, 0] == 0).any()  # left padding is exercised
    model.generation_config.eos_token_id = None  # run the full length
    steps = 8
    generated = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    expected = _greedy_without_cache(model, batch, steps)
    assert generated.tolist() == expected.tolist()
    assert len(set(generated[:, -steps:].flatten().tolist())) > 1


def test_vision_and_qformer_run_once_per_generate(model, processor, images):
    calls = []
    model.model.qformer.register_forward_hook(lambda *args: calls.append(1))
    batch = processor(images=images[:2], text=QUESTIONS)
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert len(calls) == 1


def test_captioning_from_an_image_alone_uses_the_default_prompt(model, processor, images):
    batch = processor(images=images[:2])
    model.generation_config.eos_token_id = None
    full = model.generate(**batch, max_new_tokens=4, do_sample=False)
    caption = model.generate(pixel_values=batch.pixel_values, max_new_tokens=4, do_sample=False)
    assert batch.input_ids[0].tolist() == model.config.default_prompt_ids
    assert caption.tolist() == full[:, batch.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "vision_config",
    [
        {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "image_size": 32, "patch_size": 8, "mlp_ratio": 2},
        {"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    ],
    ids=["dinov2", "siglip", "clip"],
)  # fmt: skip
def test_any_vision_encoder_works(processor, images, vision_config):
    config = tiny_config(processor)
    config = type(config)(
        vision_config=vision_config,
        qformer_config=config.qformer_config.to_dict(),
        text_config=config.text_config,
        image_token_id=config.image_token_id,
    )
    assert config.qformer_config.encoder_hidden_size == 32
    model = SmolVLMQFormerForConditionalGeneration(config).eval()
    batch = processor(images=images[:2], text=QUESTIONS)
    assert model(**batch).logits.shape[:2] == batch.input_ids.shape
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch.input_ids.shape[1] + 2


def test_default_lora_on_smollm2_shapes_is_about_eight_million_parameters():
    from smolvlm_qformer import SmolVLMQFormerConfig

    with torch.device("meta"):
        model = SmolVLMQFormerForConditionalGeneration(SmolVLMQFormerConfig())
    peft_model = get_peft_model(model, LoraConfig(r=64, target_modules=model.lora_target_modules()))
    lora = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    assert lora == 30 * 64 * ((576 + 576) * 2 + (576 + 192) * 2)  # q, o: 576->576; k, v: 576->192
    assert 7.3e6 < lora < 7.5e6


def test_the_text_only_decode_path_exports(model, processor):
    """`torch.export` traces a decode step: no data-dependent branch on the placeholders when no image is given."""

    class Decode(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    input_ids = processor.tokenizer(["What shape is it?"], return_tensors="pt").input_ids
    exported = torch.export.export(Decode(model), (input_ids,))
    torch.testing.assert_close(exported.module()(input_ids), model(input_ids=input_ids, use_cache=False).logits)


@pytest.mark.compile
def test_compiled_generation_gives_the_eager_greedy_tokens(folder, processor, images):
    """`load_for_inference(compile=True)`: static KV cache and compiled decoding, the same tokens, batched and
    left-padded."""
    from smolvlm_qformer.inference import encode_prompts, load_for_inference

    eager, _ = load_for_inference(str(folder))
    compiled, _ = load_for_inference(str(folder), compile=True)
    prompts = [processor.build_prompt(question) for question in QUESTIONS]
    inputs = encode_prompts(eager, processor, prompts, images[:2], max_new_tokens=8)
    assert not inputs["attention_mask"].all()  # the shorter prompt is left-padded
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    torch.testing.assert_close(compiled.generate(**inputs, **kwargs), eager.generate(**inputs, **kwargs))
