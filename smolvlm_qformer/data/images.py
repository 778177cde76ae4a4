"""Turning whatever a dataset row holds into an RGB image, or a clear exception."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ..processing_smolvlm_qformer import to_rgb


def decode_image(value: Any) -> Image.Image:
    """An RGB PIL image from what a dataset row holds: a PIL image, `{"bytes", "path"}`, raw bytes or a path.
    Raises (`OSError`, `ValueError`, ...) when the data is not a readable image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        value = Image.open(value)
    if not isinstance(value, Image.Image):
        raise ValueError(f"not an image: {type(value).__name__}")
    value.load()
    return to_rgb(ImageOps.exif_transpose(value))
