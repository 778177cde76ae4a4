"""The chat app (smolvlm_qformer/app.py) on a tiny saved folder: its answers are the package's greedy answers for
the same prompts (a first question: `generate_texts`' exactly), conversations become the chat template's messages,
bad input is a message in the chat, and the `/ask` endpoint answers `gradio_client` on 127.0.0.1."""

import socket

import pytest

from smolvlm_qformer.inference import encode_prompts, generate_new_texts, generate_texts, load_for_inference
from smolvlm_qformer.processing_smolvlm_qformer import DEFAULT_CAPTION_PROMPT, DEFAULT_SYSTEM_PROMPT, decode_image
from smolvlm_qformer.testing_utils import draw_shape

gr = pytest.importorskip("gradio", reason="Gradio is in the app extra")
from smolvlm_qformer.app import EMPTY_MESSAGE, NOTICE, Chat, build_app, conversation  # noqa: E402

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def chat(folder):
    return Chat(*load_for_inference(str(folder)))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for index, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        paths.append(root / f"{colour}.png")
        draw_shape(colour, shape, size=48, seed=index).save(paths[-1])
    return [str(path) for path in paths]


def greedy(chat: Chat, messages: list[dict], images: list[str], max_new_tokens: int) -> str:
    """The package's greedy answer to the chat template's prompt of `messages`."""
    prompt = chat.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [decode_image(path) for path in images]
    inputs = encode_prompts(chat.model, chat.processor, [prompt], images, max_new_tokens)
    return generate_new_texts(chat.model, chat.processor, inputs, max_new_tokens)[0]


def test_first_answer_streams_and_equals_generate_texts(chat, image_files):
    streamed = list(chat.respond({"text": QUESTION, "files": image_files[:1]}, [], max_new_tokens=20))
    (expected,) = generate_texts(chat.model, chat.processor, image_files[:1], [QUESTION], max_new_tokens=20)
    assert streamed[-1] == expected and expected
    assert len(streamed) > 2  # token by token, not the answer at once
    assert all(expected.startswith(partial) for partial in streamed[:-1] if partial)


def test_an_image_alone_is_captioned_as_generate_texts_does(chat, image_files):
    *_, answer = chat.respond({"text": "", "files": image_files[1:2]}, [], max_new_tokens=12)
    assert [answer] == list(generate_texts(chat.model, chat.processor, image_files[1:2], max_new_tokens=12))


def test_gradio_history_becomes_the_chat_templates_messages(image_files):
    # the history as Gradio's Chatbot hands it over: the image and the words of a turn as separate user messages
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": image_files[0]}}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    messages, images = conversation(history, "And this one?", image_files[1:], "Be brief.")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ]
    assert images == image_files  # in prompt order
    messages, _ = conversation([], "", image_files[:1])  # an image without words: the captioning prompt
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_CAPTION_PROMPT}]}
    ]


def test_follow_up_with_several_images_answers_the_whole_conversation(chat, image_files):
    first = {"text": QUESTION, "files": image_files[:1]}
    *_, answer = chat.respond(first, [], max_new_tokens=8)
    history = [
        {"role": "user", "content": [{"path": image_files[0]}, QUESTION]},
        {"role": "assistant", "content": answer},
    ]
    follow_up = {"text": "And these two?", "files": image_files[1:]}
    *_, second = chat.respond(follow_up, history, DEFAULT_SYSTEM_PROMPT, max_new_tokens=8)
    messages, images = conversation(history, follow_up["text"], follow_up["files"], DEFAULT_SYSTEM_PROMPT)
    assert second == greedy(chat, messages, images, 8)
    # the earlier turns matter: the same question with no history gets another prompt
    assert messages[1]["role"] == "user" and messages[2] == {"role": "assistant", "content": answer}


def test_bad_input_is_a_message_in_the_chat(chat, image_files, tmp_path):
    assert list(chat.respond({"text": "  ", "files": []}, [])) == [NOTICE + EMPTY_MESSAGE]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (message,) = chat.respond({"text": QUESTION, "files": [str(broken)]}, [])
    assert message.startswith(NOTICE) and "broken.png cannot be read as an image" in message
    context = chat.model.config.text_config.max_position_embeddings
    (message,) = chat.respond({"text": "shape " * context, "files": image_files[:1]}, [])
    assert message.startswith(NOTICE) and f"context of {context} tokens" in message


def test_exchanges_answered_with_a_notice_stay_out_of_later_prompts(image_files, tmp_path):
    history = [
        {"role": "user", "content": [{"path": str(tmp_path / "missing.png")}, "What is it?"]},
        {"role": "assistant", "content": NOTICE + "missing.png cannot be read as an image"},
    ]
    assert conversation(history, QUESTION, image_files[:1]) == conversation([], QUESTION, image_files[:1])


def test_ask_endpoint_answers_gradio_client_on_localhost(chat, image_files, monkeypatch):
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(chat.model, chat.processor).queue()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert "/ask" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        answer = client.predict(handle_file(image_files[0]), QUESTION, [], api_name="/ask")
        (expected,) = generate_texts(chat.model, chat.processor, image_files[:1], [QUESTION], max_new_tokens=64)
        assert answer == expected
        # a follow-up: the image belongs to the history's first question
        history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
        follow_up = client.predict(handle_file(image_files[0]), "Is it round?", history, api_name="/ask")
        messages = [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": [{"type": "text", "text": "Is it round?"}]},
        ]
        assert follow_up == greedy(chat, messages, image_files[:1], 64)
        assert client.predict(None, "", [], api_name="/ask") == NOTICE + EMPTY_MESSAGE
    finally:
        app.close()
