"""The project's metrics as `evaluate` modules, loaded from this folder: no Hub access needed.

`evaluate.load` on a local path copies the module script into the `evaluate` modules cache and imports it from
there; it never calls the network for a local path, so it works with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent
METRICS = ("bleu", "cider_d", "vqa_accuracy")


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of one of `METRICS` from its local module; `kwargs` go to `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
