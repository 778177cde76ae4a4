"""The benchmark scripts run end to end on tiny models and write the figures the README and the issue name; their
FLOP counting matches a hand count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def run_script(name: str, tmp_path: Path, *flags: str) -> tuple[dict, str]:
    """Runs `benchmarks/<name>.py --tiny --quick --json ...` as a user would; returns its JSON and stdout."""
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--tiny", "--quick", "--json", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    # the CPU the figures were measured on, under every table and in the JSON
    assert set(figures["cpu"]) >= {"cpu_capability", "avx512_bf16", "amx", "bf16_is_fast"}
    assert f"cpu_capability {figures['cpu']['cpu_capability']}" in result.stdout
    return figures, result.stdout


def test_bench_qformer(tmp_path):
    figures, stdout = run_script("bench_qformer", tmp_path)
    assert "| ours, ITC" in stdout and "BLIP-2 Q-Former, ITC" in stdout
    assert figures["ratio_vs_blip2_qformer"] > 0 and figures["ratio_cache_vs_pixels"] > 0
    assert set(figures["samples_per_s"]) == {
        "ours, ITC",
        "BLIP-2 Q-Former, ITC",
        "ours, feature cache",
        "ours, ViT on pixels",
    }
    # the same architecture and inputs: the two Q-Formers do about the same work (BLIP-2's text path has extra FFNs)
    ours, blip2 = figures["gflops_per_step"]["ours, ITC"], figures["gflops_per_step"]["BLIP-2 Q-Former, ITC"]
    assert 0.8 < ours / blip2 < 1.25


def test_bench_vlm(tmp_path):
    figures, stdout = run_script("bench_vlm", tmp_path, "--bf16", "on", "--compile", "off", "--threads", "1")
    assert "bare LM + LoRA, fp32" in stdout and "bare LM + LoRA, bf16" in stdout
    # each lever against the default, in both precisions, on the same batch: the same linear layers (the flash
    # kernel's backward recomputes the attention scores, eager attention's does not)
    levers = {f"VLM, {p}, {lever}" for p in ("fp32", "bf16") for lever in ("LoRA dropout 0", "eager attention")}
    assert set(figures["levers"]) == levers
    for name in levers:
        default = figures["gflops_per_step"][name.rsplit(", ", 1)[0]]
        assert figures["levers"][name]["speedup"] > 0
        assert figures["gflops_per_step"][name] == pytest.approx(default, rel=0.05)
    assert 0 < figures["utilisation_of_bf16_peak"] < 5
    assert 0 < figures["utilisation_of_fp32_peak"] < 5
    assert figures["overhead_vs_bare_lm"] > -1
    # the VLM step does the LM's work plus the Q-Former's: more FLOPs than the bare LM over the same tokens
    assert figures["fp32"]["flop_overhead_vs_bare_lm"] > 0


def test_bench_generate(tmp_path):
    figures, stdout = run_script("bench_generate", tmp_path, "--compile", "off")
    assert figures["caption_latency_s"] > 0 and figures["new_tokens"] == 30
    # bf16 is timed only where the CPU runs it natively (on AVX2 it would be emulated, ~60x slower)
    assert set(figures["images_per_s"]) == ({"fp32", "bf16"} if figures["cpu"]["bf16_is_fast"] else {"fp32"})
    assert "caption latency" in stdout


def test_bench_demo_stage2(tmp_path):
    pytest.importorskip("easy_vqa")
    figures, stdout = run_script("bench_demo_stage2", tmp_path, "--compile", "off")
    rows = figures["rows, 16 a step"]
    per_image = figures["conversations, 5 images x 3 questions (default)"]
    assert rows["answers_per_step"] == 16  # one answer a row
    assert 15 <= per_image["answers_per_step"] <= 20  # 3 questions an image, and some caption turns
    # one prompt prefix (system prompt, image) per image instead of one per answer
    assert per_image["lm_positions_per_step"] < rows["lm_positions_per_step"]
    # the same batches, on a model with LoRA on the LM's attention only
    attention_lora = figures["the default, LoRA on attention only"]
    assert attention_lora["lm_positions_per_step"] == per_image["lm_positions_per_step"]
    for figure in (rows, per_image):
        assert figure["epoch_s"] == pytest.approx(figure["steps_per_epoch"] * figure["s_per_step"])
    # SDPA instead of eager attention: the default's batches
    assert figures["the default, SDPA attention"]["lm_positions_per_step"] == per_image["lm_positions_per_step"]
    assert 0 < per_image["utilisation"] < 5
    assert "ms/answer" in stdout


@pytest.mark.compile
def test_bench_vlm_times_the_compiled_step(tmp_path):
    figures, stdout = run_script("bench_vlm", tmp_path, "--bf16", "off")
    compiled = figures["levers"]["VLM, fp32, compiled"]
    assert compiled["speedup"] > 0 and compiled["warmup_s"] > 0
    assert "VLM, fp32, compiled" in stdout


def test_benchmarks_time_bf16_only_where_the_hardware_runs_it(fake_cpu):
    from common import parse_args, precisions

    for native in (True, False):
        fake_cpu(native)
        assert precisions(parse_args("", [])) == (["fp32", "bf16"] if native else ["fp32"])
        assert precisions(parse_args("", ["--bf16", "off"])) == ["fp32"]
        assert precisions(parse_args("", ["--bf16", "on"])) == ["fp32", "bf16"]


def test_bench_memory(tmp_path):
    from common import cached_image_features, reference_config

    figures, _ = run_script("bench_memory", tmp_path)
    assert 0 < figures["peak_rss_gb_stage1"] < 24 and 0 < figures["peak_rss_gb_stage2"] < 24
    # float16 features of every image, plus a validity flag, a key (under 100 bytes) and the files' headers
    feature_bytes = cached_image_features(reference_config(tiny=True), 1000).nbytes
    assert feature_bytes / 1e9 <= figures["feature_cache_gb_per_1000_images"] < (1.05 * feature_bytes + 1e5) / 1e9


def test_gpu_reference_run(tmp_path):
    figures, stdout = run_script("gpu_reference_run", tmp_path)
    assert figures["projected_minutes"] == pytest.approx(sum(figures["projected_minutes_by_phase"].values()))
    assert all(0 < mfu for mfu in figures["mfu"].values())
    assert "projected reference run" in stdout


def test_step_flops_counts_linear_and_attention():
    """One training step of a linear layer and an SDPA call, counted by hand: the forward matmul, its input gradient
    (the input requires grad) and its weight gradient; attention's QK^T and AV forward, and backward the flash
    kernel's five: the scores recomputed, then the gradients of V, of the scores, of Q and of K."""
    from common import step_flops

    rows, features, heads, length, dim = 6, 8, 2, 5, 4
    linear = nn.Linear(features, features, bias=False)
    x = torch.randn(rows, features, requires_grad=True)
    q, k, v = (torch.randn(1, heads, length, dim, requires_grad=True) for _ in range(3))

    def step() -> None:
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        (linear(x).sum() + attention.sum()).backward()

    linear_flops = 3 * 2 * rows * features * features
    attention_flops = (2 + 5) * 2 * heads * length * length * dim
    assert step_flops(step) == linear_flops + attention_flops
