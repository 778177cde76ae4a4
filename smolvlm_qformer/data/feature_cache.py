"""A cache of the frozen vision encoder's outputs, so neither stage re-runs it (nor decodes images) every epoch.

Features are kept per image, not per row: rows that share an image (several questions about it) read the same
features, and a row with several images reads one block per image. An image is known by its key (`image_key`: a
hash of its bytes, else its path).

Layout of a cache folder: `meta.json` (what was encoded and how), `keys.json` (the image keys, in storage order)
and, per shard of `shard_size` images, `shard_00000.valid.npy` (which images were readable) then `shard_00000.npy`
(float16 features, (n, tokens, width)). Each file is written to a temporary name and renamed, the features last:
a shard whose features file exists is complete, so a rebuild after a crash skips finished shards and never reads a
partial one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .conversations import row_images
from .images import decode_or_skip, image_key

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2


def _shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    return folder / f"shard_{shard:05d}.npy", folder / f"shard_{shard:05d}.valid.npy"


def _save_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _config_hash(vision_model: nn.Module) -> str:
    return hashlib.sha256(vision_model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


class FeatureCache:
    """Read side: memory-maps the shards and returns features for any sample indices."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.folder} is not a feature cache (no meta.json); build one first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            version = self.meta.get("format_version")
            raise ValueError(f"{self.folder} is a feature cache of format {version}, not {FORMAT_VERSION}: rebuild it")
        self.index = {key: i for i, key in enumerate(json.loads((self.folder / "keys.json").read_text()))}
        self.shard_size = self.meta["shard_size"]
        missing = [s for s in range(self.num_shards) if not _shard_paths(self.folder, s)[0].exists()]
        if missing:
            raise ValueError(f"feature cache {self.folder} is incomplete (shards {missing[:5]}...); rerun the build")
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_shards(self) -> int:
        return -(-self.meta["num_images"] // self.meta["shard_size"])

    def __len__(self) -> int:
        """The number of images cached."""
        return self.meta["num_images"]

    def lookup(self, images: list[Any]) -> list[int]:
        """The cache indices of undecoded images (`KeyError` naming the first one the cache does not hold)."""
        indices = []
        for image in images:
            key = image_key(image)
            if key not in self.index:
                raise KeyError(f"feature cache {self.folder} holds no image {key}")
            indices.append(self.index[key])
        return indices

    def features(self, images: list[Any]) -> torch.Tensor:
        """The stored features of undecoded images, (len(images), tokens, width)."""
        return self.get(self.lookup(list(images)))[0]

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._shards:
            features, valid = _shard_paths(self.folder, shard)
            self._shards[shard] = (np.load(features, mmap_mode="r"), np.load(valid))
        return self._shards[shard]

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (len(indices), tokens, width) as stored (float16) and a bool mask of the readable images."""
        features, valid = [], []
        for index in indices:
            shard_features, shard_valid = self._shard(index // self.shard_size)
            features.append(torch.from_numpy(np.array(shard_features[index % self.shard_size])))
            valid.append(bool(shard_valid[index % self.shard_size]))
        return torch.stack(features), torch.tensor(valid)


@torch.no_grad()
def build_feature_cache(
    vision_model: nn.Module,
    image_processor: Any,
    dataset: Any,
    folder: str | Path,
    batch_size: int = 32,
    shard_size: int = 1024,
    device: str | torch.device = "cpu",
) -> FeatureCache:
    """Runs `vision_model` once over every distinct image of a map-style `dataset` (rows with an "image" or an
    "images" list) and stores the last hidden states. Unreadable images are recorded as invalid (zeros) and
    counted. Resumable: finished shards are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources: dict[str, tuple[int, int]] = {}  # image key -> (row, position in the row) where it first appears
    for row_index in range(len(dataset)):
        for position, image in enumerate(row_images(dataset[row_index])):
            sources.setdefault(image_key(image), (row_index, position))
    keys = list(sources)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_images": len(keys),
        "keys_sha1": hashlib.sha1("\n".join(keys).encode()).hexdigest(),
        "shard_size": shard_size,
        "dtype": "float16",
        "vision_config_hash": _config_hash(vision_model),
        "dataset_fingerprint": getattr(getattr(dataset, "dataset", None), "_fingerprint", None),
    }
    meta_path = folder / "meta.json"
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            raise ValueError(f"{folder} holds a feature cache of other data or another encoder: {existing} != {meta}")
    else:
        for name, content in (("keys.json", keys), ("meta.json", meta)):  # meta last: it marks the keys complete
            tmp = folder / f"{name}.tmp"
            tmp.write_text(json.dumps(content, indent=2))
            os.replace(tmp, folder / name)

    vision_model = vision_model.to(device).eval()
    shape = _feature_shape(vision_model, image_processor, device)
    num_shards = -(-len(keys) // shard_size)
    done = [s for s in range(num_shards) if _shard_paths(folder, s)[0].exists()]
    skipped = 0
    # images/s and an ETA on stderr: at 224 px on a 2-core CPU a ViT-B shard of 1,024 images takes minutes
    progress = tqdm(
        total=len(keys),
        initial=sum(min(shard_size, len(keys) - s * shard_size) for s in done),
        unit="img",
        desc=f"feature cache {folder.name}",
        file=sys.stderr,
    )
    for shard in sorted(set(range(num_shards)) - set(done)):
        features_path, valid_path = _shard_paths(folder, shard)
        shard_keys = keys[shard * shard_size : (shard + 1) * shard_size]
        features, valid = [], []
        for start in range(0, len(shard_keys), batch_size):
            located = [sources[key] for key in shard_keys[start : start + batch_size]]
            images = [(row_images(dataset[row])[position], f"{position} of sample {row}") for row, position in located]
            batch_features, batch_valid = encode_image_batch(vision_model, image_processor, images, device, shape)
            features.append(batch_features)
            valid.extend(batch_valid)
            progress.update(len(images))
        skipped += len(valid) - sum(valid)
        _save_atomically(valid_path, np.array(valid, dtype=bool))
        _save_atomically(features_path, torch.cat(features).numpy())
        logger.info("feature cache %s: shard %d/%d done", folder, shard + 1, num_shards)
    progress.close()
    if skipped:
        logger.warning("feature cache %s: %d unreadable images recorded as invalid", folder, skipped)
    return FeatureCache(folder)


def _feature_shape(vision_model: nn.Module, image_processor: Any, device: str | torch.device) -> tuple[int, int]:
    """(tokens, width) of the encoder's output, from one blank image through the same preprocessing."""
    pixel_values = image_processor(Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"]
    return tuple(vision_model(pixel_values=pixel_values.to(device, vision_model.dtype)).last_hidden_state.shape[1:])


@torch.no_grad()
def encode_image_batch(
    vision_model: nn.Module,
    image_processor: Any,
    images: list[tuple[Any, str]],
    device: str | torch.device,
    shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, list[bool]]:
    """float16 last hidden states (len(images), tokens, width) of (undecoded image, name) pairs, zeros where an image
    is unreadable, and which were readable. `shape` (tokens, width) saves a blank image's pass when none is."""
    decoded = [decode_or_skip(image, name) for image, name in images]
    valid = [image is not None for image in decoded]
    images = [image for image in decoded if image is not None]
    if not images:
        shape = shape or _feature_shape(vision_model, image_processor, device)
        return torch.zeros(len(valid), *shape, dtype=torch.float16), valid
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    encoded = vision_model(pixel_values=pixel_values.to(device, vision_model.dtype)).last_hidden_state
    features = torch.zeros(len(valid), *encoded.shape[1:], dtype=torch.float16)
    features[torch.tensor(valid)] = encoded.to("cpu", torch.float16)
    return features, valid
