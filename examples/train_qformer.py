"""Stage 1 of the reference recipe: align a DistilBERT Q-Former (32 queries) with a frozen ViT-B/16 on the first
50,000 Conceptual Captions pairs with the image-text contrastive loss.

    python examples/train_qformer.py --output_dir out/stage1
    python examples/train_qformer.py --losses itc itm itg --loss_weights 1 1 1 --output_dir out/stage1
    python examples/train_qformer.py config.yaml            # the same arguments from a YAML / JSON file

Any `load_dataset` source works: --dataset imagefolder --data_dir my_images/ (with metadata.jsonl), or parquet /
webdataset shards with --data_files. `smolvlm-qformer cache-features` + --feature_cache skips the ViT entirely.
"""

import sys

from smolvlm_qformer.cli import parse_arguments
from smolvlm_qformer.data import DataArguments
from smolvlm_qformer.training import ModelArguments, QFormerTrainingArguments, train_qformer

REFERENCE = {
    # an image-bearing copy of Conceptual Captions (webdataset shards: jpg + txt)
    "dataset": "pixparse/cc3m-wds",
    "image_column": "jpg",
    "caption_column": "txt",
    "max_samples": 50_000,
    "output_dir": "smolvlm-qformer-stage1",
    "num_train_epochs": 10,
    "per_device_train_batch_size": 32,
    "learning_rate": 1e-4,
    "warmup_steps": 100,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "logging_steps": 20,
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    arguments = parse_arguments((ModelArguments, DataArguments, QFormerTrainingArguments), argv, REFERENCE)
    return train_qformer(*arguments)


if __name__ == "__main__":
    main(sys.argv[1:])
