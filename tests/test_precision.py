"""`--bf16 auto|true|false`: parsed alike by every command that runs a model, "auto" decided from the hardware."""

import pytest
import torch

from smolvlm_qformer.cli import _generation_parser, parse_arguments
from smolvlm_qformer.data import DataArguments
from smolvlm_qformer.evaluation.run import EvaluateArguments
from smolvlm_qformer.hardware import bf16_is_fast, inference_dtype, resolve_bf16
from smolvlm_qformer.training import ModelArguments, SmolVLMTrainingArguments

TRAINING = (ModelArguments, DataArguments, SmolVLMTrainingArguments)


def test_resolve_bf16_takes_the_three_choices_and_bools(fake_cpu):
    for native in (True, False):
        fake_cpu(native)
        assert resolve_bf16("auto", "cpu") is native and resolve_bf16(None, "cpu") is native
        assert inference_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_bf16("true", "cpu") is True and resolve_bf16("False", "cpu") is False
    assert resolve_bf16(True, "cpu") is True and inference_dtype(False, "cpu") == torch.float32
    with pytest.raises(ValueError, match="auto, true, false"):
        resolve_bf16("maybe", "cpu")


def test_training_commands_parse_bf16_into_a_bool(tmp_path, fake_cpu):
    fake_cpu(True)
    flags = ["--output_dir", str(tmp_path), "--use_cpu"]
    assert parse_arguments(TRAINING, flags)[2].bf16 is True  # auto on a CPU with native bf16
    assert parse_arguments(TRAINING, [*flags, "--bf16", "false"])[2].bf16 is False
    fake_cpu(False)
    assert parse_arguments(TRAINING, [*flags, "--bf16", "auto"])[2].bf16 is False
    assert parse_arguments(TRAINING, [*flags, "--bf16", "true"])[2].bf16 is True
    with pytest.raises(SystemExit):
        parse_arguments(TRAINING, [*flags, "--bf16", "sometimes"])


def test_inference_commands_take_the_same_choices():
    parser = _generation_parser("caption", question=False)
    assert parser.parse_args(["--model", "m", "a.png"]).bf16 == "auto"
    assert parser.parse_args(["--model", "m", "--bf16", "false", "a.png"]).bf16 == "false"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--bf16", "yes", "a.png"])
    (evaluate, _) = parse_arguments((EvaluateArguments, DataArguments), ["--model", "m", "--bf16", "true"])
    assert evaluate.bf16 == "true"
    demo = pytest.importorskip("smolvlm_qformer.demo", reason="its assets need transformers 5", exc_type=ImportError)
    (args,) = parse_arguments((demo.DemoArguments,), ["--bf16", "false"])
    assert args.bf16 == "false" and demo.DemoArguments().bf16 == "auto"


def test_auto_follows_the_hardware_here():
    assert resolve_bf16("auto", "cpu") is bf16_is_fast("cpu")
