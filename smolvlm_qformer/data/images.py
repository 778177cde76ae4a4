"""The bad-image policy of training, caching, evaluation and the CLI: decode an image, or skip it and say why; and
what identifies an undecoded image across rows.

Decoding itself (`decode_image`: any mode upright RGB, decompression bombs refused) lives with the processor, which
a saved folder's remote code carries; what a batch does with an image that cannot be decoded is decided here.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
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


def image_key(value: Any) -> str:
    """What identifies an undecoded image across rows (the feature cache's key, evaluation's grouping): a hash of its
    bytes (a parquet or Arrow row's), else its path (an image folder's), else a hash of its pixels and shape (an
    in-memory image or array)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (str, Path)):
        data, path = None, str(value)
    elif isinstance(value, (bytes, bytearray)):
        data, path = value, None
    else:
        array = np.ascontiguousarray(np.asarray(value))
        data, path = array.tobytes() + repr((array.shape, str(array.dtype))).encode(), None
    return f"sha1:{hashlib.sha1(data).hexdigest()}" if data else path


__all__ = ["decode_image", "decode_or_skip", "image_key"]
