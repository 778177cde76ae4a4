"""Crash safety with real SIGKILLs (`tests/crash_run.py` kills a CLI run at a chosen point): a training run killed
mid-save or mid-step resumes from its newest complete checkpoint (`--resume_from_checkpoint auto`) with the losses
and batches of an uninterrupted run, and a feature-cache build killed mid-shard completes on rerun without redoing
finished shards or reading the half-written one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoImageProcessor, AutoModel

from smolvlm_qformer.data import DataArguments, FeatureCache, build_feature_cache, split_train_eval
from smolvlm_qformer.testing_utils import make_shapes_dataset, save_tiny_backbones

CRASH_RUN = Path(__file__).parent / "crash_run.py"
STEPS, SAVE_EVERY = 4, 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("crash")
    backbones = save_tiny_backbones(root / "backbones", processor)
    model_flags = [
        "--vision_model", backbones["vision"],
        "--qformer_model", backbones["qformer"],
        "--language_model", backbones["language_model"],
        "--num_query_tokens", "4",
        "--lora_r", "4",
    ]  # fmt: skip
    data = make_shapes_dataset(root / "shapes", 48)
    return root, model_flags, ["--data_dir", str(data), "--eval_fraction", "0"]


def _start(kill: str, record: str, command: list[str]) -> subprocess.Popen:
    # one thread a run: two runs go side by side, and on a 2-core Intel Xeon two float32 runs of 2 threads each gave
    # gradient norms 1% apart from the first step (so no resumed loss matched); with one thread each they agree
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(CRASH_RUN), kill, record, *command], stderr=subprocess.PIPE, env=env)


def _finish(process: subprocess.Popen) -> int:
    _, stderr = process.communicate(timeout=300)
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(stderr.decode()[-3000:])
    return process.returncode


def _losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _batches(record: Path) -> list[list[int]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize(
    "command, kill, resumed_from",
    [
        ("train-qformer", "save:4", 2),  # killed while writing checkpoint-4: it must not count as a checkpoint
        ("train-vlm", "step:3", 2),  # killed halfway through step 3
    ],
)
def test_a_killed_run_resumes_with_the_uninterrupted_losses_and_batches(workspace, command, kill, resumed_from):
    root, model_flags, data_flags = workspace
    run = root / command
    columns = ["--question_column", "question", "--answer_column", "answer"]
    flags = [*model_flags, *data_flags, *(columns if command == "train-vlm" else [])]
    flags += ["--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--logging_steps", "1"]
    flags += ["--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    whole = _start("none", str(run / "whole.jsonl"), [command, *flags, "--output_dir", str(run / "whole")])
    killed = _start(kill, str(run / "killed.jsonl"), [command, *flags, "--output_dir", str(run / "killed")])
    assert (_finish(killed), _finish(whole)) == (-signal.SIGKILL, 0)
    checkpoints = sorted(p.name for p in (run / "killed").iterdir() if "checkpoint" in p.name)
    # the half-written checkpoint is only a staging folder
    assert checkpoints == ["checkpoint-2", "tmp-checkpoint-4"] if kill.startswith("save") else ["checkpoint-2"]

    resumed = [command, *flags, "--output_dir", str(run / "killed"), "--resume_from_checkpoint", "auto"]
    assert _finish(_start("none", str(run / "resumed.jsonl"), resumed)) == 0
    expected, actual = _losses(run / "whole" / f"checkpoint-{STEPS}"), _losses(run / "killed" / f"checkpoint-{STEPS}")
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):  # trained again after the resumption
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # the batches from the resumed step on (the data loader collates one batch ahead, so one more than trained)
    assert _batches(run / "resumed.jsonl") == _batches(run / "whole.jsonl")[resumed_from:]
    assert not (run / "killed" / "tmp-checkpoint-4").exists()  # the next save of that step cleared it


def test_a_cache_build_killed_mid_shard_completes_without_redoing_finished_shards(workspace):
    root, model_flags, data_flags = workspace
    flags = ["cache-features", *model_flags[:2], *data_flags, "--shard_size", "8", "--batch_size", "8"]
    killed = root / "cache-killed"
    process = _start("shard:2", "-", [*flags, "--output_dir", str(killed)])
    assert _finish(process) == -signal.SIGKILL
    folder = killed / "train"
    half_written = folder / "shard_00002.npy.tmp"
    assert half_written.exists() and not (folder / "shard_00002.npy").exists()
    with pytest.raises(ValueError, match=r"incomplete \(shards \[2, 3, 4, 5\]"):
        FeatureCache(folder)  # a half-built cache is never read
    finished = {name: (folder / name).stat().st_mtime_ns for name in ("shard_00000.npy", "shard_00001.npy")}

    assert _finish(_start("none", "-", [*flags, "--output_dir", str(killed)])) == 0
    assert {name: (folder / name).stat().st_mtime_ns for name in finished} == finished
    assert not half_written.exists()
    train, _ = split_train_eval(DataArguments(data_dir=data_flags[1], eval_fraction=0), seed=42)
    vision = AutoModel.from_pretrained(model_flags[1])
    reference = build_feature_cache(vision, AutoImageProcessor.from_pretrained(model_flags[1]), train, root / "whole")
    resumed, expected = FeatureCache(folder).get(range(48)), reference.get(range(48))
    np.testing.assert_array_equal(resumed[0].numpy(), expected[0].numpy())
    assert resumed[1].all()
