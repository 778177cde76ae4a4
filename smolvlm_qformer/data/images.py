"""The bad-image policy of training, caching, evaluation and the CLI: decode an image, or skip it and say why.

Decoding itself (`decode_image`: any mode upright RGB, decompression bombs refused) lives with the processor, which
a saved folder's remote code carries; what a batch does with an image that cannot be decoded is decided here.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from ..processing_smolvlm_qformer import decode_image

logger = logging.getLogger(__name__)


def decode_or_skip(value: Any, name: object) -> Image.Image | None:
    """The decoded image, or None (logged with `name` and the reason) when it cannot be read: truncated, corrupt,
    not an image, missing, or over the decompression-bomb limit. Callers count the Nones as skipped samples."""
    try:
        return decode_image(value)
    except Exception as error:  # noqa: BLE001 - any undecodable input is a counted skip, never a crash mid-epoch
        logger.warning("skipping image %s: %s", name, error)
        return None


__all__ = ["decode_image", "decode_or_skip"]
