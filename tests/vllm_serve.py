"""vLLM's transformers backend serving a saved tiny folder, token for token against transformers' `generate`.

`python tests/vllm_serve.py FOLDER [--server] [--template NAME]` (in an environment with vLLM and this package
installed) saves a tiny model + processor to FOLDER (its LM's tokenizer with the chat template of NAME, an entry of
`shared/data/chat_templates.json`, or none: ChatML), generates greedily from it with transformers and with vLLM
(each in a fresh process that loads only the folder's remote code), and prints `REPORT {json}`: per case whether the
prompt ids and the generated ids agree, the timings, and `all_equal`. Exit status 0 when everything agrees.
test_vllm_serving.py runs it with `$SMOLVLM_VLLM_PYTHON`.

vLLM is its offline `LLM`, or with `--server` its OpenAI-compatible server as `smolvlm-qformer serve FOLDER` starts it
(on 127.0.0.1, a free port, stopped at the end), asked through HTTP chat completions with the images as base64 data
URLs; two bad images (garbage base64, and base64 of bytes that are no image) go in between, and their error
responses are in the report.

The cases: captioning and questions on three different images and a text-only prompt (batched in one `LLM.generate`
call, or sent to the server at once), and the chat entry point (or the request after the bad images). A served case
named `what:name` is compared with the transformers case `name`. The tiny LM's heads are 32 wide (the smallest head
size vLLM's CPU attention takes; the test models' 8 it does not).
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

NEW_TOKENS = 24
HEAD_DIM = 32
QUESTION = "What colour is the shape?"
CAPTION_INSTRUCTION = "Describe the image."  # what `build_prompt(None)` asks; the compared prompt ids check it
EXAMPLE_CLIENT = Path(__file__).resolve().parents[1] / "examples" / "openai_client.py"
TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat_templates.json"
SERVER_START_TIMEOUT = 600  # seconds; the tiny folder's server is up in about 40 s on an idle 2-core machine
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


def save(folder: Path, template: str | None = None) -> None:
    import torch

    from smolvlm_qformer import SmolVLMQFormerProcessor
    from smolvlm_qformer.testing_utils import build_chat_tokenizer, tiny_config, tiny_generation_model, tiny_processor

    torch.manual_seed(0)
    processor = tiny_processor()
    if template is not None:
        entry = json.loads(TEMPLATES.read_text(encoding="utf-8"))[template]
        processor = SmolVLMQFormerProcessor(
            processor.image_processor,
            build_chat_tokenizer(entry),
            processor.qformer_tokenizer,
            num_query_tokens=processor.num_query_tokens,
        )
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
    names = [name for name, _, _ in CASES] + ["chat:question_image0"]
    cases = {
        name: {"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids)}
        for name, o in zip(names, outputs, strict=True)
    }
    return {"cases": cases, "seconds": seconds}


def data_url(image: Image.Image) -> str:
    """`image` as a base64 PNG data URL (PNG is lossless: the server decodes the very pixels transformers gets)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(folder: str, question: str | None, seed: int | None, url: str | None = None) -> dict:
    """A greedy chat-completions body for one case (the image as `url` if given), asking for the token ids."""
    if seed is None:
        content = question
    else:
        image = {"type": "image_url", "image_url": {"url": url or data_url(test_image(seed))}}
        content = [image, {"type": "text", "text": question or CAPTION_INSTRUCTION}]
    return {
        "model": folder,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": NEW_TOKENS,
        # the tiny model's `generate` never stops (no eos in its generation config); vLLM would stop at the tokenizer's
        "ignore_eos": True,
        "return_token_ids": True,  # vLLM's extension: `prompt_token_ids` and each choice's `token_ids`
    }


def post(port: int, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """An HTTP request to the server (POST with a JSON body, GET without): the status and the decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: str, port: int, log: Path) -> subprocess.Popen:
    """`smolvlm-qformer serve FOLDER` on `port`, in a process group of its own; returns once it answers. In float32
    as transformers generates (the CPU default is bfloat16 where the CPU has it)."""
    command = [sys.executable, "-m", "smolvlm_qformer.cli", "serve", folder, "--port", str(port), "--dtype", "float32"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + SERVER_START_TIMEOUT
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n{log.read_text()[-6000:]}")
        try:
            if post(port, "/v1/models", timeout=5)[0] == 200:
                return server
        except OSError:  # not listening yet
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"the server did not answer within {SERVER_START_TIMEOUT} s:\n{log.read_text()[-6000:]}")


def stop_server(server: subprocess.Popen, timeout: float = 60) -> bool:
    """SIGTERM to the server's process group (the API server and its engine process), SIGKILL after `timeout`;
    whether it stopped on SIGTERM."""
    if server.poll() is not None:
        return True
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return False


def run_example_client(port: int, scratch: Path) -> dict:
    """examples/openai_client.py asking QUESTION about image 0 (saved as a PNG file), as a user runs it."""
    image = scratch / "image0.png"
    test_image(0).save(image)
    flags = ["--base-url", f"http://127.0.0.1:{port}/v1", "--max-tokens", str(NEW_TOKENS)]
    result = subprocess.run(
        [sys.executable, str(EXAMPLE_CLIENT), str(image), QUESTION, *flags], capture_output=True, text=True, timeout=300
    )
    return {
        "returncode": result.returncode,
        "answer": result.stdout.removesuffix("\n"),
        "stderr": result.stderr[-3000:],
    }


def with_openai_server(folder: str) -> dict:
    """All the cases sent at once (the server batches them), two bad images, then a good request again, then the
    example client."""
    port, start = free_port(), time.time()
    server = start_server(folder, port, Path(folder).parent / "server.log")
    seconds = {"start": round(time.time() - start, 1)}

    def ask(case: tuple[str, str | None, int | None], url: str | None = None) -> tuple[int, dict]:
        return post(port, "/v1/chat/completions", chat_request(folder, case[1], case[2], url))

    try:
        start = time.time()
        with ThreadPoolExecutor(len(CASES)) as pool:
            answers = list(pool.map(ask, CASES))
        seconds["requests"] = round(time.time() - start, 2)
        names = [name for name, _, _ in CASES]
        bad = {
            "garbage_base64": "data:image/png;base64,%%%not*base64%%%",
            "not_an_image": "data:image/png;base64," + base64.b64encode(b"these bytes are no image").decode(),
        }
        bad_images = {}
        for what, url in bad.items():
            status, body = ask(CASES[1], url)
            bad_images[what] = {"status": status, "message": body.get("error", {}).get("message")}
        answers.append(ask(CASES[1]))
        names.append("after_bad_images:" + CASES[1][0])
        example = run_example_client(port, Path(folder).parent)
    finally:
        start = time.time()
        stopped_on_sigterm = stop_server(server)
        seconds["stop"] = round(time.time() - start, 1)
    failed = {name: answer for name, answer in zip(names, answers, strict=True) if answer[0] != 200}
    if failed:
        raise RuntimeError(f"requests failed: {failed}")
    cases = {
        name: {"prompt": body["prompt_token_ids"], "tokens": body["choices"][0]["token_ids"]}
        for name, (_, body) in zip(names, answers, strict=True)
    }
    return {
        "cases": cases,
        "seconds": seconds,
        "bad_images": bad_images,
        "stopped_on_sigterm": stopped_on_sigterm,
        "example_client": example,
    }


SIDES = {"transformers": with_transformers, "vllm": with_vllm, "server": with_openai_server}


def _in_fresh_process(side: str, folder: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--side", side, str(folder)], capture_output=True, text=True, timeout=900
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("SIDE ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"{side} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
    return json.loads(line[len("SIDE ") :])


def compare(folder: Path, side: str = "vllm", template: str | None = None) -> dict:
    """transformers against `side` ("vllm", the offline `LLM`, or "server") on a tiny folder saved to `folder` (with
    `template`'s chat template, see `save`)."""
    save(folder, template)
    reference, served = _in_fresh_process("transformers", folder), _in_fresh_process(side, folder)
    cases = {}
    for name, got in served["cases"].items():
        expected = reference["cases"][name.split(":")[-1]]
        cases[name] = {
            "prompt_equal": got["prompt"] == expected["prompt"],
            "tokens_equal": got["tokens"] == expected["tokens"],
            "transformers": expected["tokens"],
            "vllm": got["tokens"],
        }
    if "example_client" in served:  # its answer is the text of generate's tokens up to the end of sequence
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        tokens = reference["cases"]["question_image0"]["tokens"]
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
        # bytes of a character cut off by the token limit decode as U+FFFD here; vLLM's detokenizer holds them back
        expected = tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
        served["example_client"]["expected"] = expected
    return {
        "all_equal": all(case["prompt_equal"] and case["tokens_equal"] for case in cases.values()),
        # different images must give different outputs, or the comparison would not show the image is used
        "distinct_outputs": len({tuple(case["transformers"]) for case in cases.values()}),
        "seconds": {"transformers": reference["seconds"], side: served["seconds"]},
        "cases": cases,
        **{key: value for key, value in served.items() if key not in ("cases", "seconds")},
    }


if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run at import
    if sys.argv[1] == "--side":
        sys.modules["smolvlm_qformer"] = None  # everything must come from the folder's remote code
        print("SIDE " + json.dumps(SIDES[sys.argv[2]](sys.argv[3])), flush=True)
    else:
        flags = sys.argv[2:]
        template = flags[flags.index("--template") + 1] if "--template" in flags else None
        report = compare(Path(sys.argv[1]), "server" if "--server" in flags else "vllm", template)
        print("REPORT " + json.dumps(report))
        sys.exit(0 if report["all_equal"] else 1)
