"""Save a tiny model + processor, or load a saved folder in a process where `smolvlm_qformer` is not importable.

`python tests/roundtrip.py save FOLDER` writes the folder and `FOLDER/expected.json` (logits, answer, caption);
`python tests/roundtrip.py load FOLDER` loads it through every Auto class and pipeline this transformers line has
and prints a JSON report. The two run under either transformers line (see test_loading.py).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

QUESTION = "What colour is the shape?"
NEW_TOKENS = 6


def test_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def save(folder: Path) -> None:
    from smolvlm_qformer.testing_utils import tiny_config, tiny_generation_model, tiny_processor

    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_generation_model(tiny_config(processor))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "expected.json").write_text(json.dumps(expected_outputs(model, processor)))


def expected_outputs(model, processor) -> dict:
    image = test_image()
    batch = processor(images=[image], text=[QUESTION])
    with torch.no_grad():
        logits = model(**batch).logits[0, -3:]
    answer = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    caption = model.generate(pixel_values=batch.pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "input_ids": batch.input_ids[0].tolist(),
        "logits": logits.tolist(),
        "answer": processor.decode(answer[0, batch.input_ids.shape[1] :], skip_special_tokens=True),
        "caption": processor.decode(caption[0], skip_special_tokens=True),
        "transformers": transformers.__version__,
    }


def load(folder: Path) -> dict:
    sys.modules["smolvlm_qformer"] = None  # everything must come from the folder's remote code
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    expected = json.loads((folder / "expected.json").read_text())
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    auto_classes = {"AutoModelForImageTextToText": AutoModelForImageTextToText}
    if transformers.__version__.startswith("4."):
        from transformers import AutoModelForVision2Seq

        auto_classes["AutoModelForVision2Seq"] = AutoModelForVision2Seq

    batch = processor(images=[test_image()], text=[QUESTION])
    report = {
        "transformers": transformers.__version__,
        "input_ids_equal": batch.input_ids[0].tolist() == expected["input_ids"],
    }
    for name, auto_class in auto_classes.items():
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(**batch).logits[0, -3:]
        if name == "AutoModelForImageTextToText":  # the headless model's hidden states through the same head
            headless = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            report["AutoModel_class"] = type(headless).__name__
            with torch.no_grad():
                hidden = headless(**batch).last_hidden_state[0, -3:]
            report["AutoModel_max_abs_diff"] = float(
                (model.lm_head(hidden) - torch.tensor(expected["logits"])).abs().max()
            )
            report["AutoModel_is_remote_code"] = type(headless).__module__.startswith("transformers_modules")
        report[f"{name}_max_abs_diff"] = float((logits - torch.tensor(expected["logits"])).abs().max())
        report[f"{name}_is_remote_code"] = type(model).__module__.startswith("transformers_modules")

    generate_kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    vqa = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    out = vqa(images=test_image(), text=QUESTION, return_full_text=False, generate_kwargs=generate_kwargs)
    report["pipeline_answer"] = out[0]["generated_text"]
    if transformers.__version__.startswith("4."):  # captioning with no prompt, as 4.x's image-to-text pipeline does it
        captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
        report["image_to_text_caption"] = captioner(test_image(), generate_kwargs=generate_kwargs)[0]["generated_text"]
    return report


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "save":
        save(folder)
    else:
        print("REPORT " + json.dumps(load(folder)))
