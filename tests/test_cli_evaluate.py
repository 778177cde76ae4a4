"""`smolvlm-qformer evaluate` and `push`, end to end on tiny saved models and a generated image folder."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerForImageTextRetrieval
from smolvlm_qformer.cli import main
from smolvlm_qformer.evaluation.run import generation_metrics, group_rows
from smolvlm_qformer.model_card import files_to_upload, write_model_card
from smolvlm_qformer.testing_utils import make_shapes_dataset, tiny_config

RECALL_KEYS = [f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)] + ["mean_recall"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, processor) -> Path:
    """A tiny stage-2 model (with a card and an adapter folder), a tiny stage-1 model and 12 shape images, one of
    them unreadable."""
    root = tmp_path_factory.mktemp("evaluate")
    SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).save_pretrained(root / "stage2")
    processor.save_pretrained(root / "stage2")
    write_model_card(root / "stage2", {"datasets": ["shapes"]})
    (root / "stage2" / "adapter").mkdir()
    (root / "stage2" / "adapter" / "adapter_config.json").write_text("{}")
    SmolVLMQFormerForImageTextRetrieval(tiny_config(processor, losses=["itc", "itm"])).save_pretrained(root / "stage1")
    processor.save_pretrained(root / "stage1")
    data = make_shapes_dataset(root / "shapes", 12)
    (data / "00003.png").write_bytes(b"not an image")
    return root


def _evaluate(root: Path, model: str, *flags: str, split: str = "train") -> dict:
    output = root / f"{model}-{len(flags)}.json"
    data_flags = ["--dataset", "imagefolder", "--data_dir", str(root / "shapes")]
    data_flags += ["--split", split] if split else ["--eval_fraction", "0.25"]  # no split: the held-out rows
    main(["evaluate", "--model", str(root / model), *data_flags, "--output", str(output), *flags])
    return json.loads(output.read_text())


def test_stage2_captions_scored_and_the_unreadable_image_counted(workspace, capsys):
    results = _evaluate(workspace, "stage2", "--max_new_tokens", "3", "--batch_size", "5", "--bf16", "false")
    assert results["task"] == "generation" and results["num_rows"] == 12 and results["bf16"] is False
    assert results["skipped_images"] == 1 and results["num_captioned_images"] == 11
    assert results["num_questions"] == 0 and "vqa_accuracy" not in results
    assert 0 <= results["bleu"] <= 1 and 0 <= results["cider_d"] <= 10  # CIDEr-D's scale tops out at 10
    table = capsys.readouterr().out
    assert "cider_d" in table and "skipped_images" in table
    baselines = results["baselines"]  # every caption differs: a nearest neighbour, no linear probe
    assert set(baselines["nearest_neighbour"]) == {"cider_d", "bleu", "caption_accuracy"}
    assert "linear_probe" not in baselines and "nearest" in table and "probe" not in table


def test_stage2_vqa_scored_on_the_first_rows(workspace):
    flags = ["--question_column", "question", "--answer_column", "answer", "--max_samples", "6"]
    results = _evaluate(workspace, "stage2", *flags, "--max_new_tokens", "2")
    assert results["num_rows"] == 6 and results["num_questions"] == 5 and results["skipped_images"] == 1
    assert 0 <= results["vqa_accuracy"] <= 1 and "cider_d" not in results


def test_stage1_retrieval_recall(workspace):
    results = _evaluate(workspace, "stage1", "--itm_top_k", "3")
    assert results["task"] == "retrieval" and results["skipped_images"] == 1
    assert results["num_images"] == results["num_texts"] == 11  # one distinct caption per readable image
    assert all(0 <= results[key] <= 1 for key in RECALL_KEYS)
    single = _evaluate(workspace, "stage1", "--max_samples", "1")  # one image, one text: found at rank 1
    assert single["image_to_text_r1"] == single["text_to_image_r1"] == 1.0
    held_out = _evaluate(workspace, "stage1", split="")  # training's eval rows: a quarter of 12, drawn with the seed
    assert held_out["num_rows"] == 3 and "held-out 0.25, seed 42" in held_out["split"]


def test_references_group_rows_by_image_and_perfect_predictions_score_one():
    rows = [
        {"image": "a.png", "caption": "a red circle on a white background"},
        {"image": "a.png", "caption": "a round red shape on white"},
        {"image": {"bytes": None, "path": "b.png"}, "caption": "a blue square in the middle of the picture"},
        {"image": "b.png", "question": "What colour is it?", "answer": "blue"},
        {"image": "b.png", "question": "What colour is it?", "answer": "Blue."},
    ]
    grouped = group_rows(rows)
    assert grouped.captions == {
        "a.png": ["a red circle on a white background", "a round red shape on white"],
        "b.png": ["a blue square in the middle of the picture"],
    }
    assert grouped.answers == {("b.png", "What colour is it?"): ["blue", "Blue."]}
    captions = [refs[0] for refs in grouped.captions.values()]
    answers = grouped.answers["b.png", "What colour is it?"]
    perfect = generation_metrics(captions, list(grouped.captions.values()), answers, answers)
    assert perfect["bleu"] == pytest.approx(1.0) and perfect["vqa_accuracy"] == 1.0
    assert generation_metrics([], [], ["Two"], [["2", "2", "two", "3"]])["vqa_accuracy"] == 0.75
    wrong = generation_metrics(["nothing like it"] * 2, list(grouped.captions.values()), ["red"], [["blue"]])
    assert wrong["bleu"] == 0.0 and wrong["vqa_accuracy"] == 0.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "{root}/no-such-model"], "no-such-model' not found"),
        (["--model", "{root}/stage2", "--caption_column", "text"], r"column\(s\) \['text'\] not found"),
        (["--model", "{root}/stage2", "--split", "test"], "test"),
    ],
)
def test_bad_evaluate_input_is_a_clear_error(workspace, flags, message):
    flags = [flag.format(root=workspace) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *flags, "--dataset", "imagefolder", "--data_dir", str(workspace / "shapes")])
    error = exit_info.value.code  # a message as the exit status: printed to stderr, exit code 1
    assert isinstance(error, str) and error.startswith("error: ") and re.search(message, error)


def test_push_dry_run_prints_exactly_the_files(workspace, capsys, monkeypatch):
    monkeypatch.setattr(HfApi, "create_commit", _forbidden)
    monkeypatch.setattr(HfApi, "create_repo", _forbidden)
    folder = workspace / "stage2"
    capsys.readouterr()
    main(["push", str(folder), "someone/tiny", "--dry-run"])
    assert capsys.readouterr().out.splitlines() == files_to_upload(folder)
    main(["push", str(folder), "someone/tiny", "--dry-run", "--include-adapter"])
    listed = capsys.readouterr().out.splitlines()
    assert listed == files_to_upload(folder, include_adapter=True) and "adapter/adapter_config.json" in listed


def test_push_commits_those_files(workspace, capsys, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"] = (repo_id, list(operations), kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    folder = workspace / "stage2"
    main(["push", str(folder), "someone/tiny", "--private", "--revision", "dev", "--include-adapter"])
    assert calls["create_repo"] == ("someone/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    repo_id, operations, kwargs = calls["create_commit"]
    assert repo_id == "someone/tiny" and kwargs["revision"] == "dev"
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == files_to_upload(folder, include_adapter=True)
    assert capsys.readouterr().out.strip() == "https://huggingface.co/someone/tiny/commit/abc"


def test_push_without_the_needed_files_fails(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "create_commit", _forbidden)
    with pytest.raises(SystemExit, match="error: .*lacks README.md"):
        main(["push", str(workspace / "stage1"), "someone/tiny"])  # no model card
    with pytest.raises(SystemExit, match="error: .*adapter/"):
        main(["push", str(workspace / "stage1"), "someone/tiny", "--dry-run", "--include-adapter"])
    with pytest.raises(SystemExit, match="error: model folder .* not found"):
        main(["push", str(tmp_path / "missing"), "someone/tiny", "--dry-run"])


def _forbidden(*args, **kwargs):
    raise AssertionError("nothing may be uploaded")
