"""vLLM's transformers backend serves a saved folder with the same greedy tokens as transformers' `generate`.

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


@pytest.mark.skipif(not VLLM_PYTHON, reason="SMOLVLM_VLLM_PYTHON (an interpreter with vLLM) is not set")
def test_vllm_serves_the_same_greedy_tokens_as_transformers(tmp_path):
    result = subprocess.run([VLLM_PYTHON, str(SERVE), str(tmp_path)], capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert line is not None, result.stderr[-6000:]
    report = json.loads(line[len("REPORT ") :])
    mismatched = {
        name: case for name, case in report["cases"].items() if not (case["prompt_equal"] and case["tokens_equal"])
    }
    assert not mismatched, mismatched
    assert report["distinct_outputs"] >= 4, report
    assert result.returncode == 0
