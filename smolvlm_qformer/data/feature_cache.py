"""A cache of the frozen vision encoder's outputs, so neither stage re-runs it (nor decodes images) every epoch.

Layout of a cache folder: `meta.json` (what was encoded and how) and, per shard of `shard_size` samples,
`shard_00000.valid.npy` (which samples had a readable image) then `shard_00000.npy` (float16 features,
(n, tokens, width)). Each file is written to a temporary name and renamed, the features last: a shard whose
features file exists is complete, so a rebuild after a crash skips finished shards and never reads a partial one.
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

from .images import decode_or_skip

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


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
        self.shard_size = self.meta["shard_size"]
        missing = [s for s in range(self.num_shards) if not _shard_paths(self.folder, s)[0].exists()]
        if missing:
            raise ValueError(f"feature cache {self.folder} is incomplete (shards {missing[:5]}...); rerun the build")
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_shards(self) -> int:
        return -(-self.meta["num_samples"] // self.meta["shard_size"])

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._shards:
            features, valid = _shard_paths(self.folder, shard)
            self._shards[shard] = (np.load(features, mmap_mode="r"), np.load(valid))
        return self._shards[shard]

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (len(indices), tokens, width) as stored (float16) and a bool mask of samples with an image."""
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
    """Runs `vision_model` once over every image of a map-style `dataset` (rows with an "image") and stores the
    last hidden states. Unreadable images are recorded as invalid (zeros) and counted. Resumable: finished shards
    are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_samples": len(dataset),
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
        tmp = meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)

    vision_model = vision_model.to(device).eval()
    shape = _feature_shape(vision_model, image_processor, device)
    num_shards = -(-len(dataset) // shard_size)
    done = [s for s in range(num_shards) if _shard_paths(folder, s)[0].exists()]
    skipped = 0
    # images/s and an ETA on stderr: at 224 px on a 2-core CPU a ViT-B shard of 1,024 images takes minutes
    progress = tqdm(
        total=len(dataset),
        initial=sum(min(shard_size, len(dataset) - s * shard_size) for s in done),
        unit="img",
        desc=f"feature cache {folder.name}",
        file=sys.stderr,
    )
    for shard in sorted(set(range(num_shards)) - set(done)):
        features_path, valid_path = _shard_paths(folder, shard)
        indices = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
        features, valid = [], []
        for start in range(0, len(indices), batch_size):
            rows = [dataset[i] for i in indices[start : start + batch_size]]
            batch_features, batch_valid = _encode_batch(vision_model, image_processor, rows, shape, device)
            features.append(batch_features)
            valid.extend(batch_valid)
            progress.update(len(rows))
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


def _encode_batch(
    vision_model: nn.Module,
    image_processor: Any,
    rows: list[dict[str, Any]],
    shape: tuple[int, int],
    device: str | torch.device,
) -> tuple[torch.Tensor, list[bool]]:
    """float16 features (len(rows), *shape), zeros where the image is unreadable, and which rows were readable."""
    decoded = [decode_or_skip(row["image"], f"of sample {row.get('sample_index')}") for row in rows]
    images = [image for image in decoded if image is not None]
    valid = [image is not None for image in decoded]
    features = torch.zeros(len(rows), *shape, dtype=torch.float16)
    if images:
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        encoded = vision_model(pixel_values=pixel_values.to(device, vision_model.dtype)).last_hidden_state
        features[torch.tensor(valid)] = encoded.to("cpu", torch.float16)
    return features, valid
