"""Evaluation: captioning (CIDEr-D, BLEU-4), VQA accuracy and image-text retrieval (R@K).

The metrics are `evaluate` modules in `metrics/`, loaded from the package with `load_metric` (no Hub access);
`evaluate_model` scores a saved model folder on a dataset split (`smolvlm-qformer evaluate`).
"""

from .metrics import METRICS, load_metric
from .ptb_tokenizer import ptb_tokenize
from .retrieval import RetrievalScores, evaluate_retrieval, retrieval_recall_at_k, retrieval_scores
from .run import EvaluateArguments, evaluate_model
from .vqa_normalization import normalize_vqa_answer

__all__ = [
    "METRICS",
    "EvaluateArguments",
    "RetrievalScores",
    "evaluate_model",
    "evaluate_retrieval",
    "load_metric",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "retrieval_recall_at_k",
    "retrieval_scores",
]
