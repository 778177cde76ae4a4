"""Save -> load in a fresh process (package not importable) through the Auto classes and pipelines.

Every direction between this interpreter's transformers line and the one of `$SMOLVLM_OTHER_PYTHON` (an interpreter
with the other line, e.g. 4.57.x next to 5.x; `.ci/run` sets it) is checked when that variable is set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROUNDTRIP = Path(__file__).with_name("roundtrip.py")
INTERPRETERS = {"this": sys.executable}
if os.environ.get("SMOLVLM_OTHER_PYTHON"):
    INTERPRETERS["other"] = os.environ["SMOLVLM_OTHER_PYTHON"]


def _run(python: str, *args: str) -> str:
    result = subprocess.run([python, str(ROUNDTRIP), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def saved_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"saved_by_{request.param}")
    _run(INTERPRETERS[request.param], "save", str(folder))
    return folder


@pytest.mark.parametrize("loader", list(INTERPRETERS))
def test_saved_folder_loads_everywhere_with_the_same_outputs(saved_folder, loader):
    expected = json.loads((saved_folder / "expected.json").read_text())
    files = {p.name for p in saved_folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_smolvlm_qformer.py", "processing_smolvlm_qformer.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)

    stdout = _run(INTERPRETERS[loader], "load", str(saved_folder))
    report = json.loads(stdout.split("REPORT ", 1)[1])
    assert report["input_ids_equal"]
    for key, value in report.items():
        if key.endswith("_max_abs_diff"):
            assert value <= 1e-5, (key, value)
        if key.endswith("_is_remote_code"):
            assert value, key
    assert report["pipeline_answer"].strip() == expected["answer"].strip()
    assert expected["answer"].strip()  # a non-trivial answer is compared
    if report["transformers"].startswith("4."):
        assert "AutoModelForVision2Seq_max_abs_diff" in report
        assert report["pipeline_caption"].strip() == expected["caption"].strip()
