"""Stage 2 with TRL's `SFTTrainer` instead of our `VLMTrainer`: LoRA on a messages + images dataset (TRL's
conversational vision format), loss on the assistant's words only.

    # from a stage-1 folder and the LM:
    python examples/train_vlm_trl.py --stage1_model smolvlm-qformer-stage1 \\
        --dataset HuggingFaceH4/llava-instruct-mix-vsft --output_dir out/stage2-trl
    # or go on training a saved stage-2 folder:
    python examples/train_vlm_trl.py --model smolvlm-qformer --dataset my-dataset-folder --output_dir out/more

`--dataset` is anything `load_dataset` reads, or a `save_to_disk` folder, with a `messages` column (roles system /
user / assistant; content a string or a list of {"type": "image"} / {"type": "text"} parts) and an `images` list
(or `image`) column. Any `SFTConfig` flag works too (`--max_steps`, `--learning_rate`, ...). The output folder holds
the LoRA-merged model + processor (loads with AutoModelForImageTextToText and pipeline("image-text-to-text"),
trust_remote_code=True) and the unmerged adapter in adapter/.
"""

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from smolvlm_qformer import SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerProcessor
from smolvlm_qformer.configuration_smolvlm_qformer import DEFAULT_BACKBONES
from smolvlm_qformer.hardware import bf16_is_fast


@dataclass
class ScriptArguments:
    dataset: str = "HuggingFaceH4/llava-instruct-mix-vsft"
    split: str = "train"
    model: str | None = None
    """A saved stage-2 folder (loaded through AutoModelForImageTextToText); else built from the two below."""
    stage1_model: str = "smolvlm-qformer-stage1"
    language_model: str = DEFAULT_BACKBONES["language_model"]
    lora_r: int = 64


def load_model(script: ScriptArguments):
    if script.model is not None:
        model = AutoModelForImageTextToText.from_pretrained(script.model, trust_remote_code=True)
        return model, AutoProcessor.from_pretrained(script.model, trust_remote_code=True)
    processor = SmolVLMQFormerProcessor.from_backbones(language_model=script.language_model, stage1=script.stage1_model)
    model = SmolVLMQFormerForConditionalGeneration.from_backbones(
        stage1=script.stage1_model, language_model=script.language_model, processor=processor
    )
    return model, processor


def load_data(script: ScriptArguments) -> datasets.Dataset:
    if (Path(script.dataset) / "dataset_info.json").exists() or (Path(script.dataset) / "state.json").exists():
        return datasets.load_from_disk(script.dataset)
    return datasets.load_dataset(script.dataset, split=script.split)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.set_defaults(use_cpu=device == "cpu", bf16=bf16_is_fast(device))  # bf16 only where it is native
    script, config = parser.parse_args_into_dataclasses(argv)
    config.assistant_only_loss = True  # else TRL trains on every token, image placeholders and user turns included
    model, processor = load_model(script)
    lora = LoraConfig(
        r=script.lora_r,
        lora_alpha=2 * script.lora_r,
        target_modules=model.lora_target_modules("all-linear"),
        modules_to_save=model.trained_modules,  # the Q-Former's query path and the adapter train in full
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=load_data(script), processing_class=processor, peft_config=lora
    )
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(Path(config.output_dir) / "adapter")
    trainer.model.merge_and_unload().save_pretrained(config.output_dir)
    processor.save_pretrained(config.output_dir)
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
