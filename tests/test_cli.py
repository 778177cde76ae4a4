"""The console script and the example scripts, end to end on tiny local backbones and generated data."""

import json
import runpy
from pathlib import Path

import pytest
import yaml

from smolvlm_qformer.cli import main
from smolvlm_qformer.testing_utils import make_shapes_dataset, save_tiny_backbones

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("cli")
    backbones = save_tiny_backbones(root / "backbones", processor)
    data = make_shapes_dataset(root / "shapes", 48)
    model_flags = [
        "--vision_model", backbones["vision"],
        "--qformer_model", backbones["qformer"],
        "--language_model", backbones["language_model"],
        "--num_query_tokens", "4",
    ]  # fmt: skip
    data_flags = ["--dataset", "imagefolder", "--data_dir", str(data), "--eval_fraction", "0.25"]
    return root, backbones, data, model_flags, data_flags


TRAIN_FLAGS = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu"]


def _example(name: str):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]


def test_stage1_stage2_and_inference_commands(workspace, capsys):
    root, backbones, data, model_flags, data_flags = workspace
    main(["train-qformer", *model_flags, *data_flags, *TRAIN_FLAGS, "--output_dir", str(root / "stage1")])
    assert json.loads((root / "stage1" / "all_results.json").read_text())["train_skipped_samples"] == 0

    config = {
        "stage1_model": str(root / "stage1"),
        "language_model": backbones["language_model"],
        "lora_r": 4,
        "dataset": "imagefolder",
        "data_dir": str(data),
        "question_column": "question",
        "answer_column": "answer",
        "caption_column": None,
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "report_to": "none",
        "use_cpu": True,
        "output_dir": str(root / "stage2"),
    }
    (root / "stage2.yaml").write_text(yaml.safe_dump(config))
    main(["train-vlm", str(root / "stage2.yaml")])
    assert (root / "stage2" / "adapter" / "adapter_config.json").exists()

    images = [str(data / "00000.png"), str(data / "00001.png")]
    capsys.readouterr()
    main(["caption", "--model", str(root / "stage2"), "--max-new-tokens", "3", *images])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images
    main(["ask", "--model", str(root / "stage2"), "--max-new-tokens", "3", *images, "What colour is it?"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images


def test_caption_takes_folders_and_globs_and_writes_jsonl(workspace, tmp_path, capsys):
    root, _, data, _, _ = workspace
    output = tmp_path / "captions.jsonl"
    main(["caption", "--model", str(root / "stage2"), "--max-new-tokens", "2", "--batch-size", "5", "--output",
          str(output), str(data), str(data / "0000[0-2].png")])  # fmt: skip
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = sorted(str(p) for p in data.glob("*.png")) + [str(data / f"0000{i}.png") for i in range(3)]
    assert [row["image"] for row in rows] == expected and all(isinstance(row["text"], str) for row in rows)
    assert capsys.readouterr().out == ""


def test_inference_on_a_bad_image_names_it_and_fails(workspace, tmp_path, capsys):
    root, _, data = workspace[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", "--model", str(root / "stage2"), "--max-new-tokens", "2", str(bad), str(data / "00000.png")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "broken.jpg" in captured.err
    assert captured.out.startswith(str(data / "00000.png") + "\t")  # the stage-2 model answered the good image
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--model", str(root / "stage2"), str(tmp_path / "missing.png"), "What?"])
    assert exit_info.value.code == 1 and "missing.png" in capsys.readouterr().err


def test_cache_features_then_train_from_the_cache(workspace):
    root, _, _, model_flags, data_flags = workspace
    main(["cache-features", *model_flags, *data_flags, "--output_dir", str(root / "cache"), "--shard_size", "8"])
    assert (root / "cache" / "train" / "meta.json").exists() and (root / "cache" / "eval" / "meta.json").exists()
    cache_flags = ["--feature_cache", str(root / "cache"), "--eval_strategy", "steps", "--eval_steps", "3"]
    main(["train-qformer", *model_flags, *data_flags, *TRAIN_FLAGS, *cache_flags, "--output_dir", str(root / "c1")])
    metrics = json.loads((root / "c1" / "all_results.json").read_text())
    assert "eval_image_to_text_accuracy" in metrics


def test_unknown_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2 and "train-qformer" in capsys.readouterr().out


def test_example_scripts_run_with_the_reference_defaults_overridden(workspace):
    root, backbones, data, model_flags, data_flags = workspace
    overrides = [*model_flags, *data_flags, *TRAIN_FLAGS, "--eval_strategy", "no", "--save_strategy", "no"]
    overrides += ["--load_best_model_at_end", "false", "--max_samples", "48", "--image_column", "image"]
    overrides += ["--caption_column", "caption"]
    metrics = _example("train_qformer")([*overrides, "--output_dir", str(root / "ex1")])
    assert metrics["train_skipped_samples"] == 0
    _example("train_vlm")([*overrides, "--stage1_model", str(root / "ex1"), "--lora_r", "4", "--bf16", "false",
                           "--output_dir", str(root / "ex2")])  # fmt: skip
    answers = _example("caption")(["--model", str(root / "ex2"), "--max-new-tokens", "3", str(data / "00000.png")])
    assert len(answers) == 1
