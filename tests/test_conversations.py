"""Conversations: the chat template's labels, the data formats, multi-image prompts, turn dropping and bad rows."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm_qformer.data import ChatCollator, PromptConfig
from smolvlm_qformer.data.collators import with_images
from smolvlm_qformer.data.conversations import BadRow, conversation_from_row
from smolvlm_qformer.processing_smolvlm_qformer import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN
from smolvlm_qformer.testing_utils import tiny_config, tiny_generation_model

RED, BLUE, GREEN = (Image.new("RGB", (24, 24), colour) for colour in ("red", "blue", "green"))


def _reference(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ChatML written out by hand, piece by piece: (ids, labels) with labels on the assistant's words and its end of
    turn only; each image part is `num_query_tokens` placeholder ids."""
    tokenizer, eos = processor.tokenizer, processor.tokenizer.eos_token
    ids, labels = [], []

    def add(text: str, trained: bool) -> None:
        pieces = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(pieces)
        labels.extend(pieces if trained else [-100] * len(pieces))

    def placeholders() -> None:
        ids.extend([processor.image_token_id] * processor.num_query_tokens)
        labels.extend([-100] * processor.num_query_tokens)

    if messages[0]["role"] != "system":
        add(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}{eos}\n", False)
    for message in messages:
        assistant = message["role"] == "assistant"
        add(f"<|im_start|>{message['role']}\n", False)
        parts = message["content"]
        for part in [{"type": "text", "text": parts}] if isinstance(parts, str) else parts:
            placeholders() if part["type"] == "image" else add(part["text"], assistant)
        add(eos, assistant)
        add("\n", False)
    return ids, labels


def _parts(images: int, text: str) -> list[dict]:
    return [{"type": "image"}] * images + [{"type": "text", "text": text}]


VARIANTS = {
    "one image, list content": [
        {"role": "user", "content": _parts(1, "What colour is it?")},
        {"role": "assistant", "content": _parts(0, "red")},
    ],
    "system, three turns": [
        {"role": "system", "content": _parts(0, "Answer briefly.")},
        {"role": "user", "content": _parts(1, "What colour is it?")},
        {"role": "assistant", "content": _parts(0, "red")},
        {"role": "user", "content": _parts(0, "And its shape?")},
        {"role": "assistant", "content": _parts(0, "a circle")},
        {"role": "user", "content": _parts(0, "Is it big?")},
        {"role": "assistant", "content": _parts(0, "yes")},
    ],
    "string content": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there."},
    ],
    "two images in one turn": [
        {"role": "user", "content": _parts(2, "Which is red?")},
        {"role": "assistant", "content": _parts(0, "the first")},
    ],
    "three images over turns": [
        {"role": "user", "content": _parts(1, "Colour?")},
        {"role": "assistant", "content": _parts(0, "red")},
        {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": _parts(0, "blue, green")},
    ],
}


def _canonical(messages: list[dict], images: list) -> list[dict]:
    """The messages as the collator hands them to the processor: canonical parts, each image part holding its
    image (transformers 4.x's `apply_chat_template` reads list contents only)."""
    count = sum(p["type"] == "image" for m in messages for p in _as_parts(m["content"]))
    conversation = conversation_from_row({"messages": messages, "images": images[:count]})
    return with_images(conversation, images[:count]).messages


@pytest.mark.parametrize("side", ["right", "left"])
def test_chat_template_labels_exactly_the_assistant_turns(processor, side):
    """Every template variant, batched and padded on either side: ids equal ChatML written by hand, labels sit on
    the assistant's words and end-of-turn tokens only (not the system prompt, the user turns, the image placeholders
    or padding), and `pixel_values` has one row per image part, in order."""
    conversations = [_canonical(m, [RED, BLUE, GREEN]) for m in VARIANTS.values()]
    collator = ChatCollator(processor)
    batch = collator.encode(conversations, padding_side=side)
    length = batch["input_ids"].shape[1]
    for row, messages in enumerate(VARIANTS.values()):
        ids, labels = _reference(processor, messages)
        pad = length - len(ids)
        assert pad >= 0
        take = slice(pad, None) if side == "left" else slice(0, len(ids))
        assert batch["input_ids"][row, take].tolist() == ids, row
        assert batch["labels"][row, take].tolist() == labels, row
        assert batch["attention_mask"][row].sum() == len(ids)
        assert (batch["labels"][row][batch["attention_mask"][row] == 0] == -100).all()
    num_images = sum(p["type"] == "image" for m in VARIANTS.values() for t in m for p in _as_parts(t["content"]))
    assert batch["pixel_values"].shape[0] == num_images == 7
    expected = processor.image_processor([RED, RED, BLUE, RED, BLUE, GREEN], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"][1:], expected)


def _as_parts(content):
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _red_row(**kwargs) -> dict:
    return {"image": _png(RED), "sample_index": 0, **kwargs}


def _png(image: Image.Image) -> dict:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


QUESTIONS = [("What colour is it?", "red"), ("What shape is it?", "square"), ("Is it blue?", "no")]


def test_llava_messages_and_column_rows_give_the_same_ids(processor):
    """The same conversation as TRL messages (string or list content), as LLaVA turns and (one turn) as question /
    answer columns: identical ids and labels."""
    messages = []
    for question, answer in QUESTIONS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    llava = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTIONS[0][0]}"}, {"from": "gpt", "value": QUESTIONS[0][1]}]
    for question, answer in QUESTIONS[1:]:
        llava += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    listed = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    listed[0]["content"].insert(0, {"type": "image"})
    collator = ChatCollator(processor, prompts=PromptConfig(system_prompts=["Be brief."]))
    rows = [
        _red_row(messages=messages),
        _red_row(messages=listed, images=[_png(RED)]),
        _red_row(conversations=llava),
    ]
    batch = collator(rows)
    assert batch["num_skipped"].item() == 0
    for row in (1, 2):
        assert torch.equal(batch["input_ids"][row], batch["input_ids"][0])
        assert torch.equal(batch["labels"][row], batch["labels"][0])
    one_turn = collator([_red_row(question=QUESTIONS[0][0], answer=QUESTIONS[0][1])])
    first = collator([_red_row(messages=messages[:2])])
    assert torch.equal(one_turn["input_ids"], first["input_ids"]) and torch.equal(one_turn["labels"], first["labels"])


def test_training_and_inference_build_the_same_prompt(processor):
    """The collator's ids up to the answer are exactly what generation is given for the same question."""
    collator = ChatCollator(processor, prompts=PromptConfig(system_prompts=["Answer briefly."]))
    batch = collator([_red_row(question="What colour is it?", answer="red")])
    prompt = processor(images=[RED], text=[processor.build_prompt("What colour is it?", "Answer briefly.")])
    prompt_ids = prompt["input_ids"][0].tolist()
    assert batch["input_ids"][0, : len(prompt_ids)].tolist() == prompt_ids
    assert (batch["labels"][0, : len(prompt_ids)] == -100).all()
    answer = batch["input_ids"][0, len(prompt_ids) :][batch["attention_mask"][0, len(prompt_ids) :].bool()]
    assert processor.decode(answer) == "red<|im_end|>"  # what follows the last label is left out


def test_a_conversation_longer_than_the_context_loses_whole_later_turns(processor):
    messages = []
    for question, answer in QUESTIONS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    whole = ChatCollator(processor)([_red_row(messages=messages)])
    length = int(whole["attention_mask"].sum())
    two_turns = ChatCollator(processor)([_red_row(messages=messages[:4])])
    cut = ChatCollator(processor, max_length=length - 1)([_red_row(messages=messages)])
    assert cut["num_dropped_turns"].item() == 2 and whole["num_dropped_turns"].item() == 0
    assert torch.equal(cut["input_ids"], two_turns["input_ids"]) and torch.equal(cut["labels"], two_turns["labels"])
    too_short = ChatCollator(processor, max_length=processor.num_query_tokens + 4)([_red_row(messages=messages)])
    assert too_short["num_skipped"].item() == 1 and "input_ids" not in too_short


def test_long_texts_are_cut_on_token_ids(processor):
    question = " ".join(["colour"] * 400)
    collator = ChatCollator(processor, max_question_tokens=10, max_answer_tokens=3)
    conversation, _ = collator.conversation(_red_row(question=question, answer="a red circle on a white card"))
    user_text = conversation.messages[1]["content"][-1]["text"]
    answer = conversation.messages[2]["content"][0]["text"]
    assert len(processor.tokenizer(user_text, add_special_tokens=False).input_ids) == 10
    assert len(processor.tokenizer(answer, add_special_tokens=False).input_ids) == 3
    assert conversation.messages[1]["content"][0] == {"type": "image"}  # the prompt around the question is whole


BAD_ROWS = {
    "no assistant turn": {"messages": [{"role": "user", "content": "hi"}]},
    "unknown role": {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "empty assistant turn": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
    "2 image markers for 1 images": {
        "messages": [{"role": "user", "content": _parts(2, "q")}, {"role": "assistant", "content": "a"}]
    },
    "unknown LLaVA speaker": {"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]},
    "0 image markers for 1 images": {
        "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "y"}]
    },
    "unknown content part": {
        "messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]
    },
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_a_bad_row_in_any_format_is_a_counted_skip_naming_it(processor, reason, caplog):
    row = _red_row(**BAD_ROWS[reason], sample_index=7)
    with pytest.raises(BadRow, match=reason):
        conversation_from_row(row)
    good = _red_row(question="What colour is it?", answer="red", sample_index=8)
    with caplog.at_level(logging.WARNING):
        batch = ChatCollator(processor)([row, good])
    assert batch["num_skipped"].item() == 1 and batch["input_ids"].shape[0] == 1
    assert any("sample 7" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_an_undecodable_image_skips_its_conversation(processor):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": messages, "images": [_png(RED), {"bytes": b"not a png", "path": None}], "sample_index": 0}]
    rows[0]["messages"] = [{"role": "user", "content": _parts(2, "q")}, {"role": "assistant", "content": "a"}]
    batch = ChatCollator(processor)([*rows, _red_row(messages=messages)])
    assert batch["num_skipped"].item() == 1 and batch["pixel_values"].shape[0] == 1


def test_turns_shuffle_per_epoch_with_the_image_first(processor):
    messages = []
    for question, answer in QUESTIONS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    collator = ChatCollator(processor, prompts=PromptConfig(shuffle_turns=True))
    orders = set()
    for epoch in range(8):
        conversation, _ = collator.conversation(_red_row(messages=messages, epoch=epoch))
        users = conversation.messages[1::2]
        assert users[0]["content"][0] == {"type": "image"}
        assert sum(p["type"] == "image" for u in users for p in u["content"]) == 1
        orders.add(tuple(u["content"][-1]["text"] for u in users))
        again, _ = collator.conversation(_red_row(messages=messages, epoch=epoch))
        assert again.messages == conversation.messages  # reproducible: a resumed run sees the same order
    assert len(orders) > 1 and all(sorted(order) == sorted(q for q, _ in QUESTIONS) for order in orders)


def test_multi_image_generation_equals_splicing_each_image_by_hand(processor):
    """Two images in one prompt: each marker's placeholders get that image's own adapted queries, so the logits
    equal those of the LM run on embeddings spliced by hand."""
    model = tiny_generation_model(tiny_config(processor))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": _parts(1, "this") + _parts(1, "and this?")}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = processor(images=[RED, BLUE], text=[prompt])
    with torch.no_grad():
        logits = model(**batch).logits
        queries = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        embeds = model.get_input_embeddings()(batch["input_ids"])  # placeholders look up a stand-in row
        positions = (batch["input_ids"][0] == processor.image_token_id).nonzero().flatten()
        assert len(positions) == 2 * processor.num_query_tokens
        embeds = embeds.clone()
        embeds[0, positions] = queries.reshape(-1, queries.shape[-1])
        expected = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(logits, expected)
    swapped = processor(images=[BLUE, RED], text=[prompt])
    with torch.no_grad():
        assert not torch.allclose(model(**swapped).logits[0, -1], logits[0, -1])
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 5)


def test_rows_sharing_an_image_read_its_features_once(processor, tmp_path):
    """The feature cache keys features per image: rows that share an image read the same features, and a row with
    two images gets one block per image."""
    import datasets

    from smolvlm_qformer.data import IndexedDataset, build_feature_cache
    from smolvlm_qformer.modeling_smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval

    vision = SmolVLMQFormerForImageTextRetrieval(tiny_config(processor)).vision_model.eval()
    red, blue = _png(RED), _png(BLUE)
    rows = datasets.Dataset.from_list(
        [
            {"images": [red], "question": "a"},
            {"images": [blue, red], "question": "b"},
            {"images": [red], "question": "c"},
        ]
    )
    cache = build_feature_cache(vision, processor.image_processor, IndexedDataset(rows), tmp_path / "cache")
    assert len(cache) == 2  # two distinct images
    cached = IndexedDataset(rows, cache)
    with torch.no_grad():
        expected = vision(**processor.image_processor([RED, BLUE], return_tensors="pt")).last_hidden_state
    first, second, third = (cached[i]["vision_hidden_states"] for i in range(3))
    assert len(first) == 1 and len(second) == 2 and "images" not in cached[0]
    torch.testing.assert_close(first[0].float(), expected[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(second[0].float(), expected[1], atol=2e-3, rtol=1e-3)
    assert torch.equal(second[1], first[0]) and torch.equal(third[0], first[0])
    other = datasets.Dataset.from_list([{"images": [_png(GREEN)], "question": "d"}])
    with pytest.raises(ValueError, match="built for other data"):
        IndexedDataset(other, cache)


def test_processor_padding_side_is_an_argument_and_truncation_spares_the_placeholders(processor):
    texts = ["What colour?", "Is there a very big circle on the left side of it?"]
    left = processor(images=[RED, BLUE], text=texts)
    right = processor(images=[RED, BLUE], text=texts, padding_side="right")
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0
    assert processor.tokenizer.padding_side == "right"  # as the tokenizer was built: the processor never sets it
    for row in range(2):
        kept_left = left["input_ids"][row][left["attention_mask"][row].bool()]
        kept_right = right["input_ids"][row][right["attention_mask"][row].bool()]
        assert torch.equal(kept_left, kept_right)
    length = int(left["attention_mask"][1].sum())
    cut = processor(images=[BLUE], text=texts[1:], truncation=True, max_length=length - 2)
    assert cut["input_ids"].shape[1] == length - 2
    assert torch.equal(cut["input_ids"][0], left["input_ids"][1, -length:][: length - 2])
    with pytest.raises(ValueError, match="image placeholders"):
        processor(images=[BLUE], text=texts[1:], truncation=True, max_length=processor.num_query_tokens)
    assert np.array_equal(processor.default_prompt_ids, processor(images=[RED])["input_ids"][0].tolist())


def test_messages_and_llava_files_load_through_load_dataset_and_train(processor, tmp_path):
    """A parquet file of TRL messages with a list of embedded images, and a LLaVA JSON file with image paths, as
    `--dataset parquet` / `--dataset json` read them: rows stay undecoded until the collator, and both train."""
    import datasets

    from smolvlm_qformer.data import DataArguments, load_image_text_dataset

    messages = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "red"}]
    features = datasets.Features(
        {
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    trl_rows = datasets.Dataset.from_dict({"messages": [messages] * 4, "images": [[RED]] * 4}, features=features)
    trl_rows.to_parquet(tmp_path / "trl.parquet")
    RED.save(tmp_path / "red.png")
    llava = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]
    llava_rows = datasets.Dataset.from_dict({"image": [str(tmp_path / "red.png")] * 4, "conversations": [llava] * 4})
    llava_rows.to_json(tmp_path / "llava.jsonl")

    collator = ChatCollator(processor, prompts=PromptConfig(system_prompts=["Be brief."]))
    batches = []
    for name, files in (("parquet", "trl.parquet"), ("json", "llava.jsonl")):
        rows = load_image_text_dataset(DataArguments(dataset=name, data_files=str(tmp_path / files)), "train")
        assert len(rows) == 4 and not isinstance(rows[0].get("images", rows[0].get("image")), Image.Image)
        batches.append(collator([rows[i] for i in range(4)]))
    assert batches[0]["num_skipped"].item() == batches[1]["num_skipped"].item() == 0
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    assert torch.equal(batches[0]["labels"], batches[1]["labels"])
    torch.testing.assert_close(batches[0]["pixel_values"], batches[1]["pixel_values"])


def _questions_about(image: dict, sample_index: int, questions=QUESTIONS) -> dict:
    """A caption turn (the image alone) then the questions, as a messages row."""
    messages = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a red square"}]
    for question, answer in questions:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"image": image, "messages": messages, "sample_index": sample_index}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_independent_turns_share_the_prefix_and_train_as_rows_of_their_own(processor, attention):
    """`independent_turns`: each exchange of a conversation packed after the shared prompt prefix has the loss and
    gradients it has as a row of its own, and the row is shorter than the rows it replaces."""
    from smolvlm_qformer.data.conversations import independent_exchanges

    prompts = PromptConfig(system_prompts=["Answer briefly."], caption_prompts=["Describe it."])
    rows = [_questions_about(_png(RED), 0), _questions_about(_png(BLUE), 1, QUESTIONS[:1])]
    packed = ChatCollator(processor, prompts=prompts, independent_turns=True)(rows)
    assert packed["input_ids"].shape[0] == 2 and packed["attention_mask"].shape[:2] == (2, 1)
    collator = ChatCollator(processor, prompts=prompts)
    one_per_exchange = [
        {**row, "messages": sample.messages}
        for row in rows
        for sample in independent_exchanges(collator.conversation(row)[0])
    ]
    separate = collator(one_per_exchange)
    assert len(one_per_exchange) == 6
    labelled = separate["labels"][separate["labels"] != -100]
    assert torch.equal(packed["labels"][packed["labels"] != -100], labelled)  # the same targets, in order
    assert packed["attention_mask"].sum() < separate["attention_mask"].sum() ** 2  # fewer token pairs
    assert (packed["input_ids"] != processor.tokenizer.pad_token_id).sum() < separate["attention_mask"].sum()

    _assert_same_loss_and_gradients(processor, packed, separate, attention)


def _assert_same_loss_and_gradients(processor, batch: dict, reference: dict, attention: str = "eager") -> None:
    """A tiny model (no dropout) gets the same loss and gradients from `batch` as from `reference`."""
    model = tiny_generation_model(tiny_config(processor, dropout=0.0, attention_dropout=0.0)).train()
    model.model.language_model.set_attn_implementation(attention)
    results = []
    for inputs in (batch, reference):
        model.zero_grad()
        loss = model(**{k: v for k, v in inputs.items() if not k.startswith("num_")}).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (batch_loss, batch_grads), (loss, grads) = results
    torch.testing.assert_close(batch_loss, loss, atol=1e-5, rtol=1e-5)
    assert batch_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(batch_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rows_end_at_their_last_label_with_the_same_loss_and_gradients(processor):
    """What follows a row's last label (ChatML's newline after the last end-of-turn) is never computed: each row is
    the template's ids cut there, the batch is that much narrower, and loss and gradients equal the full
    template's."""
    collator = ChatCollator(processor, prompts=PromptConfig(system_prompts=["Answer briefly."]))
    rows = [
        _red_row(question=question, answer=answer, sample_index=i) for i, (question, answer) in enumerate(QUESTIONS)
    ]
    rows.append(_questions_about(_png(BLUE), 3))
    batch = collator(rows)
    full = collator.encode(
        [with_images(collator.conversation(row)[0], [RED]).messages for row in rows[:3]]
        + [with_images(collator.conversation(rows[3])[0], [BLUE]).messages]
    )
    lengths, full_lengths = batch["attention_mask"].sum(1), full["attention_mask"].sum(1)
    assert torch.equal(lengths, full_lengths - 1) and batch["input_ids"].shape[1] == full["input_ids"].shape[1] - 1
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(batch["input_ids"][row, :length], full["input_ids"][row, :length])
        assert torch.equal(batch["labels"][row], full["labels"][row, : batch["labels"].shape[1]])
        assert processor.decode(full["input_ids"][row, length : length + 1]) == "\n"
        assert processor.decode(batch["input_ids"][row, length - 1 : length]) == processor.tokenizer.eos_token
    _assert_same_loss_and_gradients(processor, batch, full)


def test_independent_turns_with_images_of_their_own_are_a_counted_skip(processor, caplog):
    row = _questions_about(_png(RED), 0)
    row["messages"][2]["content"] = [{"type": "image"}, {"type": "text", "text": "and this?"}]
    row = {**row, "images": [row.pop("image")] * 2}
    with caplog.at_level(logging.WARNING):
        batch = ChatCollator(processor, independent_turns=True)([row, _questions_about(_png(BLUE), 1)])
    assert batch["num_skipped"].item() == 1 and "images of its own" in caplog.text
    assert batch["input_ids"].shape[0] == 1


def test_lengths_measure_the_text_without_reading_images():
    import datasets

    from smolvlm_qformer.data import IndexedDataset

    rows = datasets.Dataset.from_list(
        [
            {"image": {"bytes": b"not an image", "path": None}, "caption": "a red square"},
            {"image": {"bytes": b"not an image", "path": None}, "caption": "red"},
        ]
    )
    assert IndexedDataset(rows).lengths() == [12, 3]
    messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    conversations = datasets.Dataset.from_dict({"images": [[]], "messages": [messages]})
    assert IndexedDataset(conversations).lengths() == [len("user") + 2 + len("assistant") + 1]


def test_group_by_length_batches_conversations_of_similar_length(processor, tmp_path):
    """Trainer's `group_by_length` batches stage 2's conversations of 1-4 turns by length (their text, as
    `IndexedDataset.lengths` measures it), so batches pad far less than batches drawn at random."""
    import datasets

    from smolvlm_qformer.data import IndexedDataset
    from smolvlm_qformer.training import SmolVLMTrainingArguments, VLMTrainer
    from smolvlm_qformer.training.arguments import GROUP_BY_LENGTH

    rows = [_questions_about(_png(RED), i, QUESTIONS[: i % 4]) for i in range(128)]
    rows = [
        {"image": r["image"], "messages": [{**m, "content": _as_parts(m["content"])} for m in r["messages"]]}
        for r in rows
    ]
    dataset = IndexedDataset(datasets.Dataset.from_list(rows))
    prompts = PromptConfig(system_prompts=["Answer briefly."], caption_prompts=["Describe it."])

    def padding(**sampling) -> tuple[int, int]:
        args = SmolVLMTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[], seed=0, **sampling
        )
        model = tiny_generation_model(tiny_config(processor))
        trainer = VLMTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=ChatCollator(processor, prompts=prompts)
        )
        batches = list(trainer.get_train_dataloader())
        assert sum(len(batch["input_ids"]) for batch in batches) == 128
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)  # the same rows, in another order
        return tokens, sum(batch["attention_mask"].numel() for batch in batches) - tokens

    tokens, random_padding = padding()
    grouped_tokens, grouped_padding = padding(**GROUP_BY_LENGTH)
    assert grouped_tokens == tokens and random_padding > 0
    assert grouped_padding < random_padding / 4
