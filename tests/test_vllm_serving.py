"""vLLM's transformers backend serves a saved folder with the same greedy tokens as transformers' `generate`: the
offline `LLM`, and the OpenAI-compatible server that `smolvlm-qformer serve` starts.

Runs tests/vllm_serve.py with `$SMOLVLM_VLLM_PYTHON`, an interpreter whose environment has vLLM and this package
(vLLM pins its own torch and transformers, so it lives in an environment of its own); skipped when it is unset.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("SMOLVLM_VLLM_PYTHON")
SERVE = Path(__file__).with_name("vllm_serve.py")
BENCH_SERVE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="SMOLVLM_VLLM_PYTHON (an interpreter with vLLM) is not set")


def serve_report(tmp_path: Path, *flags: str) -> dict:
    """tests/vllm_serve.py's report for a tiny folder saved under `tmp_path`, every case checked equal."""
    result = subprocess.run(
        [VLLM_PYTHON, str(SERVE), str(tmp_path / "model"), *flags], capture_output=True, text=True, timeout=1800
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert line is not None, f"exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    report = json.loads(line[len("REPORT ") :])
    mismatched = {
        name: case for name, case in report["cases"].items() if not (case["prompt_equal"] and case["tokens_equal"])
    }
    assert not mismatched, mismatched
    # different images must give different outputs, or the comparison would not show the image is used
    assert report["distinct_outputs"] >= 4, report
    assert result.returncode == 0
    return report


def test_vllm_serves_the_same_greedy_tokens_as_transformers(tmp_path):
    report = serve_report(tmp_path)
    assert {"caption_image0", "question_image2", "text_only", "chat:question_image0"} <= set(report["cases"])


@pytest.mark.parametrize("template", ["meta-llama/Llama-3.2-1B-Instruct", "google/gemma-3-270m-it"])
def test_vllm_serves_lms_of_other_chat_templates_with_the_same_greedy_tokens(tmp_path, template):
    """An LM with Llama 3's template (its header tokens, a system block with today's date) and one with Gemma 3's
    (no system role, `model` turns): prompts rendered through vLLM's chat entry point equal ours."""
    report = serve_report(tmp_path, "--template", template)
    assert {"caption_image0", "question_image2", "text_only", "chat:question_image0"} <= set(report["cases"])


def test_openai_server_answers_chat_completions_with_the_same_greedy_tokens(tmp_path):
    report = serve_report(tmp_path, "--server")
    assert {"caption_image0", "question_image2", "text_only"} <= set(report["cases"])
    # a bad image is the client's error, said in words, and the next request is served as before
    bad = report["bad_images"]
    assert bad["garbage_base64"]["status"] == 400 and "base64" in bad["garbage_base64"]["message"]
    assert bad["not_an_image"]["status"] == 400 and "image" in bad["not_an_image"]["message"]
    assert "after_bad_images:question_image0" in report["cases"]
    assert report["stopped_on_sigterm"], report["seconds"]
    # examples/openai_client.py (the openai client, a base64 data URL) answers with generate's text
    example = report["example_client"]
    assert example["returncode"] == 0, example["stderr"]
    assert example["answer"] == example["expected"] and example["answer"]


def test_bench_serve_times_vllm_and_generate_on_the_same_captions(tmp_path):
    out = tmp_path / "bench_serve.json"
    command = [VLLM_PYTHON, str(BENCH_SERVE), "--tiny", "--quick", "--bf16", "off", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    figures = json.loads(out.read_text())
    fp32 = figures["by_precision"]["fp32"]
    assert set(fp32["images_per_s"]) == set(fp32["time_to_first_token_s"]) == {"vllm", "generate"}
    assert min(fp32["images_per_s"].values()) > 0 and min(fp32["time_to_first_token_s"].values()) > 0
    # the contenders do the same work: the same greedy captions, batched on both sides
    assert fp32["same_greedy_tokens"] == figures["images"] == 8
    assert f"cpu_capability {figures['cpu']['cpu_capability']}" in result.stdout and "| vLLM, fp32" in result.stdout
