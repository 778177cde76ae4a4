"""Evaluation: captioning (CIDEr-D, BLEU-4), VQA accuracy and image-text retrieval (R@K).

The metrics are `evaluate` modules in `metrics/`, loaded from the package with `load_metric` (no Hub access).
"""

from .metrics import METRICS, load_metric
from .ptb_tokenizer import ptb_tokenize
from .retrieval import RetrievalScores, evaluate_retrieval, itm_scores, retrieval_recall_at_k, retrieval_scores
from .vqa_normalization import normalize_vqa_answer

__all__ = [
    "METRICS",
    "RetrievalScores",
    "evaluate_retrieval",
    "itm_scores",
    "load_metric",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "retrieval_recall_at_k",
    "retrieval_scores",
]
