"""Corpus BLEU-4 on COCO-tokenised captions, with multiple references per caption."""

from __future__ import annotations

import math
from collections import Counter

import datasets
import evaluate

from smolvlm_qformer.evaluation.ptb_tokenizer import ptb_tokenize

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}
"""

_DESCRIPTION = """\
Corpus BLEU (Papineni et al., 2002): the geometric mean of the modified n-gram precisions (n = 1..max_order, counts
clipped to each n-gram's largest count in any one reference, summed over the corpus), times the brevity penalty
exp(1 - r / c) when the candidates' total length c is below r, the sum over captions of the closest reference length
(the shorter on a tie). No smoothing: a precision of zero gives 0. Captions are tokenised as the COCO toolkit does
(see `smolvlm_qformer.evaluation.ptb_tokenizer`); BLEU is then what sacrebleu computes on those tokens.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the generated captions.
    references (`list[list[str]]`): the reference captions of each prediction.
    tokenize (`bool`, defaults to `True`): tokenise with the COCO-style PTB tokeniser; `False` splits on whitespace.
    max_order (`int`, defaults to 4): the longest n-gram.
Returns:
    bleu (`float`, 0 to 1), precisions (`list[float]`), brevity_penalty, length_ratio (c / r), translation_length
    (c) and reference_length (r).
Examples:
    >>> bleu = load_metric("bleu")
    >>> bleu.compute(predictions=["a cat on a mat"], references=[["a cat sits on a mat", "a cat on the mat"]])
"""


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(candidates: list[list[str]], references: list[list[list[str]]], max_order: int = 4) -> dict:
    """BLEU and its parts for tokenised candidates, each with its tokenised references."""
    matches, totals = [0] * max_order, [0] * max_order
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references, strict=True):
        candidate_length += len(candidate)
        reference_length += min((len(ref) for ref in refs), key=lambda length: (abs(length - len(candidate)), length))
        for n in range(1, max_order + 1):
            counts = ngrams(candidate, n)
            max_ref_counts = Counter()
            for ref in refs:
                max_ref_counts |= ngrams(ref, n)
            matches[n - 1] += sum((counts & max_ref_counts).values())
            totals[n - 1] += sum(counts.values())
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    if candidate_length == 0:
        brevity_penalty = 0.0
    elif candidate_length < reference_length:
        brevity_penalty = math.exp(1 - reference_length / candidate_length)
    else:
        brevity_penalty = 1.0
    bleu = brevity_penalty * math.exp(sum(map(math.log, precisions)) / max_order) if min(precisions) > 0 else 0.0
    return {
        "bleu": bleu,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "length_ratio": candidate_length / reference_length,
        "translation_length": candidate_length,
        "reference_length": reference_length,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://aclanthology.org/P02-1040/"],
        )

    def _compute(
        self, predictions: list[str], references: list[list[str]], tokenize: bool = True, max_order: int = 4
    ) -> dict:
        split = ptb_tokenize if tokenize else str.split
        return corpus_bleu(
            [split(p) for p in predictions], [[split(r) for r in refs] for refs in references], max_order
        )
