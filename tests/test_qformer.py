"""The Q-Former: DistilBERT compatibility, the three attention modes, and the stage-1 losses against references."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DistilBertConfig, DistilBertModel

from smolvlm_qformer import QFormerModel, SmolVLMQFormerForImageTextRetrieval
from smolvlm_qformer.modeling_smolvlm_qformer import (
    encode_images,
    qformer_attention_mask,
    same_texts,
    sample_hard_negatives,
)
from smolvlm_qformer.training.trainers import retrieval_hits

TEXTS = ["a red circle", "a blue square on the left", "a star", "a green triangle"]


@pytest.fixture
def qformer(config):
    return QFormerModel(config.qformer_config).eval()


@pytest.fixture
def text(processor):
    return processor.qformer_tokenizer(TEXTS, padding=True, return_tensors="pt")


def test_distilbert_weights_load_and_text_path_equals_distilbert(tmp_path, config, text):
    qconfig = config.qformer_config
    bert_config = DistilBertConfig(**{k: getattr(qconfig, k) for k in ("vocab_size", "dim", "hidden_dim", "n_layers")})
    bert_config.n_heads, bert_config.max_position_embeddings = qconfig.n_heads, qconfig.max_position_embeddings
    distilbert = DistilBertModel(bert_config).eval()
    distilbert.save_pretrained(tmp_path)

    qformer, info = QFormerModel.from_pretrained(
        tmp_path, num_query_tokens=4, encoder_hidden_size=32, output_loading_info=True
    )
    new_parts = {key.split(".")[0] if "crossattention" not in key else "crossattention" for key in info["missing_keys"]}
    assert new_parts == {"queries", "crossattention"}
    assert info["unexpected_keys"] == [] or set(info["unexpected_keys"]) <= {"embeddings.position_ids"}

    expected = distilbert(**text).last_hidden_state
    actual = qformer.eval()(input_ids=text.input_ids, attention_mask=text.attention_mask).text_output
    valid = text.attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_attention_mask_patterns():
    text_mask = torch.tensor([[1, 1, 0]])
    q = 2
    unimodal = qformer_attention_mask(q, text_mask, "unimodal")[0, 0].int()
    bidirectional = qformer_attention_mask(q, text_mask, "bidirectional")[0, 0].int()
    causal = qformer_attention_mask(q, text_mask, "multimodal_causal")[0, 0].int()
    assert unimodal.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert bidirectional.tolist() == [[1, 1, 1, 1, 0]] * 5
    assert causal.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def _outputs_before_and_after_changing_token(qformer, text, mode, position):
    """Q-Former outputs for the same images with the text as given and with the token at `position` replaced."""
    image = torch.randn(len(TEXTS), 5, 32)
    other_ids = text.input_ids.clone()
    other_ids[:, position] = 7
    before = qformer(image, text.input_ids, text.attention_mask, mode=mode)
    after = qformer(image, other_ids, text.attention_mask, mode=mode)
    return image, before, after


def test_unimodal_queries_ignore_text(qformer, text):
    image, a, b = _outputs_before_and_after_changing_token(qformer, text, "unimodal", 1)
    torch.testing.assert_close(a.query_output, b.query_output)
    assert not torch.allclose(a.text_output, b.text_output)
    # and equal to the query path run alone
    torch.testing.assert_close(a.query_output, qformer(vision_hidden_states=image).query_output, atol=1e-6, rtol=1e-5)


def test_bidirectional_queries_see_text(qformer, text):
    _, a, b = _outputs_before_and_after_changing_token(qformer, text, "bidirectional", 1)
    assert (a.query_output - b.query_output).abs().amax() > 1e-4


def test_multimodal_causal_text_sees_only_the_past(qformer, text):
    t = 2
    _, a, b = _outputs_before_and_after_changing_token(qformer, text, "multimodal_causal", t)
    torch.testing.assert_close(a.query_output, b.query_output)
    torch.testing.assert_close(a.text_output[:, :t], b.text_output[:, :t])
    changed = (a.text_output - b.text_output).abs().amax(dim=-1)  # (B, T)
    assert (changed[:, t] > 1e-4).all()


def test_cross_attention_sees_the_image(qformer):
    image = torch.randn(2, 5, 32)
    a = qformer(vision_hidden_states=image, output_attentions=True)
    b = qformer(vision_hidden_states=image + 1)
    assert (a.query_output - b.query_output).abs().amax() > 1e-4
    assert len(a.cross_attentions) == 1  # 2 layers, cross-attention every 2nd layer
    torch.testing.assert_close(a.cross_attentions[0].sum(-1), torch.ones(2, 2, 4))


def test_queries_start_distinct(qformer):
    queries = qformer.queries.weight[0]
    assert queries.std() > 0.01
    assert torch.cdist(queries, queries).fill_diagonal_(1).min() > 0


@pytest.fixture
def retrieval(config):
    return SmolVLMQFormerForImageTextRetrieval(config).eval()


def _batch(processor, images):
    return processor.retrieval_inputs(images=images, text=TEXTS)


def test_itc_loss_matches_reference(retrieval, processor, images):
    retrieval.config.qformer_config.losses = ["itc"]
    retrieval.config.qformer_config.loss_weights = [1.0]
    out = retrieval(**_batch(processor, images))
    image_feats, text_feats, temp = out.image_embeds.detach(), out.text_embeds.detach(), out.temperature
    n = len(TEXTS)
    sim = torch.empty(n, n)
    for i in range(n):
        for j in range(n):
            sim[i, j] = max(float(image_feats[i, q] @ text_feats[j]) for q in range(image_feats.shape[1])) / temp
    expected = (F.cross_entropy(sim, torch.arange(n)) + F.cross_entropy(sim.t(), torch.arange(n))) / 2
    torch.testing.assert_close(out.logits_per_image, sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.loss_itm is None and out.loss_itg is None


def test_itm_loss_matches_per_pair_reference(retrieval, processor, images, monkeypatch):
    neg_text, neg_image = torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])
    monkeypatch.setattr(
        "smolvlm_qformer.modeling_smolvlm_qformer.sample_hard_negatives",
        lambda logits, positives=None: (neg_text, neg_image),
    )
    retrieval.config.qformer_config.losses = ["itm"]
    retrieval.config.qformer_config.loss_weights = [1.0]
    batch = _batch(processor, images)
    out = retrieval(**batch)

    vision_hidden_states = encode_images(retrieval.vision_model, batch.pixel_values, None).last_hidden_state
    pairs = [(i, i, 1) for i in range(4)] + [(i, int(neg_text[i]), 0) for i in range(4)]
    pairs += [(int(neg_image[j]), j, 0) for j in range(4)]
    losses = []
    for image_index, text_index, label in pairs:
        length = int(batch.attention_mask[text_index].sum())
        queries = retrieval.qformer(
            vision_hidden_states[image_index : image_index + 1],
            batch.input_ids[text_index : text_index + 1, :length],
            mode="bidirectional",
        ).query_output
        logits = retrieval.itm_head(queries).mean(dim=1)
        losses.append(F.cross_entropy(logits, torch.tensor([label])))
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def test_hard_negatives_are_never_the_positive_and_follow_similarity():
    logits = torch.full((4, 4), -50.0)
    logits.fill_diagonal_(50.0)
    logits[0, 2] = logits[1, 3] = logits[2, 0] = logits[3, 1] = 40.0
    for _ in range(20):
        neg_text, neg_image = sample_hard_negatives(logits)
        assert neg_text.tolist() == [2, 3, 0, 1]
        assert neg_image.tolist() == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_itc_counts_identical_captions_as_positives(retrieval, processor, images):
    """Class-like captions: a text identical to an image's own is a positive of that image, never a negative."""
    retrieval.config.qformer_config.losses = ["itc"]
    retrieval.config.qformer_config.loss_weights = [1.0]
    texts = ["a red circle", "a star", "a red circle", "a red circle"]
    out = retrieval(**processor.retrieval_inputs(images=images, text=texts))
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float)
    targets = same / same.sum(dim=1, keepdim=True)
    logits = out.logits_per_image.detach()
    per_row = -(targets * logits.log_softmax(dim=1)).sum(dim=1) - (targets * logits.t().log_softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(out.loss.detach(), per_row.mean() / 2, atol=1e-5, rtol=1e-5)


def test_same_texts_compares_tokens_up_to_padding():
    ids = torch.tensor([[5, 6, 0], [5, 6, 7], [5, 6, 9], [5, 6, 7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_texts(ids, mask), expected)
    assert torch.equal(same_texts(ids, mask, across_ranks=False), expected)


def test_retrieval_hits_count_a_same_caption_text_as_found():
    ids, mask = torch.tensor([[5, 6], [5, 6], [7, 8]]), torch.ones(3, 2, dtype=torch.long)
    # images 0 and 1 pick each other's (identical) text: hits; image 2 picks text 0, text 2 picks image 0: misses
    logits = torch.tensor([[0.0, 1.0, 0.9], [1.0, 0.0, 0.5], [1.0, 0.0, 0.5]])
    hits = retrieval_hits(logits, ids, mask)
    assert hits[:, 0].tolist() == [True, True, False]
    assert hits[:, 1].tolist() == [True, True, False]


def test_hard_negatives_skip_pairs_with_the_same_text():
    logits = torch.full((4, 4), -50.0)
    logits.fill_diagonal_(50.0)
    logits[0, 1] = logits[1, 0] = 45.0  # 0 and 1 share a caption: the "hardest negative" is really a positive
    logits[0, 2] = logits[1, 3] = logits[2, 0] = logits[3, 1] = 40.0
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    for _ in range(20):
        neg_text, neg_image = sample_hard_negatives(logits, same)
        assert neg_text.tolist() == [2, 3, 0, 1] and neg_image.tolist() == [2, 3, 0, 1]
    # a batch of one caption has nothing else to draw: any other pair, never the row's own
    neg_text, neg_image = sample_hard_negatives(logits, torch.ones(4, 4, dtype=torch.bool))
    assert all(n != i for i, n in enumerate(neg_text.tolist())) and all(
        n != i for i, n in enumerate(neg_image.tolist())
    )


def test_itg_loss_matches_per_sample_reference(retrieval, processor, images):
    retrieval.config.qformer_config.losses = ["itg"]
    retrieval.config.qformer_config.loss_weights = [1.0]
    batch = _batch(processor, images)
    out = retrieval(**batch)

    vision_hidden_states = encode_images(retrieval.vision_model, batch.pixel_values, None).last_hidden_state
    word_embeddings = retrieval.qformer.get_input_embeddings().weight
    total, count = 0.0, 0
    for i in range(len(TEXTS)):
        ids = batch.input_ids[i, : int(batch.attention_mask[i].sum())]
        text_output = retrieval.qformer(
            vision_hidden_states[i : i + 1], ids[None], mode="multimodal_causal"
        ).text_output
        logits = retrieval.itg_head(text_output[0], word_embeddings)
        total = total + F.cross_entropy(logits[:-1], ids[1:], reduction="sum")
        count += len(ids) - 1
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)


def test_weighted_losses_and_gradients_reach_queries_and_cross_attention(config, processor, images):
    config.qformer_config.loss_weights = [1.0, 0.5, 0.25]
    config.qformer_config.attention_dropout = config.qformer_config.dropout = 0.0  # before building: it takes effect
    model = SmolVLMQFormerForImageTextRetrieval(config).train()
    assert all(m.p == 0 for m in model.qformer.modules() if isinstance(m, torch.nn.Dropout))
    out = model(**_batch(processor, images))
    torch.testing.assert_close(out.loss, out.loss_itc + 0.5 * out.loss_itm + 0.25 * out.loss_itg)
    out.loss.backward()
    cross = model.qformer.transformer.layer[0].crossattention
    for param in (model.qformer.queries.weight, cross.q_lin.weight, cross.k_lin.weight, model.temperature):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_model.parameters())  # frozen


def test_cached_vision_features_give_the_same_outputs(retrieval, processor, images):
    batch = _batch(processor, images)
    vision_hidden_states = encode_images(retrieval.vision_model, batch.pixel_values, None).last_hidden_state
    torch.manual_seed(1)
    a = retrieval(**batch)
    torch.manual_seed(1)
    b = retrieval(
        vision_hidden_states=vision_hidden_states, input_ids=batch.input_ids, attention_mask=batch.attention_mask
    )
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image)


def test_layers_use_their_attention_blocks_only_through_forward(qformer, text):
    """An engine may replace a block's projections (vLLM's transformers backend fuses `q_lin`/`k_lin`/`v_lin` into
    one and rewrites that block's `forward`): no caller reaches inside a block, so hiding its insides changes
    nothing."""

    class Opaque(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    vision = torch.randn(len(TEXTS), 5, qformer.config.encoder_hidden_size)
    inputs = {"vision_hidden_states": vision, "input_ids": text.input_ids, "attention_mask": text.attention_mask}
    expected = qformer(**inputs, mode="multimodal_causal").last_hidden_state
    for layer in qformer.transformer.layer:
        layer.attention = Opaque(layer.attention)
        if layer.crossattention is not None:
            layer.crossattention = Opaque(layer.crossattention)
    torch.testing.assert_close(qformer(**inputs, mode="multimodal_causal").last_hidden_state, expected)
