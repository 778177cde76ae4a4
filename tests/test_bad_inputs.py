"""The bad-input contract, on a corpus of odd and broken files (`testing_utils.write_odd_images` / `write_bad_images`):

- valid-but-odd images decode to the pixels a viewer shows (CMYK, alpha, palette, 16-bit, EXIF rotation, GIF frame);
- in training (both stages, from images or the feature cache) unusable rows are skipped and counted, never fatal;
- the processor and the `caption` / `ask` commands reject bad input with an error naming it;
- over-long captions, answers and questions are truncated to their configured lengths.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, UnidentifiedImageError

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.cli import main
from smolvlm_qformer.data import ChatCollator, DataArguments, RetrievalCollator, decode_image
from smolvlm_qformer.testing_utils import (
    make_shapes_dataset,
    save_tiny_backbones,
    tiny_config,
    write_bad_images,
    write_odd_images,
)
from smolvlm_qformer.training import ModelArguments, SmolVLMTrainingArguments, train_qformer, train_vlm

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
LONG_TEXT = "a red circle next to a blue square " * 300  # ~10,000 characters


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_odd_images(folder / "odd"), write_bad_images(folder / "bad")


def _close(pixel, expected, tolerance=3) -> bool:
    return bool(np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected)).max() <= tolerance)


def test_odd_images_decode_to_what_a_viewer_shows(corpus):
    decoded = {name: np.asarray(decode_image(path)) for name, path in corpus[0].items()}
    assert all(image.dtype == np.uint8 and image.shape[-1] == 3 for image in decoded.values())
    cmyk = decoded["cmyk.jpg"]
    assert cmyk.shape == (20, 40, 3) and _close(cmyk.mean(axis=(0, 1)), RED)
    for name in ("rgba.png", "palette_transparent.png"):  # transparent half composited onto white
        left, right = decoded[name][:, :20], decoded[name][:, 20:]
        expected_left, expected_right = (RED, WHITE) if name == "rgba.png" else (WHITE, BLUE)
        assert _close(left.mean(axis=(0, 1)), expected_left) and _close(right.mean(axis=(0, 1)), expected_right)
    gray = decoded["gray16.png"][..., 0].astype(float)  # a 0..65535 ramp: 0..255, not clipped to white
    expected_gray = np.linspace(0, 255, gray.size).reshape(gray.shape)
    assert np.abs(gray - expected_gray).max() <= 1 and gray.min() == 0 and gray.max() == 255
    assert (decoded["bilevel.png"] == 255).all()
    assert decoded["one_pixel.png"].tolist() == [[[10, 20, 30]]]
    assert decoded["large.jpg"].shape == (2000, 3000, 3)
    rotated = decoded["exif_rotated.jpg"]  # stored 40 x 20, red left; orientation 6 turns it clockwise
    assert rotated.shape == (40, 20, 3)
    assert _close(rotated[:16].mean(axis=(0, 1)), RED, 6) and _close(rotated[24:].mean(axis=(0, 1)), BLUE, 6)
    assert _close(decoded["animated.gif"].mean(axis=(0, 1)), (0, 128, 0))  # the first frame (green)


BAD_IMAGE_ERRORS = {
    "truncated.jpg": (OSError, "truncated"),
    "truncated.png": (OSError, "truncated"),
    "corrupt_header.jpg": (UnidentifiedImageError, "cannot identify"),
    "corrupt_data.png": (OSError, "broken data stream"),
    "zero_bytes.jpg": (UnidentifiedImageError, "cannot identify"),
    "text.jpg": (UnidentifiedImageError, "cannot identify"),
    "not_found.png": (UnidentifiedImageError, "cannot identify"),
    "bomb.png": (Image.DecompressionBombError, "900000000 pixels"),
    "missing.png": (FileNotFoundError, "No such file"),
}


def test_bad_images_raise_and_bombs_are_refused(corpus, monkeypatch):
    assert set(corpus[1]) == set(BAD_IMAGE_ERRORS)
    for name, (error, message) in BAD_IMAGE_ERRORS.items():
        with pytest.raises(error, match=message):
            decode_image(str(corpus[1][name]))
    # between the limit and twice it, PIL only warns; decoding refuses it too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20 * 20)  # cmyk.jpg has 40 x 20
    with pytest.raises(Image.DecompressionBombWarning):
        decode_image(str(corpus[0]["cmyk.jpg"]))


def test_processor_takes_odd_pil_images_as_decoded(processor, corpus):
    for name, path in corpus[0].items():
        with Image.open(path) as image:
            direct = processor(images=image, text="What colour?").pixel_values
        expected = processor(images=decode_image(path), text="What colour?").pixel_values
        torch.testing.assert_close(direct, expected, msg=name)
    gray = processor(images=Image.open(corpus[0]["gray16.png"]), text="x").pixel_values
    assert -0.9 < gray.mean() < 0.1 and gray.min() < -0.9 and gray.max() > 0.9  # not all white


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((5, 5, 2), dtype=np.uint8), r"\(5, 5, 2\)"),
        (np.zeros((2, 4, 4, 3, 1), dtype=np.uint8), "an image array must be"),
        ("no-such-photo.jpg", "No such file"),  # paths are read (and URLs fetched), like ViT's own processor
        (7, "got int"),
    ],
)
def test_processor_names_an_unusable_image(processor, image, message):
    with pytest.raises(ValueError, match=f"image 1 .*cannot be used: .*{message}"):
        processor(images=[np.zeros((8, 8, 3), dtype=np.uint8), image], text=["a", "b"])


def test_processor_names_a_truncated_file(processor, corpus):
    image = Image.open(corpus[1]["truncated.png"])  # opens lazily; the pixels turn out to be missing
    with pytest.raises(ValueError, match="truncated.png.*truncated"):
        processor(images=image, text="What colour?")


def _pil_images(draw):
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode in ("I", "F"):
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32)).convert(mode)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def _array_images(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]))
    height, width, channels = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 3, 4]))
    layout = draw(st.sampled_from(["hw", "hwc", "chw"]))
    shape = {"hw": (height, width), "hwc": (height, width, channels), "chw": (channels, height, width)}[layout]
    if dtype in (np.float32, np.float64):
        elements = st.floats(0, draw(st.sampled_from([1.0, 255.0])), width=32)
    elif dtype == np.bool_:
        elements = st.booleans()
    else:
        elements = st.integers(0, np.iinfo(dtype).max if dtype != np.int32 else 65535)
    array = draw(arrays(dtype, shape, elements=elements))
    return torch.from_numpy(array) if draw(st.booleans()) and dtype != np.uint16 else array


@st.composite
def images_and_texts(draw):
    count = draw(st.integers(1, 3))
    images = [_pil_images(draw) if draw(st.booleans()) else _array_images(draw) for _ in range(count)]
    texts = [draw(st.text(max_size=300).filter(lambda t: "<image>" not in t)) for _ in range(count)]
    return images, texts


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(images_and_texts())
def test_fuzzed_images_and_texts_give_well_formed_inputs(processor, case):
    images, texts = case
    batch = processor(images=images, text=texts)
    assert batch.pixel_values.shape == (len(images), 3, 32, 32)
    assert torch.isfinite(batch.pixel_values).all() and batch.pixel_values.abs().max() <= 1.0 + 1e-6
    image_tokens = (batch.input_ids == processor.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [processor.num_query_tokens] * len(images)


# ---------------------------------------------------------------------------------------------------------------
# Truncation of over-long text
# ---------------------------------------------------------------------------------------------------------------


def test_long_captions_answers_and_questions_are_truncated(processor):
    image = Image.new("RGB", (8, 8))
    retrieval = RetrievalCollator(processor, max_caption_tokens=32)([{"image": image, "caption": LONG_TEXT}])
    assert retrieval["input_ids"].shape == (1, 32)
    collator = ChatCollator(processor, max_answer_tokens=64, max_question_tokens=128)
    short = collator([{"image": image, "question": "What?", "answer": "red", "sample_index": 0}])
    long = collator([{"image": image, "question": LONG_TEXT, "answer": LONG_TEXT, "sample_index": 0}])
    assert int((long["labels"] != -100).sum()) == 64 + 1  # the answer's first 64 tokens and <|im_end|>
    prompt_growth = int(_unlabelled(long) - _unlabelled(short))
    question_tokens = len(processor.tokenizer("What?", add_special_tokens=False).input_ids)
    assert 0 <= 128 - question_tokens - prompt_growth <= 2  # a cut inside a word is cut a token or two shorter


def _unlabelled(batch) -> int:
    """Prompt tokens: unlabelled and not padding."""
    return int(((batch["labels"] == -100) & batch["attention_mask"].bool()).sum())


# ---------------------------------------------------------------------------------------------------------------
# Training on messy data: both stages, from images and from the feature cache
# ---------------------------------------------------------------------------------------------------------------

EMPTY_TEXTS = ["", "  \n\t", None]  # None: the row has no caption / answer at all


@pytest.fixture(scope="module")
def messy(tmp_path_factory, corpus, processor):
    """An imagefolder of 8 good shapes, the odd and bad images, and rows with empty, missing, 10,000-character and
    emoji captions; plus tiny backbones. Returns (folder, backbones, number of bad images)."""
    root = tmp_path_factory.mktemp("messy")
    folder = make_shapes_dataset(root / "data", 8)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for path in [*corpus[0].values(), *corpus[1].values()]:
        if path.exists():
            shutil.copy(path, folder / path.name)
        rows.append({"file_name": path.name, "caption": "a red square", "question": "Colour?", "answer": "red"})
    texts = [*EMPTY_TEXTS, LONG_TEXT, "a red circle 🔴🙂 ✓"]
    for i, text in enumerate(texts):
        shutil.copy(folder / "00000.png", folder / f"text_{i}.png")
        row = {"file_name": f"text_{i}.png", "question": LONG_TEXT if text == LONG_TEXT else "What is it?"}
        if text is not None:
            row.update(caption=text, answer=text)
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return folder, save_tiny_backbones(root / "backbones", processor), len(corpus[1])


def _messy_run(messy, tmp_path, stage, feature_cache=None):
    folder, backbones, _ = messy
    columns = {} if stage == 1 else {"caption_column": None, "question_column": "question", "answer_column": "answer"}
    # the long question and answer are cut to lengths that fit the tiny LM's 256-token context
    lengths = {"max_question_tokens": 96, "max_answer_tokens": 64}
    data_args = DataArguments(data_dir=str(folder), eval_fraction=0, feature_cache=feature_cache, **columns, **lengths)
    model_args = ModelArguments(
        vision_model=backbones["vision"],
        qformer_model=backbones["qformer"],
        language_model=backbones["language_model"],
        num_query_tokens=4,
        lora_r=4,
    )
    training_args = SmolVLMTrainingArguments(
        output_dir=str(tmp_path / f"stage{stage}"),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return (train_qformer if stage == 1 else train_vlm)(model_args, data_args, training_args)


@pytest.mark.parametrize("cached", [False, True], ids=["images", "feature-cache"])
def test_training_skips_and_counts_bad_rows_in_both_stages(messy, tmp_path, cached):
    folder, backbones, num_bad = messy
    feature_cache = None
    if cached:
        feature_cache = str(tmp_path / "cache")
        flags = ["--vision_model", backbones["vision"], "--data_dir", str(folder), "--eval_fraction", "0"]
        main(["cache-features", *flags, "--output_dir", feature_cache, "--shard_size", "8"])
    for stage in (1, 2):
        metrics = _messy_run(messy, tmp_path, stage, feature_cache)
        assert metrics["train_skipped_samples"] == num_bad, stage
        assert metrics["train_empty_text_rows"] == len(EMPTY_TEXTS), stage
        assert np.isfinite(metrics["train_loss"]), stage


# ---------------------------------------------------------------------------------------------------------------
# Inference commands
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("model")
    SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_caption_and_ask_take_odd_images_and_skip_bad_ones_by_name(tiny_model_folder, corpus, capsys):
    """Odd images are captioned; each bad one is reported by name and skipped while the rest are still answered,
    and the command fails at the end."""
    odd = [str(path) for path in corpus[0].values()]
    main(["caption", "--model", str(tiny_model_folder), "--max-new-tokens", "2", *odd])
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == odd
    bad = [str(path) for path in corpus[1].values()]
    mixed = [odd[0], *bad, odd[1]]
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", "--model", str(tiny_model_folder), "--batch-size", "3", "--max-new-tokens", "2", *mixed])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [odd[0], odd[1]]
    assert f"{len(bad)} of {len(mixed)} images could not be read" in captured.err
    assert all(name in captured.err for name in corpus[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--model", str(tiny_model_folder), bad[0], "What colour?"])
    assert exit_info.value.code == 1 and Path(bad[0]).name in capsys.readouterr().err


def test_a_question_longer_than_the_context_is_refused(tiny_model_folder, corpus):
    with pytest.raises(SystemExit, match="exceeds the model's context of 256 tokens"):
        main(["ask", "--model", str(tiny_model_folder), str(corpus[0]["cmyk.jpg"]), LONG_TEXT])


def test_the_command_exits_non_zero_with_the_name_on_stderr(tiny_model_folder, corpus):
    bad = str(corpus[1]["truncated.jpg"])
    command = [sys.executable, "-m", "smolvlm_qformer.cli", "caption", "--model", str(tiny_model_folder), bad]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "truncated.jpg" in result.stderr and result.stdout == ""
