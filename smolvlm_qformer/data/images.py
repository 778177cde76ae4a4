"""Turning whatever a dataset row holds into an RGB image, or a clear exception."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from ..processing_smolvlm_qformer import to_rgb_array


def decode_image(value: Any) -> Image.Image:
    """An upright RGB PIL image (see `to_rgb_array`) from what a dataset row holds: a PIL image, `{"bytes", "path"}`,
    raw bytes or a path. Raises (`OSError`, `ValueError`, ...) when the data is not a readable image, including an
    image over PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, which PIL alone enforces only at twice
    the limit): decoding it could exhaust memory."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return Image.fromarray(to_rgb_array(value))
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    elif not isinstance(value, (str, Path)):
        raise ValueError(f"not an image: {type(value).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(value) as image:  # closed here: an animated file would otherwise keep its handle open
            image.load()
            return Image.fromarray(to_rgb_array(image))
