"""VQA accuracy (Antol et al., 2015) with the official answer normalisation."""

from __future__ import annotations

import datasets
import evaluate

from smolvlm_qformer.evaluation.vqa_normalization import normalize_vqa_answer

_CITATION = """\
@inproceedings{antol2015vqa,
  title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""

_DESCRIPTION = """\
VQA accuracy: an answer is fully right when at least 3 annotators gave it, min(#matches / 3, 1), averaged over the
subsets that leave out one reference answer in turn (the 10-choose-9 subsets for VQA v2's 10 answers). With a single
reference answer it is exact match. Answers are compared after the official normalisation (lower-casing,
punctuation, number words to digits, articles dropped, contractions fixed: `normalize_vqa_answer`).

Unlike the official script, which normalises the prediction fully only when the references disagree and the
references only for punctuation, both sides are always fully normalised: identical on VQA v2, whose reference
answers are normalised already, and what makes free-form references (other datasets) comparable.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the predicted answers.
    references (`list[list[str]]` or `list[str]`): the annotators' answers to each question, or one answer each.
Returns:
    vqa_accuracy (`float`, 0 to 1): the mean over questions.
    scores (`list[float]`): one accuracy per question.
Examples:
    >>> vqa = load_metric("vqa_accuracy")
    >>> vqa.compute(predictions=["Two"], references=[["2", "2", "two", "3"]])
"""


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """Accuracy of one answer: exact match against a single reference, else the leave-one-out average."""
    prediction = normalize_vqa_answer(prediction)
    references = [normalize_vqa_answer(reference) for reference in references]
    if len(references) == 1:
        return float(prediction == references[0])
    matches = sum(reference == prediction for reference in references)
    # Leaving out a reference equal to the prediction leaves one match fewer among the others.
    return sum(min(1.0, (matches - (ref == prediction)) / 3) for ref in references) / len(references)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]] | list[str]) -> dict:
        references = [[refs] if isinstance(refs, str) else refs for refs in references]
        scores = [vqa_accuracy(prediction, refs) for prediction, refs in zip(predictions, references, strict=True)]
        return {"vqa_accuracy": sum(scores) / len(scores), "scores": scores}
