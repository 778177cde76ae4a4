"""Caption images (or answer a question about them) with a trained model folder or Hub repo.

python examples/caption.py --model smolvlm-qformer photo1.jpg photo2.png
python examples/caption.py --model smolvlm-qformer --question "What colour is the car?" photo.jpg
"""

import argparse

from PIL import Image
from transformers import pipeline


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smolvlm-qformer")
    parser.add_argument("--question", default="Describe the image.")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)

    vlm = pipeline("image-text-to-text", model=args.model, trust_remote_code=True)
    answers = []
    for path in args.images:
        output = vlm(
            images=Image.open(path), text=args.question, max_new_tokens=args.max_new_tokens, return_full_text=False
        )
        answers.append(output[0]["generated_text"].strip())
        print(f"{path}: {answers[-1]}")
    return answers


if __name__ == "__main__":
    main()
