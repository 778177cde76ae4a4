"""Stage 2 of the reference recipe: SmolLM2-135M-Instruct learns to read the stage-1 Q-Former's 32 query embeddings
(through an MLP adapter) with LoRA (r=64 on q/k/v/o: 7.4M parameters), loss on the caption tokens only.

    python examples/train_vlm.py --stage1_model smolvlm-qformer-stage1 --output_dir out/stage2

The output folder holds the LoRA-merged model + processor (loads with AutoModelForImageTextToText and
pipeline("image-text-to-text"), trust_remote_code=True) and the unmerged adapter in adapter/.
"""

import sys

from smolvlm_qformer.cli import parse_arguments
from smolvlm_qformer.data import DataArguments
from smolvlm_qformer.training import ModelArguments, VLMTrainingArguments, train_vlm

REFERENCE = {
    "stage1_model": "smolvlm-qformer-stage1",
    "dataset": "pixparse/cc3m-wds",
    "image_column": "jpg",
    "caption_column": "txt",
    "max_samples": 50_000,
    "output_dir": "smolvlm-qformer",
    "num_train_epochs": 5,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "learning_rate": 1e-4,  # the Q-Former
    "new_parts_learning_rate": 5e-4,  # the MLP adapter and LoRA
    "warmup_steps": 100,
    "max_grad_norm": 1.0,
    "eval_strategy": "steps",
    "eval_steps": 500,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "logging_steps": 20,
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    arguments = parse_arguments((ModelArguments, DataArguments, VLMTrainingArguments), argv, REFERENCE)
    return train_vlm(*arguments)


if __name__ == "__main__":
    main(sys.argv[1:])
