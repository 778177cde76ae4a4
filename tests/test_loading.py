"""Save -> load in a fresh process (package not importable) through the Auto classes and pipelines.

Every direction between this interpreter's transformers release and those of `$SMOLVLM_OTHER_PYTHONS` (interpreters
with other releases of the supported range, separated by `os.pathsep`: `.ci/run` sets 4.57.x and 5.19.x next to the
newest 5.x) is checked when that variable is set. `$SMOLVLM_NEWEST_PYTHON` is an interpreter with only torch and the
newest transformers the package index serves, uncapped (no smolvlm_qformer): folders saved here must load there too,
as they will for whoever downloads them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROUNDTRIP = Path(__file__).with_name("roundtrip.py")
INTERPRETERS = {"this": sys.executable}
for python in filter(None, os.environ.get("SMOLVLM_OTHER_PYTHONS", "").split(os.pathsep)):
    INTERPRETERS[Path(python).parent.parent.name] = python  # named by its environment, e.g. .venv-tf4
LOADERS = dict(INTERPRETERS)
if newest := os.environ.get("SMOLVLM_NEWEST_PYTHON"):
    LOADERS["newest"] = newest


def _run(python: str, *args: str) -> str:
    result = subprocess.run([python, str(ROUNDTRIP), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def saved_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"saved_by_{request.param}")
    _run(INTERPRETERS[request.param], "save", str(folder))
    return folder


@pytest.mark.parametrize("loader", list(LOADERS))
def test_saved_folder_loads_everywhere_with_the_same_outputs(saved_folder, loader):
    expected = json.loads((saved_folder / "expected.json").read_text())
    files = {p.name for p in saved_folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_smolvlm_qformer.py", "processing_smolvlm_qformer.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)

    stdout = _run(LOADERS[loader], "load", str(saved_folder))
    report = json.loads(stdout.split("REPORT ", 1)[1])
    assert report["input_ids_equal"]
    for key, value in report.items():
        if key.endswith("_max_abs_diff"):
            assert value <= 1e-5, (key, value)
        if key.endswith("_is_remote_code"):
            assert value, key
    assert report["pipeline_answer"].strip() == expected["answer"].strip()
    assert expected["answer"].strip()  # a non-trivial answer is compared
    assert report["AutoModel_class"] == "SmolVLMQFormerModel"
    if report["transformers"].startswith("4."):
        assert "AutoModelForVision2Seq_max_abs_diff" in report
        assert report["image_to_text_caption"].strip() == expected["caption"].strip()


SAVE_CONFIG = """
import sys
from smolvlm_qformer import SmolVLMQFormerConfig
text = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
        "intermediate_size": 64, "rope_theta": 12345.0, "vocab_size": 100}
SmolVLMQFormerConfig(text_config=text).save_pretrained(sys.argv[1])
"""
LOAD_CONFIG = """
import json, sys, transformers
from smolvlm_qformer import SmolVLMQFormerConfig
text = SmolVLMQFormerConfig.from_pretrained(sys.argv[1]).text_config
# the RoPE base each line's Llama actually uses
rope_theta = text.rope_theta if transformers.__version__.startswith("4.") else text.rope_parameters["rope_theta"]
report = {"rope_theta": rope_theta, "pad_token_id": text.pad_token_id, "kv": text.num_key_value_heads}
print("REPORT " + json.dumps(report))
"""


@pytest.mark.parametrize("saver", list(INTERPRETERS))
@pytest.mark.parametrize("loader", list(INTERPRETERS))
def test_text_config_round_trips_across_lines_without_borrowed_defaults(saver, loader, tmp_path):
    """A non-SmolLM2 text config keeps its own RoPE base (which 4.x reads from a top-level key only) and takes no
    SmolLM2 default it did not have."""
    save = subprocess.run([INTERPRETERS[saver], "-c", SAVE_CONFIG, str(tmp_path)], capture_output=True, text=True)
    assert save.returncode == 0, save.stderr[-2000:]
    load = subprocess.run([INTERPRETERS[loader], "-c", LOAD_CONFIG, str(tmp_path)], capture_output=True, text=True)
    assert load.returncode == 0, load.stderr[-2000:]
    report = json.loads(load.stdout.split("REPORT ", 1)[1])
    assert report == {"rope_theta": 12345.0, "pad_token_id": None, "kv": 4}
