"""`smolvlm-qformer demo` end to end on tiny backbones and a few easy-VQA images: what it writes and that the model
folder loads; and the pieces it adds (retrieval with shared captions, features shared between rows)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from smolvlm_qformer.assets import AssetPaths
from smolvlm_qformer.cli import COMMANDS, parse_arguments
from smolvlm_qformer.demo import DemoArguments, run_demo, stage_arguments, stage_settings
from smolvlm_qformer.evaluation import retrieval_recall_at_k
from smolvlm_qformer.evaluation.easy_vqa import demo_table, yes_no_metrics
from smolvlm_qformer.testing_utils import save_tiny_backbones

easy_vqa = pytest.importorskip("easy_vqa")
pytest.importorskip("matplotlib")

RATES = [
    "vqa_accuracy",
    "majority_baseline",
    "yes_no_accuracy",
    "wording_baseline",
    "caption_accuracy",
    "image_to_text_r1",
    "image_to_text_r5",
    "text_to_image_r1",
    "text_to_image_r5",
]
STAGES = ["assets", "feature_cache", "stage1", "retrieval_eval", "stage2", "vqa_eval", "caption_eval", "total"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("demo")
    backbones = AssetPaths(**save_tiny_backbones(root / "backbones", processor))
    args = DemoArguments(
        output_dir=str(root / "out"),
        train_images=40,
        train_questions=96,
        train_captions=16,
        test_images=24,
        test_questions=100,
        stage1_epochs=1,
        stage2_epochs=20,  # enough for the tiny LM to learn the answers' form and priors (3 seeds: +11 to +32 points)
        stage1_batch_size=16,
        stage2_learning_rate=5e-3,
        num_query_tokens=processor.num_query_tokens,
        lora_r=4,
        image_size=None,  # the tiny ViT's own 32 px
        device="cpu",
    )
    return root / "out", run_demo(args, backbones)


def test_metrics_json(demo):
    output_dir, returned = demo
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k not in ("arguments", "settings")} == returned
    assert all(0 <= metrics[name] <= 1 for name in RATES)
    assert metrics["image_to_text_r1"] <= metrics["image_to_text_r5"]
    assert metrics["text_to_image_r1"] <= metrics["text_to_image_r5"]
    assert metrics["num_test_questions"] == 100 and metrics["num_train_questions"] == 96
    assert 0 < metrics["num_test_yes_no"] < 100  # about three in four easy-VQA questions
    assert 0 < metrics["num_test_captions"] <= metrics["num_test_images"] <= 24  # captioned ones of the first 24
    assert list(metrics["seconds"]) == STAGES and all(s >= 0 for s in metrics["seconds"].values())
    assert metrics["arguments"]["test_questions"] == 100
    baselines = metrics["frozen_feature_baselines"]
    assert set(baselines) == {"nearest_vqa_accuracy", "nearest_caption_accuracy", "probe_caption_accuracy"} | {
        f"nearest_{name}" for name in RATES if "_r" in name
    }
    assert all(0 <= value <= 1 for value in baselines.values())


def test_the_table_puts_the_frozen_feature_baselines_beside_the_model(demo):
    _, metrics = demo
    lines = demo_table(metrics).splitlines()
    baselines = metrics["frozen_feature_baselines"]
    assert lines[0].split()[-2:] == ["nearest", "probe"]
    caption = next(line for line in lines if line.startswith("caption accuracy"))
    nearest, probe = baselines["nearest_caption_accuracy"], baselines["probe_caption_accuracy"]
    assert caption.endswith(f"{nearest:>9.1%}{probe:>7.1%}")
    vqa = next(line for line in lines if line.startswith("VQA accuracy"))
    assert vqa.endswith(f"{metrics['majority_baseline']:>10.1%}{baselines['nearest_vqa_accuracy']:>9.1%}")


def test_the_tiny_demo_beats_its_majority_answer(demo):
    _, metrics = demo
    assert metrics["vqa_accuracy"] > metrics["majority_baseline"] + 0.05


def test_stage2_keeps_the_qformer_stage1_trained(demo):
    """The demo's default (`train_qformer` off): the saved model's Q-Former is stage 1's, weight for weight."""
    output_dir, _ = demo
    stage1 = load_file(output_dir / "stage1" / "model.safetensors")
    stage2 = load_file(output_dir / "model" / "model.safetensors")
    qformer1 = {name: value for name, value in stage1.items() if name.startswith("qformer.")}
    qformer2 = {
        name.removeprefix("model."): value for name, value in stage2.items() if name.startswith("model.qformer.")
    }
    assert qformer1 and qformer1.keys() == qformer2.keys()
    assert all(torch.equal(qformer1[name], qformer2[name]) for name in qformer1)
    assert any(name.startswith("model.adapter.") for name in stage2)


def test_figures_and_model_card(demo):
    output_dir, _ = demo
    for name in ("examples.png", "loss_curves.png", "query_attention.png"):
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    card = (output_dir / "model" / "README.md").read_text()
    assert "easy-vqa" in card and "vqa_accuracy" in card and "yes_no_accuracy" in card
    assert (output_dir / "model" / "adapter" / "adapter_config.json").exists()


def test_model_folder_loads_and_answers(demo):
    output_dir, _ = demo
    folder = str(output_dir / "model")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(easy_vqa.get_test_image_paths()[0]).convert("RGB")
    inputs = processor(images=image, text="what color is the shape?")
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] <= inputs.input_ids.shape[1] + 3
    vqa = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    assert isinstance(vqa(images=image, text="what shape is it?", max_new_tokens=3)[0]["generated_text"], str)


def test_a_text_matches_every_image_with_its_caption():
    # images 0, 1 share caption A; image 2 has caption B. Texts: A, B.
    positives = torch.tensor([[True, False], [True, False], [False, True]])
    similarity = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    recall = retrieval_recall_at_k(similarity, positives, ks=(1, 2))
    assert recall["image_to_text_r1"] == pytest.approx(2 / 3)  # image 1 ranks B first
    assert recall["text_to_image_r1"] == 0.5  # A: image 0 first (a hit); B: image 1 (0.8) before image 2 (0.7)
    assert recall["text_to_image_r2"] == 1.0  # one image of the right caption in the top 2 is enough


def test_the_demo_picks_its_frozen_lm_dtype_by_the_hardware_and_eager_attention_on_cpu(demo):
    """ "auto": bf16 only where the CPU runs it natively (see test_training's frozen-LM test on both CPU kinds)."""
    output_dir, _ = demo
    stage2 = json.loads((output_dir / "metrics.json").read_text())["settings"]["stage2"]
    assert stage2["frozen_lm_dtype"] == "auto" and stage2["lm_attn_implementation"] == "eager"


def test_the_stages_run_their_recipes_with_the_demos_flags_over_them(tmp_path):
    backbones = AssetPaths(vision=tmp_path / "v", qformer=tmp_path / "q", language_model=tmp_path / "lm")
    settings = stage_settings(DemoArguments(device="cpu", lora_r=4, stage2_epochs=3), backbones, tmp_path)
    model, data, training = stage_arguments(settings["stage2"])
    assert (model.lora_r, model.lora_alpha, model.lora_target_modules, model.train_qformer) == (
        4,
        8,
        "all-linear",
        False,
    )
    assert (model.stage1_model, model.language_model) == (str(tmp_path / "stage1"), str(tmp_path / "lm"))
    assert (training.num_train_epochs, training.per_device_train_batch_size, training.learning_rate) == (3, 5, 2e-4)
    assert (training.bf16, training.use_cpu, training.output_dir) == (False, True, str(tmp_path / "model"))
    assert data.prompts_file.endswith("demo_prompts.json") and data.independent_turns and data.shuffle_turns
    stage1 = stage_arguments(settings["stage1"])
    assert (stage1[0].num_query_tokens, stage1[1].max_caption_tokens, stage1[2].num_train_epochs) == (8, 16, 2)
    rows = stage_settings(DemoArguments(device="cpu", conversations=False), backbones, tmp_path)["stage2"]
    assert (rows["per_device_train_batch_size"], rows["independent_turns"]) == (16, False)


def test_demo_command_and_flags():
    assert "demo" in COMMANDS
    (args,) = parse_arguments((DemoArguments,), ["--output-dir", "out", "--test-questions", "5", "--device", "cpu"])
    assert (args.output_dir, args.test_questions, args.device) == ("out", 5, "cpu")


def test_the_yes_no_wording_share_defaults_to_its_measured_value_where_questions_are_drawn_independently():
    from smolvlm_qformer.demo import DEFAULT_YES_NO_WORDING_SHARE

    def share(*argv: str) -> float | None:
        return parse_arguments((DemoArguments,), list(argv))[0].yes_no_wording_share

    assert share() == DEFAULT_YES_NO_WORDING_SHARE == 0.65
    assert share("--yes_no_wording_share", "0.5") == 0.5
    assert share("--questions_per_image", "3") == DEFAULT_YES_NO_WORDING_SHARE  # conversations of equal length too
    assert DemoArguments(train_questions=None).yes_no_wording_share is None  # every question: as they come


def test_stage2_defaults_to_conversations_of_three_questions_and_rows_to_one_question_each():
    args = DemoArguments()
    assert (args.conversations, args.questions_per_image) == (True, 3)
    rows = parse_arguments((DemoArguments,), ["--conversations", "false"])[0]
    assert (rows.conversations, rows.questions_per_image) == (False, 0)


def test_the_default_stage2_data_is_one_conversation_of_three_questions_per_image():
    pytest.importorskip("easy_vqa")
    from smolvlm_qformer.data.easy_vqa import easy_vqa_dataset, stage2_data, wording_answer

    paths = set(easy_vqa_dataset("train", "captions")["image"][:400])
    rows = easy_vqa_dataset("train", "vqa").filter(lambda path: path in paths, input_columns="image")
    rows = rows.filter(lambda answer: answer is not None, input_columns="answer")  # as the loader drops empty text
    args = DemoArguments(train_questions=600, train_captions=50)
    data = stage2_data(rows, 600, 50, args.seed, args.yes_no_wording_share, per_image=3, conversations=True)
    assert (data.num_questions, data.num_captions, len(data.train)) == (600, 50, 200)
    exchanges = []
    for messages in data.train["messages"]:
        questions = [p["text"] for m in messages if m["role"] == "user" for p in m["content"] if p["type"] == "text"]
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        assert len(questions) == 3 and len(answers) in (3, 4)  # and a caption turn, first, for some images
        exchanges += zip(questions, answers[-3:], strict=True)
    yes_no = [(q, a) for q, a in exchanges if a in ("yes", "no")]
    as_worded = sum(a == wording_answer(q) for q, a in yes_no) / len(yes_no)
    assert as_worded == pytest.approx(DemoArguments().yes_no_wording_share, abs=0.01)


def test_the_demo_says_how_long_the_default_run_takes_on_this_cpu_kind(fake_cpu):
    from smolvlm_qformer.demo import DEFAULT_RUN_MINUTES, cpu_eta

    fake_cpu(True)
    assert f"about {DEFAULT_RUN_MINUTES['bf16']} minutes" in cpu_eta() and "AVX512" in cpu_eta()
    for slow_bf16 in ({"capability": "AVX2"}, {"vendor": "GenuineIntel"}):  # emulated; AVX512-BF16 without AMX
        fake_cpu(True, **slow_bf16)
        assert f"about {DEFAULT_RUN_MINUTES['float32']} minutes" in cpu_eta() and "float32" in cpu_eta()


def test_yes_no_metrics_score_the_model_against_answering_from_the_wording():
    questions = ["is there a red shape?", "is there not a circle?", "is no blue shape present?", "what color is it?"]
    truth = ["yes", "yes", "no", "red"]
    metrics = yes_no_metrics(questions, truth, ["Yes.", "no", "no", "blue"])
    assert metrics == {"yes_no_accuracy": 2 / 3, "wording_baseline": 1 / 3, "num_test_yes_no": 3}
