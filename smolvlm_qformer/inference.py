"""The one inference path: load a saved folder for generation, and generate for many images (or their cached vision
features), with optional questions, in batches, returning the new text only.

`smolvlm-qformer caption` / `ask`, `smolvlm-qformer evaluate` and the demo all generate through `generate_texts`;
the chat app and the lmms-eval plugin, whose prompts are whole conversations, through the two steps it is made of
(`encode_prompts`, `generate_new_texts`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .data.images import decode_or_skip
from .hardware import fast_dtype


def load_for_inference(
    folder: str, device: str = "cpu", dtype: torch.dtype | None = None, compile: bool = False
) -> tuple[Any, Any]:
    """(model, processor) of a saved stage-2 folder through the Auto classes, as anyone would load it, in eval mode
    on `device`; `dtype` defaults to bf16 where the device runs it natively (`hardware.fast_dtype`).

    With `compile`, generation is compiled (`compile_generation`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, use_safetensors=True, dtype=dtype or fast_dtype(device)
    )
    if compile:
        compile_generation(model)
    return model.to(device).eval(), processor


def compile_generation(model: Any) -> None:
    """Makes `model.generate` decode with a static KV cache through a `torch.compile`d forward (transformers' own
    automatic compilation, asked for on every device, CPUs included): the same greedy tokens. The first calls
    compile (minutes on a 2-core CPU), so it pays off only over many calls, e.g. a server (docs/benchmarks.md)."""
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config


def check_context(model: Any, prompt_length: int, max_new_tokens: int) -> None:
    """A `ValueError` when a prompt and the tokens to generate do not fit the LM's context."""
    context = model.config.text_config.max_position_embeddings
    if prompt_length + max_new_tokens > context:
        raise ValueError(
            f"a prompt is {prompt_length} tokens; with {max_new_tokens} new tokens it exceeds the model's context of "
            f"{context} tokens: shorten the question"
        )


@torch.no_grad()
def generate_texts(
    model: Any,
    processor: Any,
    images: Sequence[Any] | torch.Tensor,
    questions: Sequence[str | None] | None = None,
    names: Sequence[object] | None = None,
    system_prompt: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 30,
) -> Iterator[str | None]:
    """Greedy answers (a caption where the question is None), one per image, yielded batch by batch.

    `images` are what a dataset row or a user holds (PIL images, arrays, paths, `{"bytes", "path"}`), decoded a batch
    at a time so memory stays flat in their number; an image that cannot be read yields None, logged with its name
    (`names`, else its index). Or a (num_images, N, Dv) tensor of the vision encoder's outputs (a feature cache).
    Prompts are the chat prompts stage 2 trains on (`processor.build_prompt`); generation uses the KV cache, and the
    image runs once, at prefill.
    """
    questions = [None] * len(images) if questions is None else list(questions)
    names = range(len(images)) if names is None else names
    if not len(questions) == len(names) == len(images):
        raise ValueError(f"{len(questions)} questions and {len(names)} names for {len(images)} images")
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        if isinstance(images, torch.Tensor):
            yield from _generate(model, processor, images[batch], questions[batch], system_prompt, max_new_tokens)
            continue
        decoded = [decode_or_skip(value, name) for value, name in zip(images[batch], names[batch], strict=True)]
        readable = [(image, q) for image, q in zip(decoded, questions[batch], strict=True) if image is not None]
        texts = iter(
            _generate(
                model, processor, [i for i, _ in readable], [q for _, q in readable], system_prompt, max_new_tokens
            )
            if readable
            else ()
        )
        yield from (None if image is None else next(texts) for image in decoded)


def _generate(
    model: Any,
    processor: Any,
    images: list[Any] | torch.Tensor,
    questions: list[str | None],
    system_prompt: str | None,
    max_new_tokens: int,
) -> list[str]:
    """One batch: the new text of each prompt, stripped."""
    prompts = [processor.build_prompt(question, system_prompt) for question in questions]
    inputs = encode_prompts(model, processor, prompts, images, max_new_tokens)
    return generate_new_texts(model, processor, inputs, max_new_tokens)


def encode_prompts(
    model: Any, processor: Any, prompts: list[str], images: list[Any] | torch.Tensor | None, max_new_tokens: int
) -> dict[str, torch.Tensor]:
    """The model's inputs for chat prompts (one `<image>` marker per image, in order; `images` may be a tensor of
    cached vision features), left-padded, on the model's device. A `ValueError` when an image cannot be read or a
    prompt with `max_new_tokens` does not fit the LM's context."""
    if isinstance(images, torch.Tensor):
        inputs = processor(text=prompts, vision_hidden_states=images)
    else:
        inputs = processor(images=images, text=prompts)
    check_context(model, inputs["input_ids"].shape[1], max_new_tokens)
    return {name: value.to(model.device) for name, value in inputs.items()}


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    """`generate`'s sampling arguments: greedy at temperature 0, else sampling at that temperature."""
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}


@torch.no_grad()
def generate_new_texts(
    model: Any,
    processor: Any,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    streamer: Any = None,
) -> list[str]:
    """The new text of each prompt of `encode_prompts`' inputs, stripped; generation uses the KV cache and stops at
    the end of the turn. `streamer` (a transformers streamer, for a batch of one) gets the tokens as they come."""
    prompt_length = inputs["input_ids"].shape[1]
    generated = model.generate(
        **inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling_kwargs(temperature)
    )
    return [text.strip() for text in processor.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)]
