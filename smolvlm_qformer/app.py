"""A Gradio chat app for a trained folder: upload or paste images, ask, follow up; the answer streams in.

    smolvlm-qformer chat FOLDER          # or: python -m smolvlm_qformer.app FOLDER
    # a Hugging Face Space: this file as app.py, `smolvlm-qformer[app]` in requirements.txt, and the model's Hub id
    # in the Space variable SMOLVLM_QFORMER_MODEL

Every answer goes through the package's one inference path (`inference.encode_prompts` / `generate_new_texts`) on a
chat prompt of the whole conversation (`processor.apply_chat_template`, one `{"type": "image"}` part per image), so
a first question about one image gets exactly what `generate_texts` gives. An unreadable image, a conversation over
the LM's context or an empty message gets a message in the chat; that exchange is left out of later prompts.

Besides the page, the app serves Gradio's API: the endpoint `/ask` (image, question, history -> answer) answers
without the UI, e.g. with `gradio_client`:

    from gradio_client import Client, handle_file

    client = Client("http://127.0.0.1:7860/")
    answer = client.predict(handle_file("photo.jpg"), "What colour is the car?", [], api_name="/ask")
    # a follow-up: the earlier turns as {"role", "content"} messages; the image belongs to the first question
    history = [{"role": "user", "content": "What colour is the car?"}, {"role": "assistant", "content": answer}]
    client.predict(handle_file("photo.jpg"), "Is it parked?", history, api_name="/ask")
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from transformers import TextIteratorStreamer

from smolvlm_qformer.inference import encode_prompts, generate_new_texts, load_for_inference
from smolvlm_qformer.processing_smolvlm_qformer import DEFAULT_CAPTION_PROMPT, DEFAULT_SYSTEM_PROMPT, decode_image

# What an answer that is a message about bad input starts with: such exchanges stay out of later prompts.
NOTICE = "⚠️ "
EMPTY_MESSAGE = "Ask a question, or add an image (upload or paste) to have it described."
MODEL_VARIABLE = "SMOLVLM_QFORMER_MODEL"


def _parts(content: Any) -> tuple[list[str], list[Any]]:
    """(texts, images) of one chat message's content as Gradio or an API client gives it: a string, a file
    (`{"path": ...}`, `{"type": "file", "file": {...}}`) or text part (`{"type": "text", "text": ...}`), or a list
    of them."""
    texts, images = [], []
    for part in content if isinstance(content, (list, tuple)) else [content]:
        if isinstance(part, str):
            texts.append(part)
        elif part.get("type") == "text":
            texts.append(part["text"])
        elif "file" in part or "path" in part:
            images.append(part.get("file", part)["path"])
        else:
            raise ValueError(f"cannot read a message part of type {part.get('type')!r}")
    return texts, images


def conversation(
    history: Sequence[dict], text: str, files: Sequence[Any], system_prompt: str | None = None
) -> tuple[list[dict], list[Any]]:
    """The chat-template messages and the images (in prompt order) of `history` (Gradio's `{"role", "content"}`
    messages) followed by a user message of `text` and `files`: consecutive user messages merge into one turn, its
    images before its words; a user turn with images and no words gets the captioning prompt. Exchanges answered with
    a notice are left out."""
    turns: list[dict] = []  # {"role", "texts", "images"}
    for message in [*history, {"role": "user", "content": [*({"path": f} for f in files), text]}]:
        texts, images = _parts(message["content"])
        if message["role"] == "assistant" and any(t.startswith(NOTICE) for t in texts):
            while turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        if turns and turns[-1]["role"] == message["role"] == "user":
            turns[-1]["texts"] += texts
            turns[-1]["images"] += images
        else:
            turns.append({"role": message["role"], "texts": texts, "images": images})
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    all_images = []
    for turn in turns:
        words = "\n".join(t.strip() for t in turn["texts"] if t.strip())
        if turn["role"] == "assistant":
            messages.append({"role": "assistant", "content": words})
            continue
        all_images += turn["images"]
        words = words or (DEFAULT_CAPTION_PROMPT if turn["images"] else "")
        content = [{"type": "image"} for _ in turn["images"]] + [{"type": "text", "text": words}]
        messages.append({"role": "user", "content": content})
    return messages, all_images


class Chat:
    """A loaded folder and what the app's events call: `respond` (the chat, streamed) and `ask` (the API)."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    def respond(
        self,
        message: dict,
        history: list[dict],
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> Iterator[str]:
        """The answer to `message` (`{"text", "files"}`) after `history`, growing as tokens come, or a notice."""
        text, files = message.get("text") or "", message.get("files") or []
        if not text.strip() and not files:
            yield NOTICE + EMPTY_MESSAGE
            return
        messages, image_values = conversation(history, text, files, (system_prompt or "").strip() or None)
        try:
            images = [self._image(value) for value in image_values]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = encode_prompts(self.model, self.processor, [prompt], images, int(max_new_tokens))
        except ValueError as error:
            yield NOTICE + str(error)
            return
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        answers: list[str] = []

        def generate() -> None:
            try:
                answers.extend(
                    generate_new_texts(self.model, self.processor, inputs, int(max_new_tokens), temperature, streamer)
                )
            finally:
                streamer.end()  # the loop below ends even if generation failed

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        partial = ""
        for piece in streamer:
            partial += piece
            yield partial.strip()
        thread.join()
        if not answers:
            raise gr.Error("generation failed; the server log says why")
        yield answers[0]

    def ask(
        self,
        image: str | None,
        question: str,
        history: list[dict] | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> str:
        """The answer to `question` about `image` (a file path; None for text alone) after `history`, earlier
        `{"role", "content"}` messages whose first question the image belongs to."""
        history = list(history or [])
        first_user = next((i for i, m in enumerate(history) if m["role"] == "user"), None)
        if image is not None and first_user is not None:
            history[first_user] = {"role": "user", "content": [{"path": image}, history[first_user]["content"]]}
        files = [image] if image is not None and first_user is None else []
        *_, answer = self.respond(
            {"text": question, "files": files}, history, system_prompt, max_new_tokens, temperature
        )
        return answer

    @staticmethod
    def _image(path: str) -> Any:
        try:
            return decode_image(path)
        except Exception as error:  # noqa: BLE001 - any undecodable upload is a message in the chat, not a crash
            raise ValueError(f"{Path(path).name} cannot be read as an image ({error})") from error


def build_app(model: Any, processor: Any, title: str = "smolvlm-qformer") -> gr.Blocks:
    """The page (chat, system prompt, generation settings, clear) and the `/ask` API endpoint."""
    chat = Chat(model, processor)
    context = model.config.text_config.max_position_embeddings
    with gr.Blocks(title=title) as app:
        settings = [
            gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", render=False),
            gr.Slider(1, context, value=min(64, context), step=1, label="Max new tokens", render=False),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)", render=False),
        ]
        chatbot = gr.Chatbot(label=title, height=480, render=False)
        textbox = gr.MultimodalTextbox(
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            placeholder="Upload or paste images, ask a question",
            render=False,
        )
        interface = gr.ChatInterface(
            chat.respond,
            multimodal=True,
            chatbot=chatbot,
            textbox=textbox,
            additional_inputs=settings,
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            title=title,
            description="Upload or paste images, ask about them and follow up. Runs on this machine.",
            api_name="chat",
        )
        gr.Button("Clear", variant="secondary").click(  # the conversation, shown and kept
            lambda: ([], [], [], None),
            outputs=[chatbot, interface.chatbot_state, interface.chatbot_value, textbox],
            api_visibility="undocumented",
            queue=False,
        )
        with gr.Row(visible=False):  # the API endpoint's inputs and output; no part of the page
            ask_inputs = [
                gr.Image(type="filepath", label="image"),
                gr.Textbox(label="question"),
                gr.JSON(label="history"),
                gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="system_prompt"),
                gr.Number(64, precision=0, label="max_new_tokens"),
                gr.Number(0.0, label="temperature"),
            ]
            answer = gr.Textbox(label="answer")
            ask_button = gr.Button()
        ask_button.click(
            chat.ask,
            ask_inputs,
            answer,
            api_name="ask",
            api_description="The answer to a question about an image (a file), after a history of earlier "
            '{"role", "content"} messages whose first question the image belongs to.',
        )
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smolvlm-qformer chat", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folder",
        nargs="?",
        default=os.environ.get(MODEL_VARIABLE),
        help=f"a trained model folder or Hub id (default: ${MODEL_VARIABLE})",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="the address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.folder is None:
        parser.error(f"name a model folder (or set {MODEL_VARIABLE})")
    model, processor = load_for_inference(args.folder, args.device)
    build_app(model, processor, title=Path(args.folder).name or "smolvlm-qformer").queue().launch(
        server_name=args.host, server_port=args.port, share=args.share
    )


if __name__ == "__main__":
    main()
