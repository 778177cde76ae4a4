"""Offline quickstart: assemble a tiny SmolVLM-QFormer, answer a question about an image, save the folder and load
it back through `AutoModelForImageTextToText` and `pipeline("image-text-to-text")` with `trust_remote_code=True`.

With Hub access, swap the tiny parts for the real ones:
    model = SmolVLMQFormerForConditionalGeneration.from_backbones()  # the reference backbones: DEFAULT_BACKBONES
"""

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, pipeline

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration
from smolvlm_qformer.testing_utils import tiny_config, tiny_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="where to save the model folder (default: a temp dir)")
    args = parser.parse_args()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="smolvlm-qformer-")

    torch.manual_seed(0)
    processor = tiny_processor()
    model = SmolVLMQFormerForConditionalGeneration(tiny_config(processor)).eval()
    image = Image.fromarray(np.full((64, 64, 3), (200, 30, 30), dtype=np.uint8))

    inputs = processor(images=image, text="What colour is the image?")
    answer_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print("prompt:", processor.decode(inputs.input_ids[0], skip_special_tokens=True).replace("\n", " | "))
    print("answer (untrained):", repr(processor.decode(answer_ids[0, inputs.input_ids.shape[1] :])))

    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir, trust_remote_code=True)
    diff = (reloaded(**inputs).logits - model(**inputs).logits).abs().max().item()
    print(f"saved to {output_dir}; reloaded with AutoModelForImageTextToText, max |logit diff| = {diff:.2e}")
    vqa = pipeline("image-text-to-text", model=output_dir, trust_remote_code=True)
    print("pipeline:", vqa(images=image, text="What colour is the image?", max_new_tokens=8, return_full_text=False))


if __name__ == "__main__":
    main()
