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
from smolvlm_qformer.demo import DemoArguments, _table, run_demo
from smolvlm_qformer.evaluation import retrieval_recall_at_k
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
    assert {k: v for k, v in metrics.items() if k != "arguments"} == returned
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
    lines = _table(metrics).splitlines()
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
    arguments = json.loads((output_dir / "metrics.json").read_text())["arguments"]
    assert arguments["frozen_lm_dtype"] == "auto" and arguments["lm_attn_implementation"] == "eager"


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


def test_stage2_defaults_to_conversations_of_three_questions_and_rows_keep_their_own_defaults():
    args = DemoArguments()
    assert (args.conversations, args.questions_per_image, args.stage2_batch_size) == (True, 3, 5)
    rows = parse_arguments((DemoArguments,), ["--conversations", "false"])[0]
    assert (rows.conversations, rows.questions_per_image, rows.stage2_batch_size) == (False, 0, 16)


def test_the_default_stage2_data_is_one_conversation_of_three_questions_per_image():
    pytest.importorskip("easy_vqa")
    from smolvlm_qformer.data.easy_vqa import easy_vqa_dataset, wording_answer
    from smolvlm_qformer.demo import stage2_data

    paths = set(easy_vqa_dataset("train", "captions")["image"][:400])
    data = stage2_data(DemoArguments(train_questions=600, train_captions=50), paths)
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


def test_conversation_mode_groups_each_images_caption_and_questions():
    import datasets

    from smolvlm_qformer.demo import _conversations, _sample, _sample_questions

    rows = datasets.Dataset.from_dict(
        {
            "image": ["a.png", "b.png", "a.png", "a.png"],
            "question": ["Colour?", "Shape?", None, "Is it red?"],
            "answer": ["red", "circle", "a red square", "yes"],
        }
    )
    grouped = _conversations(rows)
    assert grouped["image"] == ["a.png", "b.png"]
    first = grouped[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] * 3
    assert [p["type"] for p in first[0]["content"]] == ["image"]  # the caption turn: its instruction is drawn later
    assert first[1]["content"][0]["text"] == "a red square"
    assert [m["content"][-1]["text"] for m in first[2::2]] == ["Colour?", "Is it red?"]
    assert sum(p["type"] == "image" for m in first for p in m["content"]) == 1

    many = datasets.Dataset.from_dict(
        {"image": [f"{i % 5}.png" for i in range(50)], "question": [f"q{i}" for i in range(50)], "answer": ["x"] * 50}
    )
    sampled = _sample_questions(many, 9, per_image=3, seed=0)
    per_image = {path: sampled["image"].count(path) for path in set(sampled["image"])}
    assert len(sampled) == 9 and sorted(per_image.values()) == [3, 3, 3]
    assert _sample_questions(many, 9, per_image=0, seed=0)["question"] == _sample(many, 9, seed=0)["question"]
    with pytest.raises(ValueError, match="yes_no_wording_share"):  # a chosen yes/no mix needs a count
        _sample_questions(many, None, per_image=0, seed=0, wording_share=0.65)


def test_the_demo_says_how_long_the_default_run_takes_on_this_cpu_kind(fake_cpu):
    from smolvlm_qformer.demo import DEFAULT_RUN_MINUTES, cpu_eta

    fake_cpu(True)
    assert f"about {DEFAULT_RUN_MINUTES['bf16']} minutes" in cpu_eta() and "AVX512" in cpu_eta()
    for slow_bf16 in ({"capability": "AVX2"}, {"bf16_speedup": 0.56}):
        fake_cpu(True, **slow_bf16)
        assert f"about {DEFAULT_RUN_MINUTES['float32']} minutes" in cpu_eta() and "float32" in cpu_eta()


def test_yes_no_metrics_score_the_model_against_answering_from_the_wording():
    from smolvlm_qformer.demo import _yes_no_metrics

    questions = ["is there a red shape?", "is there not a circle?", "is no blue shape present?", "what color is it?"]
    truth = ["yes", "yes", "no", "red"]
    metrics = _yes_no_metrics(questions, truth, ["Yes.", "no", "no", "blue"])
    assert metrics == {"yes_no_accuracy": 2 / 3, "wording_baseline": 1 / 3, "num_test_yes_no": 3}
