"""TRL's `SFTTrainer` as a client: a saved folder loaded through the Auto classes trains stage 2 on a messages +
images dataset with LoRA, the loss falls, only the assistant's words carry labels, and the saved folder loads."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from packaging.version import Version
from peft import LoraConfig
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from smolvlm_qformer import SmolVLMQFormerProcessor
from smolvlm_qformer.testing_utils import build_chat_tokenizer, save_tiny_vlm, tiny_processor

trl = pytest.importorskip("trl", reason="TRL is in the test extra")
pytestmark = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.18"),
    reason="TRL's assistant-only loss on vision data needs transformers >= 5.18",
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
QUESTION = "What colour is the picture?"
EXAMPLE = Path(__file__).parents[1] / "examples" / "train_vlm_trl.py"


def _dataset(count: int = 64) -> datasets.Dataset:
    rows = {"messages": [], "images": []}
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        rows["images"].append([Image.new("RGB", (32, 32), COLOURS[colour])])
        rows["messages"].append(
            [
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": colour},
            ]
        )
    return datasets.Dataset.from_dict(rows)


def _trainer(folder, output_dir, **config):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    args = trl.SFTConfig(
        output_dir=str(output_dir),
        max_steps=config.pop("max_steps", 40),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        assistant_only_loss=config.pop("assistant_only_loss", True),
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        **config,
    )
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=model.lora_target_modules("all-linear"),
        modules_to_save=model.trained_modules,
    )
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=_dataset(), processing_class=processor, peft_config=lora
    )


def assert_loss_skips_the_placeholders(trainer, batch) -> None:
    """TRL's loss on `batch` is the mean cross-entropy over its labelled tokens, the image placeholders left out."""
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    expected_labels = labels.masked_fill(labels == trainer.processing_class.image_token_id, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), expected_labels.flatten())
    torch.testing.assert_close(loss, expected)


TEMPLATES_FILE = Path(__file__).parents[2] / "shared" / "data" / "chat_templates.json"


@pytest.fixture(scope="module", params=["meta-llama/Llama-3.2-1B-Instruct", "google/gemma-2-2b-it"])
def template_folder(request, tmp_path_factory):
    """A stage-2 folder whose LM has another LM's chat template (a Llama 3 one, a Gemma one that rejects system
    turns)."""
    if not TEMPLATES_FILE.exists():
        pytest.skip(f"{TEMPLATES_FILE} is missing")
    entry = json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))[request.param]
    base = tiny_processor()
    processor = SmolVLMQFormerProcessor(
        base.image_processor, build_chat_tokenizer(entry), base.qformer_tokenizer, num_query_tokens=4
    )
    return save_tiny_vlm(tmp_path_factory.mktemp(request.param.split("/")[-1]), processor), entry["end_of_turn"]


@pytest.mark.parametrize("assistant_only_loss", [True, False], ids=["assistant-only", "default"])
def test_other_chat_templates_train_with_trl(template_folder, tmp_path, assistant_only_loss):
    if assistant_only_loss and "gemma" in str(template_folder[0].name):
        pytest.skip("TRL 1.16 refuses assistant_only_loss on the Gemma templates (its tool-call prefix check)")
    """With the LM's own template: assistant-only labels are the answer and the template's end of turn; TRL's
    default labels everything but pads and never scores the image placeholders; a few steps lower the loss."""
    folder, end_of_turn = template_folder
    trainer = _trainer(folder, tmp_path, assistant_only_loss=assistant_only_loss, max_steps=12)
    processor = trainer.processing_class
    batch = trainer._prepare_inputs(trainer.data_collator([_dataset()[i] for i in range(4)]))
    labels = batch["labels"]
    if assistant_only_loss:
        for row in range(4):
            assert processor.decode(labels[row][labels[row] != -100]) == f"{list(COLOURS)[row]}{end_of_turn}"
    else:
        assert ((labels != -100) == batch["attention_mask"].bool()).all()
    assert_loss_skips_the_placeholders(trainer, batch)
    trainer.model.train()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0], losses


def test_only_the_assistant_words_carry_labels(folder, tmp_path):
    trainer = _trainer(folder, tmp_path)
    processor = trainer.processing_class
    batch = trainer.data_collator([_dataset()[i] for i in range(4)])
    labels, ids = batch["labels"], batch["input_ids"]
    assert not (labels == processor.image_token_id).any()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    for row in range(4):
        labelled = processor.decode(labels[row][labels[row] != -100])
        assert labelled == f"{list(COLOURS)[row]}{processor.tokenizer.eos_token}"
        assert (ids[row] == processor.image_token_id).sum() == processor.num_query_tokens


def test_trl_defaults_never_score_the_image_placeholders(folder, tmp_path):
    """TRL's default labels every token, the image placeholders included: the loss its fused LM head computes is the
    mean over every labelled token but the placeholders, and the loss falls."""
    trainer = _trainer(folder, tmp_path, assistant_only_loss=False, max_steps=20)
    assert not trainer.model_accepts_loss_kwargs  # each batch averages over its own labelled tokens
    processor = trainer.processing_class
    batch = trainer._prepare_inputs(trainer.data_collator([_dataset()[i] for i in range(4)]))
    labels = batch["labels"]
    assert (labels == processor.image_token_id).sum() == 4 * processor.num_query_tokens  # TRL labels them
    assert_loss_skips_the_placeholders(trainer, batch)

    trainer.model.train()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0], losses  # the system prompt and question are labelled too: slower


def test_sft_trainer_lowers_the_loss_and_saves_a_folder_that_loads(folder, tmp_path):
    """TRL's default loss (`loss_type="nll"`, through its fused head over `model.base_model`)."""
    trainer = _trainer(folder, tmp_path)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] / 2, losses

    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(tmp_path / "final")
    trainer.processing_class.save_pretrained(tmp_path / "final")
    image = Image.new("RGB", (32, 32), COLOURS["blue"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    processor = trainer.processing_class
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt])
    expected = merged.eval().generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "final", trust_remote_code=True).eval()
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)[0, -3:], expected[-3:])
    assert processor.decode(expected, skip_special_tokens=True).strip() == "blue"
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "final"), trust_remote_code=True)
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}],
        }
    ]
    answer = pipe(text=chat, max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert answer.strip() == processor.decode(expected, skip_special_tokens=True).strip()


def test_the_example_script_trains_from_a_folder_and_a_dataset(folder, tmp_path):
    data = tmp_path / "data"
    _dataset(16).save_to_disk(data)
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--model",
            str(folder),
            "--dataset",
            str(data),
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(reloaded).__name__ == "SmolVLMQFormerForConditionalGeneration"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert "train_loss" in result.stdout
