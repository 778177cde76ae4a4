"""The evaluation layer against independent references: pycocoevalcap (CIDEr-D, BLEU, the Java PTB tokenizer),
sacrebleu (BLEU), hand-computed VQA accuracies and a LAVIS-style recall loop."""

import shutil
import socket

import datasets
import numpy as np
import pytest
import sacrebleu
import torch
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu as CocoBleu
from pycocoevalcap.cider.cider import Cider as CocoCider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval
from smolvlm_qformer.evaluation import (
    evaluate_retrieval,
    load_metric,
    normalize_vqa_answer,
    ptb_tokenize,
    retrieval_recall_at_k,
    retrieval_scores,
)
from smolvlm_qformer.testing_utils import tiny_config

PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "a dog sitting on a couch",
    "Two people standing next to each other on a street.",
    "a plate of food with broccoli and rice",
    "a red bus driving down a city street",
    "A cat laying on a bed.",
    "a train on the tracks",
    "a group of people playing frisbee in a park",
]
REFERENCES = [
    ["A man riding a wave on a surfboard.", "A surfer rides a large wave in the ocean.", "a person surfing a wave"],
    ["A brown dog sits on the couch.", "a dog laying on a sofa next to a pillow"],
    [
        "Two people stand on a street corner.",
        "A man and a woman walking down the street.",
        "people on a sidewalk",
        "two friends talking",
    ],
    ["A plate with rice, broccoli and chicken.", "a plate of food with vegetables", "dinner on a white plate"],
    ["A red double-decker bus on a city street.", "a bus driving down the street", "A red bus stopped at a stop."],
    ["A cat sleeping on a bed.", "a cat laying on top of a bed next to a pillow"],
    ["A train traveling down the tracks.", "a passenger train at a station", "a train on train tracks"],
    ["People playing frisbee in a park.", "a group of young people playing a game of frisbee", "kids in a field"],
]


def coco_inputs(predictions, references):
    """pycocoevalcap's input format, captions tokenised as ours."""
    res = {i: [" ".join(ptb_tokenize(p))] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(ptb_tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    return gts, res


def test_metrics_load_offline(monkeypatch):
    """`evaluate.load` of the local modules never opens a connection."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("bleu", "cider_d", "vqa_accuracy"):
        metric = load_metric(name, keep_in_memory=True)
        assert metric.name == name
    assert metric.compute(predictions=["yes"], references=[["yes"] * 4])["vqa_accuracy"] == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("rouge")


def test_cider_d_matches_pycocoevalcap():
    """pycocoevalcap's `Cider` is CIDEr-D (clipped counts, Gaussian length penalty with sigma 6, x10)."""
    result = load_metric("cider_d", keep_in_memory=True).compute(predictions=PREDICTIONS, references=REFERENCES)
    score, scores = CocoCider().compute_score(*coco_inputs(PREDICTIONS, REFERENCES))
    assert result["cider_d"] == pytest.approx(score, abs=1e-6)
    np.testing.assert_allclose(result["scores"], scores, atol=1e-6, rtol=0)
    assert 0.5 < score < 5  # the fixture exercises the metric, not only its zeros


def test_cider_d_counts_the_corpus_for_idf():
    """Adding images changes every image's score (the IDF is over all the references scored together)."""
    cider = load_metric("cider_d", keep_in_memory=True)
    alone = cider.compute(predictions=PREDICTIONS[:2], references=REFERENCES[:2])["scores"]
    together = cider.compute(predictions=PREDICTIONS, references=REFERENCES)["scores"][:2]
    assert alone != pytest.approx(together)


def test_bleu_matches_sacrebleu():
    result = load_metric("bleu", keep_in_memory=True).compute(predictions=PREDICTIONS, references=REFERENCES)
    hypotheses = [" ".join(ptb_tokenize(p)) for p in PREDICTIONS]
    # sacrebleu takes one stream per reference position; None fills in for captions with fewer references.
    num_streams = max(map(len, REFERENCES))
    streams = [[" ".join(ptb_tokenize(refs[k])) if k < len(refs) else None for refs in REFERENCES] for k in range(4)]
    assert len(streams) == num_streams
    expected = sacrebleu.corpus_bleu(hypotheses, streams, tokenize="none", smooth_method="none", force=True)
    assert result["bleu"] == pytest.approx(expected.score / 100, abs=1e-6)
    np.testing.assert_allclose(result["precisions"], [p / 100 for p in expected.precisions], atol=1e-6, rtol=0)
    assert result["brevity_penalty"] == pytest.approx(expected.bp, abs=1e-6)
    assert (result["translation_length"], result["reference_length"]) == (expected.sys_len, expected.ref_len)
    assert result["bleu"] > 0.1


def test_bleu_matches_coco_bleu_4():
    """pycocoevalcap's BLEU-4 (closest reference length; its 1e-9 smoothing moves the score by far less than 1e-6)."""
    result = load_metric("bleu", keep_in_memory=True).compute(predictions=PREDICTIONS, references=REFERENCES)
    scores, _ = CocoBleu(4).compute_score(*coco_inputs(PREDICTIONS, REFERENCES), verbose=0)
    assert result["bleu"] == pytest.approx(scores[3], abs=1e-6)


def test_bleu_is_zero_without_a_matching_4_gram():
    result = load_metric("bleu", keep_in_memory=True).compute(
        predictions=["a cat on a mat"], references=[["a dog on a mat", "the cat sat"]]
    )
    assert result["bleu"] == 0.0
    assert result["precisions"][3] == 0.0


@pytest.mark.parametrize(
    ("caption", "expected"),
    [  # recorded from pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1) followed by its punctuation removal
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ('Two dogs (brown) play in the "park"!', "two dogs -lrb- brown -rrb- play in the park"),
        ("A man's hat, on the table; it isn't new.", "a man 's hat on the table it is n't new"),
        (
            "He doesn't like it -- they're gonna go... cannot wait?",
            "he does n't like it they 're gon na go can not wait",
        ),
        (
            "A black-and-white t-shirt [with] {braces} & 3.5 kg, 1,000 people $5 50% e-mail.",
            "a black-and-white t-shirt -lsb- with -rsb- -lcb- braces -rcb- & 3.5 kg 1,000 people $ 5 50 % e-mail",
        ),
        (
            "It's the U.S. team at 10:30 a.m. with Mr. Smith, she'll see.",
            "it 's the u.s. team at 10:30 a.m. with mr. smith she 'll see",
        ),
        ("A MAN ON A SKATEBOARD IN THE AIR!!!", "a man on a skateboard in the air !!!"),
        (
            "“Smart quotes” and ‘single’ quotes; it’s a 5-year-old boy.",
            "smart quotes and single quotes it 's a 5-year-old boy",
        ),
    ],
)
def test_ptb_tokenize_matches_recorded_coco_tokenisation(caption, expected):
    assert " ".join(ptb_tokenize(caption)) == expected


@pytest.mark.skipif(shutil.which("java") is None, reason="the COCO PTB tokenizer needs Java")
def test_ptb_tokenize_matches_java_ptb_tokenizer():
    captions = [c for refs in REFERENCES for c in refs] + PREDICTIONS
    expected = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [" ".join(ptb_tokenize(c)) for c in captions] == [expected[i][0] for i in range(len(captions))]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word, period
        ("The Dog", "dog"),  # lower-case, article
        ("t-shirt", "t shirt"),  # a mark touching no space becomes a space
        ("yes, it is", "yes it is"),  # a mark touching a space goes
        ("1,000", "1000"),  # digit-comma-digit: every mark goes
        ("a.m.", "am"),  # periods go unless a digit follows
        ("3.5", "3.5"),
        ("dont", "don't"),  # contraction fixed
        ("none", "0"),
        (" Red\n", "red"),
    ],
)
def test_normalize_vqa_answer(answer, expected):
    assert normalize_vqa_answer(answer) == expected


@pytest.mark.parametrize(
    ("matches", "expected"),
    # k of 10 annotators agree: (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_averages_over_leave_one_out_subsets(matches, expected):
    references = ["two"] * matches + ["three"] * (10 - matches)  # "two" normalises to the prediction "2"
    result = load_metric("vqa_accuracy", keep_in_memory=True).compute(predictions=["2"], references=[references])
    assert result["vqa_accuracy"] == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_with_one_reference_is_exact_match_after_normalisation():
    result = load_metric("vqa_accuracy", keep_in_memory=True).compute(
        predictions=["Two", "A T-shirt.", "yes", "3.5"], references=["2", "t shirt", "no", "35"]
    )
    assert result["scores"] == [1.0, 1.0, 0.0, 0.0]
    assert result["vqa_accuracy"] == 0.5


def lavis_recall(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: list, txt2img: list, k: int):
    """LAVIS' `_report_metrics` loop (BLIP/BLIP-2 retrieval): rank = best position of a ground-truth candidate."""
    ranks = [min(np.where(np.argsort(row)[::-1] == t)[0][0] for t in img2txt[i]) for i, row in enumerate(scores_i2t)]
    t_ranks = [np.where(np.argsort(row)[::-1] == txt2img[i])[0][0] for i, row in enumerate(scores_t2i)]
    return np.mean(np.array(ranks) < k), np.mean(np.array(t_ranks) < k)


def test_recall_at_k_matches_lavis_loop():
    rng = np.random.default_rng(0)
    num_images, per_image = 20, 5
    text_to_image = [i for i in range(num_images) for _ in range(per_image)]
    image_to_texts = [list(range(i * per_image, (i + 1) * per_image)) for i in range(num_images)]
    similarity = rng.normal(size=(num_images, num_images * per_image)) + 2.0 * np.eye(num_images).repeat(5, axis=1)
    results = retrieval_recall_at_k(torch.from_numpy(similarity), text_to_image)
    for k in (1, 5, 10):
        i2t, t2i = lavis_recall(similarity, similarity.T, image_to_texts, text_to_image, k)
        assert results[f"image_to_text_r{k}"] == pytest.approx(i2t)
        assert results[f"text_to_image_r{k}"] == pytest.approx(t2i)
    assert 0 < results["image_to_text_r1"] < 1 and 0 < results["text_to_image_r1"] < 1
    assert results["mean_recall"] == pytest.approx(np.mean([v for k, v in results.items() if k != "mean_recall"]))


def test_recall_at_k_counts_ties_against_the_model():
    results = retrieval_recall_at_k(torch.zeros(3, 3), [0, 1, 2], ks=(1, 3))
    assert results["image_to_text_r1"] == results["text_to_image_r1"] == 0.0
    assert results["image_to_text_r3"] == results["text_to_image_r3"] == 1.0


@pytest.fixture
def retrieval_model(processor):
    return SmolVLMQFormerForImageTextRetrieval(tiny_config(processor, losses=["itc", "itm"])).eval()


CAPTIONS = [["a red circle", "a blue square"], ["a green star"], ["a teal cross", "a white circle"], ["a gray star"]]
TEXTS = [caption for captions in CAPTIONS for caption in captions]


def test_retrieval_scores_match_the_model_forward(retrieval_model, processor, images):
    """Batched image and text embedding gives the batch forward's ITC similarity (logits times temperature)."""
    scores = retrieval_scores(retrieval_model, processor, images, TEXTS, batch_size=3)
    with torch.no_grad():
        output = retrieval_model(**processor.retrieval_inputs(images=images, text=TEXTS), return_loss=False)
    torch.testing.assert_close(scores.image_to_text, output.logits_per_image * output.temperature)
    assert scores.text_to_image is scores.image_to_text


def test_itm_rerank_adds_the_itm_logit_of_each_top_k_pair(retrieval_model, processor, images):
    itc = retrieval_scores(retrieval_model, processor, images, TEXTS, batch_size=2).image_to_text
    reranked = retrieval_scores(retrieval_model, processor, images, TEXTS, batch_size=2, itm_top_k=len(TEXTS))
    inputs = processor.retrieval_inputs(images=images, text=TEXTS)
    with torch.no_grad():
        vision = retrieval_model.vision_model(pixel_values=inputs.pixel_values).last_hidden_state

        def pair_itm(i: int, t: int) -> float:
            """LAVIS' ITM score of one pair: the head's positive logit, averaged over the bidirectional queries."""
            ids, mask = inputs.input_ids[t : t + 1], inputs.attention_mask[t : t + 1]
            queries = retrieval_model.qformer(vision[i : i + 1], ids, mask, mode="bidirectional").query_output
            return retrieval_model.itm_head(queries).mean(dim=1)[0, 1].item()

        itm = torch.tensor([[pair_itm(i, t) for t in range(len(TEXTS))] for i in range(len(images))])
    torch.testing.assert_close(reranked.image_to_text, itc + itm)
    torch.testing.assert_close(reranked.text_to_image, itc + itm)

    top1 = retrieval_scores(retrieval_model, processor, images, TEXTS, itm_top_k=1)
    assert (top1.image_to_text.isfinite().sum(dim=1) == 1).all()
    assert (top1.text_to_image.isfinite().sum(dim=0) == 1).all()


def test_evaluate_retrieval_on_a_datasets_column(retrieval_model, processor, images):
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    pil_images = [Image.fromarray(image) for image in images]
    dataset = datasets.Dataset.from_dict({"image": pil_images, "captions": CAPTIONS}, features=features)
    results = evaluate_retrieval(retrieval_model, processor, dataset["image"], dataset["captions"], ks=(1, 4))
    assert results == evaluate_retrieval(retrieval_model, processor, pil_images, CAPTIONS, ks=(1, 4))
    assert results["text_to_image_r4"] == 1.0  # 4 images: every text finds its image in the top 4
    assert all(0 <= value <= 1 for value in results.values())
