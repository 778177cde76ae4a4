"""The local tasks' functions (lmms-eval imports this file through `--include_path`): the documents are rows of an
image folder that tests/test_lmms_eval.py writes; VQA answers are scored by lmms-eval's own VQAv2 code."""

from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def vqa_process_results(doc, results):
    """lmms-eval's VQAv2 accuracy, on annotators' answers stored as a list of strings (numbered, as VQAv2's are: its
    leave-one-out drops every answer equal to the one left out, so equal answers must differ by their id)."""
    answers = [{"answer": answer, "answer_id": index} for index, answer in enumerate(doc["answers"], 1)]
    return vqav2_process_results_val({**doc, "answers": answers}, results)
