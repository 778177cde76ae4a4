"""The model card reads back as Hub metadata with its metrics; the upload sends exactly the model's files."""

import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, ModelCard
from PIL import Image

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.model_card import REFERENCE_BACKBONES, files_to_upload, push_to_hub, write_model_card
from smolvlm_qformer.testing_utils import tiny_config

TRAINING = {
    "datasets": ["yerevann/coco-karpathy", "HuggingFaceM4/VQAv2"],
    "stage_1": "ITC + ITM + ITG on COCO captions, 5 epochs, lr 1e-4",
    "stage_2": "captioning + VQA, LoRA r=16 on the LM, 2 epochs",
    "hardware": "1x H100, 9 hours",
}
RESULTS = {
    "COCO Karpathy test": {
        "task": "image-to-text",
        "dataset": "yerevann/coco-karpathy",
        "split": "test",
        "metrics": {"cider_d": 1.0512, "bleu": 0.3123},
    },
    "VQAv2 val": {
        "task": "visual-question-answering",
        "dataset": "HuggingFaceM4/VQAv2",
        "split": "validation",
        "metrics": {"vqa_accuracy": 0.4871},
    },
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor) -> tuple[Path, set[str]]:
    """A folder with a saved tiny model and processor, and the files `save_pretrained` wrote into it."""
    folder = tmp_path_factory.mktemp("model")
    SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def model_folder(saved) -> Path:
    return saved[0]


def test_card_metadata_reads_back_with_the_metrics(model_folder):
    write_model_card(model_folder, TRAINING, RESULTS, repo_id="someone/smolvlm-qformer-tiny")
    card = ModelCard.load(model_folder / "README.md")

    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model == list(REFERENCE_BACKBONES)
    assert card.data.datasets == ["yerevann/coco-karpathy", "HuggingFaceM4/VQAv2"]
    assert card.data.license == "apache-2.0"
    assert "custom_code" in card.data.tags
    assert card.data.model_name == "smolvlm-qformer-tiny"
    metrics = {
        (r.dataset_name, r.dataset_split, r.task_type, r.metric_type): r.metric_value for r in card.data.eval_results
    }
    assert metrics == {
        ("COCO Karpathy test", "test", "image-to-text", "cider_d"): 1.0512,
        ("COCO Karpathy test", "test", "image-to-text", "bleu"): 0.3123,
        ("VQAv2 val", "validation", "visual-question-answering", "vqa_accuracy"): 0.4871,
    }
    assert 'from_pretrained("someone/smolvlm-qformer-tiny", trust_remote_code=True)' in card.text
    assert 'pipeline("image-text-to-text"' in card.text
    assert "LoRA r=16 on the LM" in card.text
    assert "through 4 query embeddings of a 32x32 view" in card.text  # read from the folder's config


def test_card_without_results_has_no_model_index(model_folder):
    card = write_model_card(model_folder, {"datasets": ["yerevann/coco-karpathy"]})
    assert card.data.eval_results is None
    assert "model-index" not in (model_folder / "README.md").read_text()


def test_card_rejects_non_numeric_metrics(model_folder):
    with pytest.raises(TypeError, match="scores"):
        write_model_card(model_folder, TRAINING, {"x": {"task": "t", "dataset": "d", "metrics": {"scores": [1.0]}}})


@pytest.fixture
def full_folder(model_folder) -> Path:
    """The saved model plus a card, a LoRA adapter and what a training run leaves behind."""
    write_model_card(model_folder, TRAINING, RESULTS)
    for name in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint-500/trainer_state.json",
        "runs/events.out.tfevents",
        "training_args.bin",
        ".cache/huggingface/upload.lock",
        "__pycache__/modeling_smolvlm_qformer.cpython-311.pyc",
    ]:
        (model_folder / name).parent.mkdir(parents=True, exist_ok=True)
        (model_folder / name).write_text("x")
    return model_folder


def test_files_to_upload(full_folder, saved):
    model_files = saved[1] | {"README.md"}
    essentials = {"config.json", "model.safetensors", "processor_config.json", "qformer_tokenizer/tokenizer.json"}
    assert essentials | {"modeling_smolvlm_qformer.py", "configuration_smolvlm_qformer.py"} <= model_files
    assert "processing_smolvlm_qformer.py" in model_files
    assert files_to_upload(full_folder) == sorted(model_files)
    adapter = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert files_to_upload(full_folder, include_adapter=True) == sorted(model_files | adapter)


def test_files_to_upload_needs_card_code_and_adapter(tmp_path, full_folder):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="README.md, configuration_smolvlm_qformer.py"):
        files_to_upload(tmp_path)
    adapterless = tmp_path / "adapterless"
    adapterless.mkdir()
    for name in files_to_upload(full_folder):
        (adapterless / name).parent.mkdir(parents=True, exist_ok=True)
        (adapterless / name).write_text("x")
    with pytest.raises(FileNotFoundError, match="adapter/"):
        files_to_upload(adapterless, include_adapter=True)


def test_push_to_hub_commits_exactly_those_files(full_folder):
    with mock.patch("smolvlm_qformer.model_card.HfApi") as hf_api:
        api = hf_api.return_value
        push_to_hub(full_folder, "someone/smolvlm-qformer-tiny", include_adapter=True, private=True, token="t")

    hf_api.assert_called_once_with(token="t")
    api.create_repo.assert_called_once_with(
        "someone/smolvlm-qformer-tiny", repo_type="model", private=True, exist_ok=True
    )
    (repo_id, operations), kwargs = api.create_commit.call_args
    assert repo_id == "someone/smolvlm-qformer-tiny"
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == files_to_upload(full_folder, include_adapter=True)
    assert all(op.path_or_fileobj == os.path.join(full_folder, op.path_in_repo) for op in operations)
    assert kwargs["commit_message"] == "Upload smolvlm-qformer model"


def test_card_usage_snippet_runs_on_the_folder(model_folder):
    card = write_model_card(model_folder, TRAINING)
    snippet = card.text.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(model_folder))
    namespace = {"image": Image.fromarray(np.full((40, 48, 3), 120, dtype=np.uint8))}
    exec(snippet, namespace)
    assert isinstance(namespace["answer"], str)


def test_card_try_it_names_the_chat_command_for_the_repo(model_folder):
    from smolvlm_qformer.cli import COMMANDS
    from smolvlm_qformer.model_card import try_it_command

    card = write_model_card(model_folder, TRAINING, repo_id="someone/smolvlm-qformer")
    try_it = card.text.split("## Try it")[1].split("## ")[0]
    command = try_it.split("```bash\n")[1].split("```")[0].splitlines()[-1]
    assert command == try_it_command("someone/smolvlm-qformer") == "smolvlm-qformer chat someone/smolvlm-qformer"
    assert command.split()[1] in COMMANDS  # a command the CLI has (tests/test_app_browser.py starts the app)
