"""The processor: chat template, image placeholder expansion, padding, decoding and image modes."""

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm_qformer.processing_smolvlm_qformer import IMAGE_TOKEN


def test_chat_template_puts_the_image_between_system_and_user_prompt(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_TOKEN}What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default = processor.build_prompt("What colour?")
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>")


def test_markers_expand_to_num_query_tokens_and_plain_prompts_get_one(processor, images):
    batch = processor(images=images[:2], text=["What colour?", "Is there a circle on the left?"])
    n = processor.num_query_tokens
    assert (batch.input_ids == processor.image_token_id).sum(dim=1).tolist() == [n, n]
    assert batch.pixel_values.shape == (2, 3, 32, 32)
    assert "token_type_ids" not in batch
    # a prompt that already carries the marker is used as written
    formatted = processor.build_prompt("What colour?")
    again = processor(images=images[:1], text=formatted)
    assert again.input_ids[0].tolist() == batch.input_ids[0][batch.attention_mask[0].bool()].tolist()


def test_left_padding_for_generation(processor, images):
    batch = processor(images=images[:2], text=["What colour?", "Is there a big circle on the left side?"])
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1
    assert (batch.input_ids[0][batch.attention_mask[0] == 0] == processor.tokenizer.pad_token_id).all()


def test_images_alone_get_the_captioning_prompt(processor, images):
    batch = processor(images=images[:2])
    assert batch.input_ids[0].tolist() == processor.default_prompt_ids
    assert processor.decode(batch.input_ids[0], skip_special_tokens=True).strip().endswith("assistant")


def test_decoding_skips_the_image_token(processor, images):
    batch = processor(images=images[:1], text="What colour?")
    text = processor.batch_decode(batch.input_ids, skip_special_tokens=True)[0]
    assert IMAGE_TOKEN not in text and "What colour?" in text
    assert processor.post_process_image_text_to_text(batch.input_ids)[0] == text


def test_marker_and_image_counts_must_agree(processor, images):
    with pytest.raises(ValueError, match="markers for 2 images"):
        processor(images=images[:2], text=[processor.build_prompt("a"), "no marker here"])
    with pytest.raises(ValueError, match="images and text only"):
        processor(images=images[:1], text="a", videos=[1])
    with pytest.raises(ValueError, match="pass images, text or both"):
        processor()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA"])
def test_any_pil_mode_becomes_rgb(processor, mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    pixel_values = processor(images=image, text="What colour?").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32) and torch.isfinite(pixel_values).all()


def test_retrieval_inputs_use_the_qformer_tokenizer_and_truncate(processor, images):
    batch = processor.retrieval_inputs(images=images[:2], text=["a red circle", "word " * 500], max_length=16)
    assert batch.input_ids.shape == (2, 16)
    assert batch.input_ids[0, 0] == processor.qformer_tokenizer.cls_token_id
    assert batch.pixel_values.shape == (2, 3, 32, 32)


def test_save_and_load_round_trip(processor, tmp_path, images):
    processor.save_pretrained(tmp_path)
    loaded = type(processor).from_pretrained(tmp_path)
    a = processor(images=images[:2], text=["What colour?", "Shape?"])
    b = loaded(images=images[:2], text=["What colour?", "Shape?"])
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert loaded.num_query_tokens == processor.num_query_tokens
    assert loaded.qformer_tokenizer("a red circle").input_ids == processor.qformer_tokenizer("a red circle").input_ids


def test_training_and_inference_build_the_same_prompt_ids(processor, images):
    """What stage 2 trains on (the collator's prompt, before the answer) is exactly what generation is given."""
    from smolvlm_qformer.data import ChatCollator, PromptConfig

    prompts = PromptConfig(system_prompts=["Answer briefly."], caption_prompts=["Describe the image."])
    collator = ChatCollator(processor, prompts=prompts)
    rows = [
        {"image": images[0], "question": "What colour is the shape?", "answer": "red", "sample_index": 0},
        {"image": images[1], "caption": "a blue circle", "sample_index": 1},  # a caption row: the instruction
    ]
    batch = collator(rows)
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        prompt_length = int((labels != -100).nonzero()[0])  # the first answer token
        inference = processor(
            images=[row["image"]], text=[processor.build_prompt(row.get("question"), "Answer briefly.")]
        )
        assert ids[:prompt_length].tolist() == inference.input_ids[0].tolist()


def test_serving_engines_can_count_and_place_the_image_tokens(processor, images):
    """What serving engines (vLLM's transformers backend) ask a processor: tokens and `pixel_values` rows per image
    size, each marker's expansion (`text_replacement_offsets`, the layout transformers 5's processors return) and the
    token types."""
    counts = processor._get_num_multimodal_tokens(image_sizes=[(40, 48), (500, 20)])
    assert counts.num_image_tokens == [processor.num_query_tokens] * 2 and counts.num_image_patches == [1, 1]
    assert processor._get_num_multimodal_tokens().num_image_tokens is None

    prompts = [f"{IMAGE_TOKEN}a{IMAGE_TOKEN}b", f"c{IMAGE_TOKEN}"]
    batch = processor(images=images[:3], text=prompts, return_text_replacement_offsets=True)
    assert batch.input_ids.shape[0] == 2 and isinstance(batch.input_ids, torch.Tensor)
    offsets = batch["text_replacement_offsets"]
    assert [len(per_prompt) for per_prompt in offsets] == [2, 1]
    for prompt, per_prompt in zip(prompts, offsets, strict=True):
        expanded = prompt.replace(IMAGE_TOKEN, processor.replace_image_token())
        for entry in per_prompt:
            assert entry["type"] == "image" and entry["text"] == IMAGE_TOKEN
            assert entry["replacement"] == IMAGE_TOKEN * processor.num_query_tokens
            assert prompt[slice(*entry["span"])] == IMAGE_TOKEN
            assert expanded[slice(*entry["new_span"])] == entry["replacement"]
    assert "text_replacement_offsets" not in processor(images=images[:1], text="What colour?")

    typed = processor(
        images=images[:2],
        text=["What colour?", "Is there a big circle on the left side?"],
        return_mm_token_type_ids=True,
    )
    torch.testing.assert_close(typed.mm_token_type_ids, (typed.input_ids == processor.image_token_id).long())
