"""Safe loading: the three remote-code files import only the standard library, torch, numpy and transformers and
call nothing that reaches the network, runs programs or evaluates code; nothing in the package unpickles; a saved
folder holds safetensors weights only."""

import ast
import sys
from pathlib import Path

import pytest

import smolvlm_qformer
from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.testing_utils import tiny_config

PACKAGE = Path(smolvlm_qformer.__file__).parent
REMOTE_CODE = ["configuration_smolvlm_qformer.py", "modeling_smolvlm_qformer.py", "processing_smolvlm_qformer.py"]
# PIL: what image processors decode with; jinja2: what transformers renders chat templates with (its TemplateError)
ALLOWED_THIRD_PARTY = {"torch", "numpy", "transformers", "PIL", "jinja2"}
NETWORK_OR_PROCESS_MODULES = {"requests", "urllib", "http", "socket", "subprocess", "pickle", "shelve", "marshal"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "os.system", "os.popen", "os.exec", "torch.load"}
UNPICKLING_CALLS = {"torch.load", "pickle.load", "pickle.loads", "dill.load", "joblib.load"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name / Attribute chain, "" otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _imports(tree: ast.AST) -> set[str]:
    """Top-level names of the absolute imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _calls(tree: ast.AST) -> set[str]:
    return {_dotted(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_imports_and_calls_nothing_unsafe(name):
    tree = ast.parse((PACKAGE / name).read_text())
    imports = _imports(tree)
    assert imports <= set(sys.stdlib_module_names) | ALLOWED_THIRD_PARTY, imports
    assert not imports & NETWORK_OR_PROCESS_MODULES
    calls = _calls(tree)
    assert not {call for call in calls if call in FORBIDDEN_CALLS or call.startswith(("subprocess.", "socket."))}


def test_nothing_in_the_package_unpickles():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert "pickle" not in _imports(tree), path
        assert not _calls(tree) & UNPICKLING_CALLS, path
        for node in ast.walk(tree):  # numpy's loader only with its default allow_pickle=False
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, path


def test_a_saved_folder_holds_safetensors_weights_only(processor, tmp_path):
    SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).save_pretrained(tmp_path)
    weights = {p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl")}
    assert weights == {"model.safetensors"}
