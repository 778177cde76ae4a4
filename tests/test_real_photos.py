"""examples/real_photos.py's photo-set builder on a fake Tux Paint stamps folder (no Debian package needed)."""

import json
import runpy
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from smolvlm_qformer.data import DataArguments, split_train_eval

EXAMPLE = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "real_photos.py"))


def _stamp(root: Path, relative: str, caption: str | None) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (20, 16), (200, 10, 10, 128)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"{caption}\nes.utf8=Traducción.\npt_BR.utf8=Tradução.\n", encoding="utf-8")


@pytest.fixture
def stamps(tmp_path) -> Path:
    """8 birds, 5 fruits, 2 tools photographed; drawings (symbols/, cartoon) and an uncaptioned photo to leave out."""
    root = tmp_path / "stamps"
    for i in range(8):
        _stamp(root, f"animals/birds/bird{i}.png", f"A bird number {i}.")
    for i in range(5):
        _stamp(root, f"food/fruit/fruit{i}.png", "A fruit." if i < 3 else f"A fruit, kind {i}.")
    for i in range(2):
        _stamp(root, f"household/tools/tool{i}.png", f"A tool {i}.")
    _stamp(root, "symbols/letters/a.png", "The letter a.")
    _stamp(root, "food/fruit/cartoon/apple.png", "A cartoon apple.")
    _stamp(root, "animals/birds/nameless.png", None)
    return root


def _arguments(tmp_path: Path, stamps: Path, **kwargs):
    return EXAMPLE["RealPhotosArguments"](output_dir=str(tmp_path / "out"), stamps_dir=str(stamps), **kwargs)


def _metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_stamp_captions_are_the_english_line(stamps):
    assert EXAMPLE["stamp_caption"](stamps / "animals/birds/bird3.txt") == "A bird number 3."
    photos = EXAMPLE["find_photos"](stamps)
    assert len(photos) == 15  # no drawing, no uncaptioned photo
    assert {folder for _, _, folder in photos} == {"birds", "fruit", "tools"}


def test_text_captions_hold_out_a_fraction_and_load_as_an_imagefolder(tmp_path, stamps):
    built = EXAMPLE["build_photo_set"](_arguments(tmp_path, stamps, test_fraction=0.2))
    assert built["train_images"] == 12 and built["test_images"] == 3  # round(0.2 * 15)
    train, test = (_metadata(Path(built["data_dir"]) / split) for split in ("train", "test"))
    assert {row["caption"] for row in train + test} >= {"A bird number 0.", "A fruit.", "A tool 1."}
    assert not {row["file_name"] for row in train} & {row["file_name"] for row in test}
    rows, held_out = split_train_eval(DataArguments(data_dir=built["data_dir"], eval_split="test"), seed=0)
    assert len(rows) == 12 and len(held_out) == 3
    assert Image.open(Path(built["data_dir"]) / "test" / test[0]["file_name"]).size == (20, 16)


def test_category_captions_are_class_like_with_every_class_in_both_splits(tmp_path, stamps):
    built = EXAMPLE["build_photo_set"](_arguments(tmp_path, stamps, captions="category", min_per_class=3))
    train, test = (_metadata(Path(built["data_dir"]) / split) for split in ("train", "test"))
    train_classes, test_classes = Counter(r["caption"] for r in train), Counter(r["caption"] for r in test)
    assert set(train_classes) == set(test_classes) == {"a photo of birds", "a photo of fruit"}  # 2 tools: too few
    assert min(train_classes.values()) >= 2 and test_classes == {"a photo of birds": 1, "a photo of fruit": 1}
    assert built["distinct_train_captions"] == built["train_captions_on_two_or_more"] == 2
    # a class cut below three photos by --num_images is dropped
    small = EXAMPLE["build_photo_set"](_arguments(tmp_path, stamps, captions="category", min_per_class=3, num_images=6))
    assert small["train_captions_on_two_or_more"] == small["distinct_train_captions"]
