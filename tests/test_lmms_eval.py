"""lmms-eval scores a tiny saved folder through our plugin (`--model smolvlm_qformer`, found by its entry point) on
two local tasks (tests/lmms_eval_tasks/ over an image folder written here), with lmms-eval's own CLI, offline: a
VQA task (chat mode, generation; scored by lmms-eval's own VQAv2 code) and a multiple-choice task (simple mode,
loglikelihood). Its answers are `generate_texts`' and its scores equal ours: the `vqa_accuracy` metric that
`smolvlm-qformer evaluate` reports, and multiple-choice accuracy from log-likelihoods computed here one choice at a
time with the model's own loss.

Runs with `$SMOLVLM_LMMS_PYTHON`, the interpreter of an environment with lmms-eval and this package (lmms-eval pins
its own dependencies, so it lives in an environment of its own: `docs/evaluation.md`, "Evaluating with lmms-eval");
skipped when it is unset.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from smolvlm_qformer.evaluation import load_metric
from smolvlm_qformer.inference import generate_texts, load_for_inference
from smolvlm_qformer.testing_utils import COLOURS, SHAPES, draw_shape

LMMS_PYTHON = os.environ.get("SMOLVLM_LMMS_PYTHON")
TASKS = Path(__file__).with_name("lmms_eval_tasks")
MAX_NEW_TOKENS = 6  # the VQA task's generation_kwargs
CHOICES = ["red", "green", "blue"]

pytestmark = pytest.mark.skipif(not LMMS_PYTHON, reason="SMOLVLM_LMMS_PYTHON (a python with lmms-eval) is not set")


def choice_loglikelihoods(model, processor, image, question: str) -> list[float]:
    """log p(" choice" | the question about the image as a chat prompt), one forward pass per choice, from the
    model's own loss over the continuation's tokens."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_length = len(processor.encode_text([prompt], padding=False)["input_ids"][0])
    scores = []
    for choice in CHOICES:
        inputs = processor(images=[image], text=[prompt + " " + choice])
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_length] = -100
        with torch.no_grad():
            loss = model(**inputs, labels=labels).loss
        scores.append(-loss.item() * (labels.shape[1] - prompt_length))
    return scores


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, folder):
    """shapes/ (images + metadata.jsonl) and what our own code predicts on it. Each question's ten answers hold the
    model's greedy answer 0-4 times, so VQA accuracy takes several values; each multiple-choice label is the
    choice our log-likelihoods rank first for even rows and another one for odd rows."""
    root = tmp_path_factory.mktemp("lmms")
    (root / "shapes").mkdir()
    model, processor = load_for_inference(str(folder))
    rows = []
    for index, (colour, shape) in enumerate(zip(COLOURS[:6], SHAPES[:3] * 2, strict=True)):
        image = draw_shape(colour, shape, size=48, seed=index)
        image.save(root / "shapes" / f"{index}.png")
        question = ["What colour is the shape?", "What shape is it?", "Is it red?"][index % 3]
        rows.append({"file_name": f"{index}.png", "question_id": index, "question": question, "image": image})
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    predictions = list(generate_texts(model, processor, images, questions, max_new_tokens=MAX_NEW_TOKENS))
    lls = [choice_loglikelihoods(model, processor, r["image"], r["question"]) for r in rows]
    with open(root / "shapes" / "metadata.jsonl", "w", encoding="utf-8") as f:
        for index, (row, prediction, scores) in enumerate(zip(rows, predictions, lls, strict=True)):
            matches = index % 5
            best = max(range(len(CHOICES)), key=scores.__getitem__)
            row.update(
                answers=[prediction] * matches + [f"not {index} {k}" for k in range(10 - matches)],
                choices=CHOICES,
                label=best if index % 2 == 0 else (best + 1) % len(CHOICES),
            )
            f.write(json.dumps({k: v for k, v in row.items() if k != "image"}) + "\n")
    return root, predictions, lls, rows


def run_lmms_eval(root: Path, folder: Path, tasks: str, *flags: str) -> tuple[dict, dict[str, list[dict]]]:
    """lmms-eval's CLI on the local tasks, offline: (its results JSON, its logged samples by task)."""
    output = root / f"out-{tasks.replace(',', '-')}{''.join(flags)}"  # lmms-eval splits its arguments at commas
    command = [
        str(Path(LMMS_PYTHON).parent / "lmms-eval"),
        *("--model", "smolvlm_qformer", "--model_args", f"pretrained={folder},device=cpu"),
        *("--tasks", tasks, "--include_path", str(TASKS), "--batch_size", "4"),
        *("--output_path", str(output), "--log_samples", *flags),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "cache")}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    results_files = list(output.rglob("*_results.json"))  # lmms-eval exits with 0 after an error, writing none
    assert result.returncode == 0 and len(results_files) == 1, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    results_file = results_files[0]
    samples = {
        task: [json.loads(line) for line in next(output.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
        for task in tasks.split(",")
    }
    return json.loads(results_file.read_text()), samples


def test_vqa_scores_equal_ours(workspace, folder):
    root, predictions, _, rows = workspace
    # what `smolvlm-qformer evaluate` reports as vqa_accuracy, on our own greedy answers
    references = [row["answers"] for row in rows]
    vqa_accuracy = load_metric("vqa_accuracy").compute(predictions=predictions, references=references)["vqa_accuracy"]
    assert 0 < vqa_accuracy < 1  # the answers hold the prediction 0-4 times: neither all wrong nor all right

    results, samples = run_lmms_eval(root, folder, "smolvlm_shapes_vqa")  # chat mode: doc_to_messages
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples["smolvlm_shapes_vqa"]}
    assert [answers[i] for i in range(len(predictions))] == predictions
    assert results["results"]["smolvlm_shapes_vqa"]["exact_match,none"] == pytest.approx(vqa_accuracy, abs=1e-12)


def test_multiple_choice_and_simple_mode_scores_equal_ours(workspace, folder):
    root, predictions, lls, rows = workspace
    tasks = "smolvlm_shapes_choice,smolvlm_shapes_vqa"
    results, samples = run_lmms_eval(root, folder, tasks, "--force_simple")
    ranked_first = [max(range(len(CHOICES)), key=scores.__getitem__) for scores in lls]
    accuracy = sum(best == row["label"] for best, row in zip(ranked_first, rows, strict=True)) / len(rows)
    assert results["results"]["smolvlm_shapes_choice"]["acc,none"] == pytest.approx(accuracy, abs=1e-12) == 0.5
    for sample in samples["smolvlm_shapes_choice"]:
        # lmms-eval takes losses (it picks the least) and logs them as strings
        theirs = [-float(response[0]) for response in sample["filtered_resps"]]
        assert theirs == pytest.approx(lls[sample["doc_id"]], abs=1e-4)
    # simple mode generates from doc_to_visual + the context string: the same answers as chat mode and ours
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples["smolvlm_shapes_vqa"]}
    assert [answers[i] for i in range(len(predictions))] == predictions
