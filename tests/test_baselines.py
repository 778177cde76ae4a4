"""The frozen-feature baselines (`evaluation.baselines`) against direct computations, and in `evaluate`'s output."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerForImageTextRetrieval
from smolvlm_qformer.cli import main
from smolvlm_qformer.data import FeatureCache, image_key
from smolvlm_qformer.evaluation.baselines import (
    exact_match_accuracy,
    is_class_like,
    linear_probe_predictions,
    nearest_neighbours,
    nearest_targets,
    nearest_text_scores,
    pool_features,
    pooled_image_features,
)
from smolvlm_qformer.evaluation.run import format_results, generation_metrics
from smolvlm_qformer.processing_smolvlm_qformer import SmolVLMQFormerProcessor
from smolvlm_qformer.testing_utils import make_shapes_dataset, tiny_config


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_pooled_features_are_the_first_token_and_the_mean_of_the_others():
    hidden = torch.randn(3, 5, 4)
    expected = np.concatenate([hidden[:, 0].numpy(), hidden[:, 1:].numpy().mean(axis=1)], axis=1)
    np.testing.assert_allclose(pool_features(hidden).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_nearest_neighbours_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(20, 6)), rng.normal(size=(30, 6))
    exclude = rng.random((20, 30)) < 0.5
    exclude[3] = True  # a query with no candidate left
    index, similarity = nearest_neighbours(torch.tensor(queries), torch.tensor(keys), torch.tensor(exclude))
    cosine = np.where(exclude, -np.inf, _cosine(queries, keys))
    expected = np.where(np.isfinite(cosine.max(axis=1)), cosine.argmax(axis=1), -1)
    assert index.tolist() == expected.tolist() and index[3] == -1
    np.testing.assert_allclose(similarity.numpy()[expected >= 0], cosine.max(axis=1)[expected >= 0], rtol=1e-5)


def test_nearest_targets_come_from_the_same_question_and_never_the_own_image():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(12, 4))
    train_keys = [f"t{i // 2}" for i in range(12)]  # two rows per image (two questions about it)
    groups = ["colour?", "shape?"] * 6
    targets = [f"answer {i}" for i in range(12)]
    query_features = np.concatenate([train[:4], rng.normal(size=(3, 4))])  # four are training images themselves
    query_keys = train_keys[:4] + ["q0", "q1", "q2"]
    query_groups = groups[:4] + ["colour?", "shape?", "size?"]  # nobody was asked "size?"
    found = nearest_targets(
        torch.tensor(query_features), query_keys, query_groups, torch.tensor(train), train_keys, groups, targets
    )
    cosine = _cosine(query_features, train)
    for q, target in enumerate(found):
        allowed = [i for i in range(12) if groups[i] == query_groups[q] and train_keys[i] != query_keys[q]]
        expected = targets[max(allowed, key=lambda i: cosine[q, i])] if allowed else None
        assert target == expected
    assert found[-1] is None and found[0] != targets[0]


def test_nearest_text_scores_take_each_texts_nearest_holder():
    rng = np.random.default_rng(2)
    train, queries = rng.normal(size=(8, 5)), rng.normal(size=(4, 5))
    train_keys, query_keys = [f"t{i}" for i in range(8)], ["q0", "t3", "q2", "q3"]
    train_texts = [["cat"], ["dog"], ["cat", "pet"], ["dog"], ["bird"], ["cat"], ["dog"], ["bird"]]
    texts = ["cat", "dog", "bird", "pet", "fish"]
    scores = nearest_text_scores(torch.tensor(queries), query_keys, torch.tensor(train), train_keys, train_texts, texts)
    cosine = _cosine(queries, train)
    for q, key in enumerate(query_keys):
        for t, text in enumerate(texts):
            holders = [i for i in range(8) if text in train_texts[i] and train_keys[i] != key]
            expected = max((cosine[q, i] for i in holders), default=-np.inf)
            assert scores[q, t].item() == pytest.approx(expected, rel=1e-5)
    assert scores[:, 4].isneginf().all()


def test_class_like_means_every_caption_on_two_images_or_more():
    assert is_class_like([["a cat"], ["a dog"], ["a cat"], ["a dog"]])
    assert not is_class_like([["a cat"], ["a dog"], ["a cat"]])  # one dog
    assert not is_class_like([["a cat"], ["a cat"]])  # one class
    assert not is_class_like([["a cat", "a kitten"], ["a cat"], ["a dog"], ["a dog"]])  # several captions per image
    assert not is_class_like([])


def _clusters(rng: np.random.Generator, per_class: int, classes: int, dim: int = 16, spread: float = 0.3):
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.repeat(np.arange(classes), per_class)
    return torch.tensor(centres[labels] + spread * rng.normal(size=(len(labels), dim)), dtype=torch.float32), labels


def test_linear_probe_separates_separable_classes_and_not_shuffled_labels():
    rng = np.random.default_rng(3)
    names = ["a cat", "a dog", "a bird", "a fish"]
    train, train_labels = _clusters(rng, 30, 4)
    test, test_labels = _clusters(np.random.default_rng(3), 30, 4)  # the same centres, other noise draws
    test = test + 0.3 * torch.tensor(np.random.default_rng(4).normal(size=test.shape), dtype=torch.float32)
    references = [[names[label]] for label in test_labels]
    predictions = linear_probe_predictions(train, [names[label] for label in train_labels], test)
    assert exact_match_accuracy(predictions, references) == 1.0

    noise = torch.tensor(np.random.default_rng(5).normal(size=(400, 16)), dtype=torch.float32)
    labels = np.random.default_rng(6).integers(0, 4, size=400)
    shuffled = linear_probe_predictions(noise[:300], [names[label] for label in labels[:300]], noise[300:])
    chance = exact_match_accuracy(shuffled, [[names[label]] for label in labels[300:]])
    assert 0.1 <= chance <= 0.4  # 4 classes: about 0.25


def test_exact_match_accuracy_normalises_like_vqa():
    assert exact_match_accuracy(["A dog.", "a Cat", "two birds"], [["dog"], ["a cat", "kitten"], ["2 birds!"]]) == 1
    assert exact_match_accuracy(["a dog", "a cat"], [["a cat"], ["a cat"]]) == 0.5


def test_format_results_puts_baselines_beside_the_model():
    results = {
        "model": "out/vlm",
        "split": "photos[test]",
        "task": "generation",
        "cider_d": 0.5,
        "caption_accuracy": 0.75,
        "num_captioned_images": 8,
        "baselines": {
            "nearest_neighbour": {"cider_d": 0.25, "caption_accuracy": 0.625},
            "linear_probe": {"caption_accuracy": 0.875},
            "num_train_images": 40,
        },
    }
    lines = format_results(results).splitlines()
    assert lines[1].split() == ["model", "nearest", "probe"]
    assert lines[2].split() == ["cider_d", "0.5000", "0.2500"]
    assert lines[3].split() == ["caption_accuracy", "0.7500", "0.6250", "0.8750"]
    assert ["baseline_num_train_images", "40"] in [line.split() for line in lines]
    assert "nearest training image" in lines[-2] and lines[-1].startswith("probe: a linear probe")


@pytest.fixture(scope="module")
def class_like(tmp_path_factory, processor) -> Path:
    """A tiny stage-1 and stage-2 model, 24 shape images (12 captions, each on two images), and their feature cache
    (of the stage-1 model's vision encoder)."""
    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    SmolVLMQFormerForImageTextRetrieval(tiny_config(processor)).save_pretrained(root / "stage1")
    SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).save_pretrained(root / "stage2")
    for folder in ("stage1", "stage2"):
        processor.save_pretrained(root / folder)
    make_shapes_dataset(root / "shapes", 24)
    data = ["--dataset", "imagefolder", "--data_dir", str(root / "shapes"), "--eval_fraction", "0"]
    main(["cache-features", "--stage1_model", str(root / "stage1"), *data, "--output_dir", str(root / "cache")])
    return root


def _evaluate(root: Path, model: str, *flags: str) -> dict:
    output = root / f"results-{model}-{len(flags)}.json"
    data = ["--dataset", "imagefolder", "--data_dir", str(root / "shapes"), "--eval_fraction", "0"]
    main(["evaluate", "--model", str(root / model), *data, "--split", "train", "--output", str(output), *flags])
    return json.loads(output.read_text())


def _rows(root: Path) -> tuple[list[str], list[str]]:
    """The image paths and captions of the shapes folder."""
    rows = [json.loads(line) for line in (root / "shapes" / "metadata.jsonl").read_text().splitlines()]
    return [str(root / "shapes" / row["file_name"]) for row in rows], [row["caption"] for row in rows]


def _leave_one_out_captions(hidden: np.ndarray, captions: list[str]) -> list[str]:
    """Each image's nearest other image's caption, by brute force over pooled features ([CLS] + mean of the rest)."""
    pooled = np.concatenate([hidden[:, 0], hidden[:, 1:].mean(axis=1)], axis=1)
    cosine = _cosine(pooled, pooled)
    np.fill_diagonal(cosine, -np.inf)
    return [captions[j] for j in cosine.argmax(axis=1)]


def _vision(root: Path) -> tuple[torch.nn.Module, object]:
    model = SmolVLMQFormerForImageTextRetrieval.from_pretrained(root / "stage1")
    return model.vision_model.eval(), SmolVLMQFormerProcessor.from_pretrained(root / "stage1").image_processor


def test_evaluate_baselines_equal_a_direct_computation(class_like, capsys):
    paths, captions = _rows(class_like)
    cache = FeatureCache(class_like / "cache" / "train")
    cached = cache.get(cache.lookup(paths))[0].float().numpy()
    vision_model, image_processor = _vision(class_like)
    with torch.no_grad():
        pixels = image_processor([Image.open(path).convert("RGB") for path in paths], return_tensors="pt")
        encoded = vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state.numpy()

    for flags, hidden in ((["--feature_cache", str(class_like / "cache")], cached), ([], encoded)):
        results = _evaluate(class_like, "stage1", *flags)
        baselines = results["baselines"]
        assert baselines["num_train_images"] == 24
        assert set(baselines) == {"nearest_neighbour", "linear_probe", "num_train_images"}
        neighbours = _leave_one_out_captions(hidden, captions)
        hits = [neighbour == caption for neighbour, caption in zip(neighbours, captions, strict=True)]
        # image->text R@1 of the nearest-text scores: the own caption comes first iff the nearest image holds it
        assert baselines["nearest_neighbour"]["image_to_text_r1"] == pytest.approx(np.mean(hits))
        assert 0 <= baselines["linear_probe"]["caption_accuracy"] <= 1
        table = capsys.readouterr().out
        assert "nearest" in table and "probe" in table and "image_to_text_r1" in table

    # stage 2: the nearest captions scored with the model's own metrics
    results = _evaluate(class_like, "stage2", "--feature_cache", str(class_like / "cache"), "--max_new_tokens", "2")
    nearest = results["baselines"]["nearest_neighbour"]
    expected = generation_metrics(_leave_one_out_captions(cached, captions), [[c] for c in captions], [], [])
    assert nearest == pytest.approx(expected) and set(expected) == {"cider_d", "bleu", "caption_accuracy"}
    assert "caption_accuracy" in results and "caption_accuracy" in results["baselines"]["linear_probe"]


def test_pooled_features_from_the_cache_equal_the_encoders(class_like):
    paths, _ = _rows(class_like)
    images = [(image_key(path), path) for path in paths[:5]]
    cached, cached_valid = pooled_image_features(images, [FeatureCache(class_like / "cache" / "train")])
    unreadable = [("missing", str(class_like / "missing.png"))]
    encoded, encoded_valid = pooled_image_features(images + unreadable, (), lambda: _vision(class_like))
    assert cached_valid.tolist() == [True] * 5 and encoded_valid.tolist() == [True] * 5 + [False]
    torch.testing.assert_close(cached, encoded[:5], atol=2e-2, rtol=1e-2)  # the cache stores float16
    assert not encoded[5].any()
