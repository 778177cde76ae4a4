"""Every stage-2 row as one conversation: the formats people's data comes in, checked, and fitted to the context.

A conversation is transformers' chat format: `messages` with roles system / user / assistant whose content is a list
of `{"type": "image"}` and `{"type": "text", "text": ...}` parts, and the conversation's `images` (undecoded), one
per image part, in order. Rows come in one of three shapes:

- **messages** (TRL / transformers): a `messages` column (content a string or a list of parts) with an `images`
  list or an `image` column. As TRL does, string contents get the images before the first user turn's text.
- **LLaVA**: `conversations: [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", ...}]` and an
  `image` (or `images`) column; each `<image>` in a value is that image's place.
- **columns**: an image with a caption, or with a question and its answer: one user turn (the image, then the
  question; a captioning instruction is drawn later for captions) and one assistant turn.

A row that cannot be trained on raises `BadRow` saying why; the collator counts and logs it and trains on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..processing_smolvlm_qformer import IMAGE_TOKEN

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRow(ValueError):
    """A row that cannot become a trainable conversation; the message names the problem."""


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    images: list[Any]

    @property
    def num_image_parts(self) -> int:
        return sum(part["type"] == "image" for message in self.messages for part in message["content"])


def row_images(row: dict[str, Any]) -> list[Any]:
    """A row's images: its cached `vision_hidden_states` (one tensor per image, from a feature cache), else its
    `images` list, else its one `image` (none if neither)."""
    if row.get("vision_hidden_states") is not None:
        return list(row["vision_hidden_states"])
    images = row.get("images")
    if images is None:
        images = [] if row.get("image") is None else [row["image"]]
    return list(images)


def conversation_from_row(row: dict[str, Any]) -> Conversation:
    """The row's conversation in the canonical form, checked (`BadRow` if it cannot be trained on)."""
    turns = row.get("messages", row.get("conversations"))
    if turns is not None:  # LLaVA's turns say who speaks with "from"
        llava = isinstance(turns, (list, tuple)) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
        conversation = (_from_llava if llava else _from_messages)(turns, row_images(row))
    else:
        conversation = _from_columns(row)
    check(conversation)
    return conversation


def _text(text: Any) -> dict[str, str]:
    if not isinstance(text, str):
        raise BadRow(f"a text part is {type(text).__name__}, not a string")
    return {"type": "text", "text": text}


def _from_messages(messages: Any, images: list[Any]) -> Conversation:
    if not isinstance(messages, (list, tuple)):
        raise BadRow(f"messages is {type(messages).__name__}, not a list of turns")
    turns, images_placed = [], False
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise BadRow(f"a turn is not a {{'role', 'content'}} dict: {message!r:.80}")
        content = message.get("content")
        if isinstance(content, str):
            parts = [_text(content)]
            if message["role"] == "user" and not images_placed:
                parts = [{"type": "image"} for _ in images] + parts
                images_placed = True
        elif isinstance(content, (list, tuple)):
            parts = [_part(part) for part in content]
            images_placed = images_placed or any(part["type"] == "image" for part in parts)
        else:
            raise BadRow(f"a {message['role']} turn has content of type {type(content).__name__}")
        turns.append({"role": message["role"], "content": parts})
    return Conversation(turns, images)


def _part(part: Any) -> dict[str, Any]:
    """One content part with its payload dropped (images come from the row's image column)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image":
        return {"type": "image"}
    if kind == "text":
        return _text(part.get("text"))
    raise BadRow(f"unknown content part {part!r:.80} (expected type 'image' or 'text')")


def _from_llava(turns: Any, images: list[Any]) -> Conversation:
    if not isinstance(turns, (list, tuple)):
        raise BadRow(f"conversations is {type(turns).__name__}, not a list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
            sender = turn.get("from") if isinstance(turn, dict) else turn
            raise BadRow(f"unknown LLaVA speaker {sender!r:.40} (expected one of {sorted(LLAVA_ROLES)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise BadRow(f"a LLaVA turn's value is {type(value).__name__}, not a string")
        parts = []
        for index, piece in enumerate(value.split(IMAGE_TOKEN)):
            if index:
                parts.append({"type": "image"})
            if piece.strip("\n"):  # LLaVA writes "<image>\n" before the question
                parts.append(_text(piece.strip("\n") if index else piece.rstrip("\n")))
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": parts})
    return Conversation(messages, images)


def _from_columns(row: dict[str, Any]) -> Conversation:
    """A caption row (user: the image; a captioning instruction is drawn later) or a question-answer row."""
    question, answer = row.get("question"), row.get("answer") or row.get("caption")
    user = [{"type": "image"} for _ in row_images(row)] + ([_text(question)] if question else [])
    return Conversation(
        [{"role": "user", "content": user}, {"role": "assistant", "content": [_text(answer or "")]}], row_images(row)
    )


def check(conversation: Conversation) -> None:
    """`BadRow` unless: known roles, a system turn only first, every turn with some content, at least one assistant
    turn with words (and no images), and one image per image part."""
    messages = conversation.messages
    for position, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise BadRow(f"unknown role {role!r} (expected one of {ROLES})")
        if role == "system" and position:
            raise BadRow("a system turn after the first")
        texts = [part["text"] for part in message["content"] if part["type"] == "text"]
        has_image = any(part["type"] == "image" for part in message["content"])
        if role == "assistant" and has_image:
            raise BadRow("an assistant turn holds an image")
        if not has_image and not any(text.strip() for text in texts):
            raise BadRow(f"an empty {role} turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow("no assistant turn")
    if conversation.num_image_parts != len(conversation.images):
        raise BadRow(f"{conversation.num_image_parts} image markers for {len(conversation.images)} images")


def independent_exchanges(conversation: Conversation) -> list[Conversation]:
    """The conversation as one conversation per user/assistant exchange, for turns that do not depend on each other
    (several questions about the same images): each keeps the system turn and gets the first user turn's images
    before its text, as if it were a row of its own. `BadRow` if a later user turn brings images of its own."""
    system = [m for m in conversation.messages if m["role"] == "system"]
    exchanges: list[list[dict[str, Any]]] = []
    for message in conversation.messages:
        if message["role"] == "user":
            exchanges.append([message])
        elif message["role"] == "assistant":
            if not exchanges:
                raise BadRow("an assistant turn before the first user turn")
            exchanges[-1].append(message)
    image_parts = [part for part in exchanges[0][0]["content"] if part["type"] == "image"]  # `check`: one exists
    split = [Conversation(system + exchanges[0], conversation.images)]
    for exchange in exchanges[1:]:
        user, *answers = exchange
        if any(part["type"] == "image" for part in user["content"]):
            raise BadRow("a later user turn has images of its own: independent turns share the first turn's images")
        split.append(
            Conversation([*system, {**user, "content": image_parts + user["content"]}, *answers], conversation.images)
        )
    return [c for c in split if any(m["role"] == "assistant" for m in c.messages)]
