"""vLLM's transformers backend serving a saved tiny folder, token for token against transformers' `generate`.

`python tests/vllm_serve.py FOLDER` (in an environment with vLLM and this package installed) saves a tiny model +
processor to FOLDER, generates greedily from it with transformers and with vLLM's offline `LLM` (each in a fresh
process that loads only the folder's remote code), and prints `REPORT {json}`: per case whether the prompt ids and
the generated ids agree, the timings, and `all_equal`. Exit status 0 when everything agrees. test_vllm_serving.py
runs it with `$SMOLVLM_VLLM_PYTHON`.

The cases: captioning and questions on three different images, batched in one `generate` call, a text-only
prompt, and the chat entry point. The tiny LM's heads are 32 wide (the smallest head size vLLM's CPU attention
takes; the test models' 8 it does not).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

NEW_TOKENS = 24
HEAD_DIM = 32
QUESTION = "What colour is the shape?"
CASES = [  # name, question (None: the captioning prompt), image seed (None: text only)
    ("caption_image0", None, 0),
    ("question_image0", QUESTION, 0),
    ("caption_image1", None, 1),
    ("question_image2", "Is there a circle on the left?", 2),
    ("text_only", "Say something.", None),
]


def test_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40 + seed, 48, 3), dtype=np.uint8))


def save(folder: Path) -> None:
    import torch

    from smolvlm_qformer.testing_utils import tiny_config, tiny_generation_model, tiny_processor

    torch.manual_seed(0)
    processor = tiny_processor()
    config = tiny_config(processor)
    config.text_config.head_dim = HEAD_DIM
    model = tiny_generation_model(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _prompt(processor, question: str | None, seed: int | None) -> str:
    if seed is None:
        messages = [{"role": "user", "content": question}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor.build_prompt(question)


def with_transformers(folder: str) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    out, start = {}, time.time()
    for name, question, seed in CASES:
        images = None if seed is None else [test_image(seed)]
        batch = processor(images=images, text=[_prompt(processor, question, seed)])
        ids = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        out[name] = {"prompt": batch.input_ids[0].tolist(), "tokens": ids[0, batch.input_ids.shape[1] :].tolist()}
    out["chat_question_image0"] = out["question_image0"]
    return {"cases": out, "seconds": {"generate": round(time.time() - start, 2)}}


def with_vllm(folder: str) -> dict:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    start = time.time()
    llm = LLM(
        model=folder,
        trust_remote_code=True,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=1 << 28,  # the CPU backend otherwise reserves most of the machine's memory
    )
    seconds = {"load": round(time.time() - start, 1)}
    requests = []
    for _, question, seed in CASES:
        request = {"prompt": _prompt(processor, question, seed)}
        if seed is not None:
            request["multi_modal_data"] = {"image": test_image(seed)}
        requests.append(request)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    start = time.time()
    outputs = llm.generate(requests, params)
    seconds["generate"] = round(time.time() - start, 2)
    content = [{"type": "image_pil", "image_pil": test_image(0)}, {"type": "text", "text": QUESTION}]
    start = time.time()
    outputs += llm.chat([{"role": "user", "content": content}], params)
    seconds["chat"] = round(time.time() - start, 2)
    names = [name for name, _, _ in CASES] + ["chat_question_image0"]
    cases = {
        name: {"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids)}
        for name, o in zip(names, outputs, strict=True)
    }
    return {"cases": cases, "seconds": seconds}


def _in_fresh_process(side: str, folder: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--side", side, str(folder)], capture_output=True, text=True, timeout=900
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("SIDE ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"{side} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
    return json.loads(line[len("SIDE ") :])


def compare(folder: Path) -> dict:
    save(folder)
    reference, served = _in_fresh_process("transformers", folder), _in_fresh_process("vllm", folder)
    cases = {}
    for name, expected in reference["cases"].items():
        got = served["cases"][name]
        cases[name] = {
            "prompt_equal": got["prompt"] == expected["prompt"],
            "tokens_equal": got["tokens"] == expected["tokens"],
            "transformers": expected["tokens"],
            "vllm": got["tokens"],
        }
    return {
        "all_equal": all(case["prompt_equal"] and case["tokens_equal"] for case in cases.values()),
        # different images must give different outputs, or the comparison would not show the image is used
        "distinct_outputs": len({tuple(case["transformers"]) for case in cases.values()}),
        "seconds": {"transformers": reference["seconds"], "vllm": served["seconds"]},
        "cases": cases,
    }


if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run at import
    if sys.argv[1] == "--side":
        sys.modules["smolvlm_qformer"] = None  # everything must come from the folder's remote code
        run = with_transformers if sys.argv[2] == "transformers" else with_vllm
        print("SIDE " + json.dumps(run(sys.argv[3])), flush=True)
    else:
        report = compare(Path(sys.argv[1]))
        print("REPORT " + json.dumps(report))
        sys.exit(0 if report["all_equal"] else 1)
