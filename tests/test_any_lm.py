"""Any small instruct LM gets vision in its own chat format: the real chat templates of 12 popular LMs render as the
LMs render them, with images in the user turn, labels on exactly the assistant's words and end of turn, and stops at
the end of turn; and 14 architectures go through the whole path (build, train, save, reload, generate)."""

import datetime
import json
from pathlib import Path

import pytest
import torch
import transformers.utils.chat_template_utils as chat_template_utils
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerProcessor
from smolvlm_qformer.data import ChatCollator
from smolvlm_qformer.processing_smolvlm_qformer import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, ChatFormat
from smolvlm_qformer.testing_utils import build_chat_tokenizer, save_tiny_backbones, tiny_processor

TEMPLATES_FILE = Path(__file__).parents[2] / "shared" / "data" / "chat_templates.json"
TEMPLATES = json.loads(TEMPLATES_FILE.read_text(encoding="utf-8")) if TEMPLATES_FILE.exists() else {}
needs_templates = pytest.mark.skipif(not TEMPLATES, reason=f"{TEMPLATES_FILE} (the real chat templates) is missing")


@pytest.fixture
def fixed_date(monkeypatch):
    """The date the reference renderings were made on (Llama 3.2, Granite and SmolLM3 write today's date)."""

    class FixedDate(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 7, 15, 12, 0, 0)

    monkeypatch.setattr(chat_template_utils, "datetime", FixedDate, raising=False)


# the templates that reject a system turn (Gemma 2) or drop it (Mistral, when the conversation ends with the assistant)
FOLDS_SYSTEM = {"google/gemma-2-2b-it", "mistralai/Mistral-Nemo-Instruct-2407"}


def chat_tokenizer(name: str | None):
    return build_chat_tokenizer(TEMPLATES[name] if name else None)


def processor_for(tokenizer) -> SmolVLMQFormerProcessor:
    base = tiny_processor(num_query_tokens=2)
    return SmolVLMQFormerProcessor(base.image_processor, tokenizer, base.qformer_tokenizer, num_query_tokens=2)


@needs_templates
@pytest.mark.usefixtures("fixed_date")
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_lm_keeps_its_own_chat_format(name):
    entry = TEMPLATES[name]
    processor = processor_for(chat_tokenizer(name))
    messages = entry["render_context"]["messages"]
    assert ChatFormat.of(processor.tokenizer, entry["chat_template"]).folds_system == (name in FOLDS_SYSTEM)
    if name in FOLDS_SYSTEM:  # Gemma 2 rejects a system turn, Mistral drops it: folded in, tested below
        messages = [m for m in messages if m["role"] != "system"]
    # enable_thinking as the reference was rendered (the processor's own default renders without thinking)
    rendered = processor.apply_chat_template(messages, enable_thinking=True)
    if name in FOLDS_SYSTEM:  # the default system prompt is folded in: the reference has none
        rendered = rendered.replace(f"{DEFAULT_SYSTEM_PROMPT}\n\n", "", 1)
    assert rendered == entry["rendered_example"]

    encoded = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"][0], encoded["assistant_masks"][0].bool()
    eot = entry["end_of_turn"]
    assert processor.chat_format.end_of_turn == eot
    assert processor.decode(ids[mask]) == f"A red circle.{eot}Small.{eot}"
    assert int((mask[1:] & ~mask[:-1]).sum() + mask[0]) == 2  # two spans: one per assistant turn
    assert processor.tokenizer.convert_tokens_to_ids(eot) in processor.stop_token_ids

    if "generation" in entry["chat_template"]:  # SmolLM3 marks its own span (header included): kept as it is
        return
    # the template the processor saves marks the same span, for transformers' and TRL's own assistant masks
    own = processor.tokenizer.apply_chat_template(
        messages,
        chat_template=processor.chat_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        enable_thinking=False,
    )
    assert own["input_ids"] == ids.tolist()
    assert own["assistant_masks"] == mask.int().tolist()


@needs_templates
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_images_and_system_prompt_go_where_the_template_keeps_user_words(name):
    tokenizer = chat_tokenizer(name)
    processor = processor_for(tokenizer)
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    prompt = processor.apply_chat_template(conversation)
    user = f"{IMAGE_TOKEN}What is it?"
    if name in FOLDS_SYSTEM:
        expected_messages = [
            {"role": "user", "content": f"Be brief.\n\n{user}"},
            {"role": "assistant", "content": "A cat."},
        ]
    else:
        expected_messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": "A cat."},
        ]
    own = tokenizer.apply_chat_template(  # the LM's template as it came
        expected_messages, chat_template=TEMPLATES[name]["chat_template"], tokenize=False, enable_thinking=False
    )
    assert prompt == own
    assert "Be brief." in prompt  # never dropped, even where the template would drop it
    without_system = processor.apply_chat_template(conversation[1:])  # the default, never the template's own
    assert without_system == prompt.replace("Be brief.", DEFAULT_SYSTEM_PROMPT)
    # the saved template writes the same text for whoever renders it with lists of parts (vLLM's chat entry point)
    assert processor.tokenizer.apply_chat_template(conversation, tokenize=False) == prompt

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    encoded = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, images=[image]
    )
    placeholders = encoded["input_ids"][0] == processor.image_token_id
    assert int(placeholders.sum()) == processor.num_query_tokens
    assert not encoded["assistant_masks"][0][placeholders].any()
    assert encoded["pixel_values"].shape[0] == 1


def test_an_lm_without_a_template_gets_chatml():
    processor = tiny_processor()
    assert processor.chat_template.endswith(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------------------------
# 14 architectures through the whole path
# --------------------------------------------------------------------------------------------------------------

# each architecture with the chat template of an LM of its family (None: no template, ChatML)
ARCHITECTURES = {
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "mistral": "mistralai/Mistral-Nemo-Instruct-2407",
    "qwen2": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen3": "Qwen/Qwen3-0.6B",
    "gemma": "google/gemma-2-2b-it",
    "gemma2": "google/gemma-2-2b-it",
    "gemma3_text": "google/gemma-3-270m-it",
    "phi3": "microsoft/Phi-3.5-mini-instruct",
    "phi": "microsoft/Phi-4-mini-instruct",
    "olmo2": "allenai/OLMo-2-1124-13B-Instruct",
    "granite": "ibm-granite/granite-3.3-2b-instruct",
    "smollm3": "HuggingFaceTB/SmolLM3-3B",
    "stablelm": None,
    "gpt2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# the LM's projections LoRA must reach, by architecture (leaf names; attention, then MLP)
PROJECTIONS = {
    "phi3": ({"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
    "phi": ({"q_proj", "k_proj", "v_proj", "dense"}, {"fc1", "fc2"}),
    "gpt2": ({"c_attn", "c_proj"}, {"c_fc", "c_proj"}),
}
DEFAULT_PROJECTIONS = ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"})


def _rows(count: int = 12) -> list[dict]:
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = []
    for index in range(count):
        colour = list(colours)[index % len(colours)]
        rows.append(
            {
                "image": Image.new("RGB", (32, 32), colours[colour]),
                "question": "What colour is it?",
                "answer": colour,
                "sample_index": index,
            }
        )
    return rows


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def assembled(request, tmp_path_factory):
    """(architecture, backbones folder paths, processor, model) for a tiny LM of each architecture."""
    architecture, template = request.param, ARCHITECTURES[request.param]
    if template and not TEMPLATES:
        pytest.skip(f"{TEMPLATES_FILE} is missing")
    tokenizer = chat_tokenizer(template)
    root = tmp_path_factory.mktemp(architecture)
    paths = save_tiny_backbones(root, tiny_processor(num_query_tokens=2), lm_type=architecture, lm_tokenizer=tokenizer)
    processor = SmolVLMQFormerProcessor.from_backbones(**paths, num_query_tokens=2)
    torch.manual_seed(0)
    model = SmolVLMQFormerForConditionalGeneration.from_backbones(**paths, num_query_tokens=2)
    return architecture, paths, processor, model


def test_model_and_processor_agree_by_themselves(assembled):
    _, _, processor, model = assembled
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.num_query_tokens == processor.num_query_tokens == 2
    assert model.config.default_prompt_ids == processor.default_prompt_ids
    assert model.generation_config.eos_token_id == processor.stop_token_ids
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_text_logits_equal_the_lm_alone(assembled):
    """Head bias (Phi), logit scaling (Granite), soft-capping (Gemma 2) and tied embeddings (GPT-2's wte) as the
    LM's own causal-LM class has them."""
    _, paths, processor, model = assembled
    lm = AutoModelForCausalLM.from_pretrained(paths["language_model"]).eval()
    ids = processor.tokenizer("a red circle and a blue square", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, lm(input_ids=ids).logits)


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_lora_reaches_the_lm_projections_only(assembled, targets):
    architecture, _, _, model = assembled
    attention, mlp = PROJECTIONS.get(architecture, DEFAULT_PROJECTIONS)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=model.lora_target_modules(targets)))
    try:
        names = peft_model.targeted_module_names
        assert names and all(".language_model." in name for name in names)
        leaves = {name.rsplit(".", 1)[1] for name in names}
        assert leaves == (attention if targets == "attention" else attention | mlp)
    finally:
        peft_model.unload()


def test_trains_saves_reloads_and_generates(assembled, tmp_path):
    architecture, _, processor, model = assembled
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=model.lora_target_modules("all-linear"), modules_to_save=model.trained_modules),
    )
    collator = ChatCollator(processor, seed=0)
    batch = collator(_rows())
    assert int(batch.pop("num_skipped")) == 0
    batch.pop("num_dropped_turns")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    merged = peft_model.merge_and_unload().eval()
    merged.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    image = _rows(1)[0]["image"]
    inputs = reprocessor(images=[image], text=[reprocessor.build_prompt("What colour is it?")])
    assert (
        inputs["input_ids"].tolist()
        == processor(images=[image], text=[processor.build_prompt("What colour is it?")])["input_ids"].tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, merged(**inputs).logits)

    cached = reloaded.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = reloaded.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    answer = reprocessor.post_process_image_text_to_text(cached[:, inputs["input_ids"].shape[1] :])[0]
    vqa = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour is it?"}],
        },
    ]
    out = vqa(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == answer


@needs_templates
def test_a_conversation_the_template_rejects_is_a_counted_skip(caplog):
    """Gemma's template raises on two user turns in a row: that row is skipped and named, the batch trains on."""
    collator = ChatCollator(processor_for(chat_tokenizer("google/gemma-2-2b-it")), seed=0)
    good, bad = _rows(2)
    bad = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "user", "content": "Tell me."},
            {"role": "assistant", "content": "green"},
        ],
        "images": [bad["image"]],
        "sample_index": 7,
    }
    with caplog.at_level("WARNING"):
        batch = collator([good, bad])
    assert int(batch["num_skipped"]) == 1 and batch["input_ids"].shape[0] == 1
    assert "skipping sample 7: the chat template cannot render it" in caplog.text
    assert "alternate" in caplog.text


@needs_templates
def test_smollm2s_own_template_writes_the_prompts_the_chatml_fallback_wrote():
    """The default LM now renders with its own template: with the system prompt stage 2 always gives, its prompts and
    training conversations are the same text as before (the demo's figures stand)."""
    own, fallback = processor_for(chat_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")), tiny_processor()
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "red"},
    ]
    assert own.apply_chat_template(conversation) == fallback.apply_chat_template(conversation)
    assert own.build_prompt("What shape?") == fallback.build_prompt("What shape?")
    assert own.build_prompt() == fallback.build_prompt()
