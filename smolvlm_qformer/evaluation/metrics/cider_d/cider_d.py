"""CIDEr-D, as the COCO caption evaluation computes it (`pycocoevalcap.cider`, whose "CIDEr" is CIDEr-D)."""

from __future__ import annotations

import math
from collections import Counter

import datasets
import evaluate

from smolvlm_qformer.evaluation.ptb_tokenizer import ptb_tokenize

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_DESCRIPTION = """\
CIDEr-D: for each image, the TF-IDF weighted n-gram (n = 1..4) cosine similarity between the candidate caption and
each reference, with the candidate's counts clipped to the reference's, damped by a Gaussian length penalty
(sigma = 6), averaged over n and over the references, times 10. Document frequencies (the IDF) come from the
references of all the images scored together, so score a whole test split in one `compute`, one prediction per image.
Captions are tokenised as the COCO toolkit does (see `smolvlm_qformer.evaluation.ptb_tokenizer`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]`): the reference captions of each image.
    tokenize (`bool`, defaults to `True`): tokenise with the COCO-style PTB tokeniser; `False` splits on whitespace
        (for captions tokenised already).
    sigma (`float`, defaults to 6.0): width of the length penalty.
Returns:
    cider_d (`float`): the mean over images (COCO's scale: 1.0, not 100).
    scores (`list[float]`): one score per image.
Examples:
    >>> cider = load_metric("cider_d")
    >>> cider.compute(predictions=["a cat on a mat"], references=[["a cat sits on a mat", "a cat on the mat"]])
"""

MAX_ORDER = 4


def ngram_counts(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def tfidf(counts: Counter, document_frequency: Counter, log_num_images: float) -> tuple[list[dict], list[float]]:
    """Per n-gram order, the TF-IDF weights of the n-grams and the vector's norm (n-grams absent from every
    reference count as appearing in one)."""
    vectors = [{} for _ in range(MAX_ORDER)]
    for ngram, count in counts.items():
        vectors[len(ngram) - 1][ngram] = count * (log_num_images - math.log(max(1.0, document_frequency[ngram])))
    return vectors, [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]


def cider_d(candidates: list[list[str]], references: list[list[list[str]]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each tokenised candidate against its tokenised references."""
    reference_counts = [[ngram_counts(ref) for ref in refs] for refs in references]
    document_frequency = Counter(ngram for refs in reference_counts for ngram in set().union(*refs))
    log_num_images = math.log(len(references))
    scores = []
    for candidate, refs, counts in zip(candidates, references, reference_counts, strict=True):
        vec, norm = tfidf(ngram_counts(candidate), document_frequency, log_num_images)
        total = 0.0
        for ref, ref_counts in zip(refs, counts, strict=True):
            ref_vec, ref_norm = tfidf(ref_counts, document_frequency, log_num_images)
            penalty = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(MAX_ORDER):
                if norm[n] == 0 or ref_norm[n] == 0:
                    continue
                clipped = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                total += clipped / (norm[n] * ref_norm[n]) * penalty
        scores.append(10.0 * total / MAX_ORDER / len(refs))
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CiderD(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://arxiv.org/abs/1411.5726", "https://github.com/tylin/coco-caption"],
        )

    def _compute(
        self, predictions: list[str], references: list[list[str]], tokenize: bool = True, sigma: float = 6.0
    ) -> dict:
        split = ptb_tokenize if tokenize else str.split
        scores = cider_d([split(p) for p in predictions], [[split(r) for r in refs] for refs in references], sigma)
        return {"cider_d": sum(scores) / len(scores), "scores": scores}
