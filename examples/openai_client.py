"""Ask a served model about an image through the `openai` client: the image goes as a base64 data URL.

    smolvlm-qformer serve FOLDER                      # in the vLLM environment; serves on 127.0.0.1:8000
    python examples/openai_client.py IMAGE ["QUESTION"] [--base-url http://127.0.0.1:8000/v1]

Without a question the model captions the image. Greedy (temperature 0), so the answer is the one
`smolvlm-qformer ask` / `model.generate` gives. `openai` comes with vLLM; elsewhere `pip install openai`.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path

CAPTION_INSTRUCTION = "Describe the image."  # the processor's captioning prompt


def image_data_url(path: str | Path) -> str:
    """The image file's bytes as a `data:` URL, the way a client sends a local image to an OpenAI-style server."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="an image file")
    parser.add_argument("question", nargs="?", help="default: caption the image")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root")
    parser.add_argument("--max-tokens", type=int, default=30)
    args = parser.parse_args(argv)
    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key="unused")  # vLLM checks no key unless started with --api-key
    model = client.models.list().data[0].id  # the folder the server was started on
    content = [
        {"type": "image_url", "image_url": {"url": image_data_url(args.image)}},
        {"type": "text", "text": args.question or CAPTION_INSTRUCTION},
    ]
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0.0,
        max_tokens=args.max_tokens,
    )
    answer = response.choices[0].message.content
    print(answer)
    return answer


if __name__ == "__main__":
    main()
