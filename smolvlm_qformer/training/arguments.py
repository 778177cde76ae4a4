"""Command-line / YAML arguments of both training stages (parsed with `HfArgumentParser`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..configuration_smolvlm_qformer import DEFAULT_BACKBONES
from ..hardware import BF16_CHOICES, resolve_bf16

# transformers 5.24 renamed `gradient_checkpointing_kwargs` (a deprecated alias until v6) to this
CHECKPOINTING_KWARGS = next(
    name
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
    if name in TrainingArguments.__dataclass_fields__
)

# transformers 5 replaced `group_by_length=True` with `train_sampling_strategy="group_by_length"`
GROUP_BY_LENGTH = (
    {"train_sampling_strategy": "group_by_length"}
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__
    else {"group_by_length": True}
)


def groups_by_length(args: TrainingArguments) -> bool:
    """Whether `args` ask for batches of rows of similar length (`GROUP_BY_LENGTH`)."""
    return all(getattr(args, name, None) == value for name, value in GROUP_BY_LENGTH.items())


@dataclass
class ModelArguments:
    """Which pretrained parts to assemble (Hub ids or local folders), and the new parts' sizes."""

    vision_model: str = DEFAULT_BACKBONES["vision"]
    qformer_model: str = DEFAULT_BACKBONES["qformer"]
    language_model: str = DEFAULT_BACKBONES["language_model"]
    """Any causal LM on the Hub or in a folder (safetensors), with its tokenizer and chat template."""
    stage1_model: str | None = None
    """Stage 2: the stage-1 output folder (vision encoder + trained Q-Former + processor)."""
    num_query_tokens: int | None = None
    """Learnable queries, the image tokens the LM sees: 32 by default; stage 2 takes stage 1's."""
    losses: list[str] = field(default_factory=lambda: ["itc"])
    """Stage-1 losses, any of itc / itm / itg."""
    loss_weights: list[float] | None = None
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.1
    lora_target_modules: str = "attention"
    """Which of the LM's linear projections get LoRA: "attention" (its attention blocks'), "all-linear" (those and its
    MLPs'), found per architecture (`SmolVLMQFormerForConditionalGeneration.lora_target_modules`); anything else is
    a regex over full module names."""
    train_qformer: bool = False
    """Stage 2 also trains the Q-Former's query path (BLIP-2's recipe). Off by default: at the stage-2 learning rate
    its outputs could collapse to one soft prompt, the same for every image, after which the LM never learned to
    read the image (`docs/experiments/demo.md`); stage 1 has aligned it already."""
    frozen_lm_dtype: str | None = None
    """Stage 2: hold the frozen LM weights in this dtype ("bfloat16", "float32", or "auto": bfloat16 where the device
    runs it natively and faster, see `hardware.bf16_is_fast`); LoRA and the saved, merged model stay float32.
    Default: as loaded (float32)."""
    lm_attn_implementation: str | None = None
    """Stage 2: the LM's attention implementation ("sdpa", "eager", ...). Default: the LM's own. On CPU, "eager"
    trains faster than SDPA's CPU kernels on short (~40-token) sequences (`docs/training.md`, "Precision")."""


@dataclass
class SmolVLMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the learning rate of the parts that start from scratch.

    Stage 1: pretrained DistilBERT weights train at `learning_rate`; queries, cross-attention, projections, heads
    and temperature at `new_parts_learning_rate`. Stage 2: the Q-Former at `learning_rate`; the MLP adapter and
    LoRA at `new_parts_learning_rate`. `bf16` is "auto" (decided from the training device's hardware,
    `hardware.resolve_bf16`), "true" or "false", and a bool once parsed.
    Activation checkpointing defaults to torch's non-reentrant kind (5.x's default) on every release: 4.x's reentrant
    default needs inputs that require gradients and warns on each frozen vision-encoder layer.
    """

    new_parts_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of the newly initialised parts (default: 5 x learning_rate)"}
    )
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 mixed precision: auto (on where the hardware runs bf16 natively and faster: CUDA GPUs with "
            "bf16; with --use_cpu, CPUs with AMX or AMD's AVX512-BF16; see smolvlm_qformer.hardware), true or false. "
            "The choice is logged and recorded as train_bf16 in all_results.json",
            "choices": list(BF16_CHOICES),
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "the collators read the raw image/caption columns: keep them"}
    )
    min_steps: int = field(
        default=0,
        metadata={
            "help": "train at least this many optimizer steps: a small dataset gets more epochs than "
            "num_train_epochs (never fewer); ignored when max_steps is set"
        },
    )

    def __post_init__(self) -> None:
        # "auto" decided for the training device (transformers allows bf16 on a CPU only with use_cpu)
        self.bf16 = resolve_bf16(self.bf16, "cpu" if self.use_cpu else "cuda")
        if getattr(self, CHECKPOINTING_KWARGS) is None:
            setattr(self, CHECKPOINTING_KWARGS, {"use_reentrant": False})
        super().__post_init__()


def _default(value, help: str):
    return field(default=value, metadata={"help": help})


@dataclass
class QFormerTrainingArguments(SmolVLMTrainingArguments):
    """Stage 1's defaults (`train-qformer`), for hundreds to tens of thousands of image-text pairs: 10 warm-up
    steps, batches of 16 (ITC's negatives), and at least 150 steps, so that a few hundred photos are seen
    about ten times while a large set trains `num_train_epochs` (docs/training.md, "Training on your own photos")."""

    learning_rate: float = _default(1e-4, "DistilBERT's weights; the new parts train at 5x")
    warmup_steps: int = _default(10, "learning-rate warm-up steps")
    per_device_train_batch_size: int = _default(16, "image-text pairs a step (the contrastive loss's batch)")
    min_steps: int = _default(150, "train at least this many steps (more epochs on a small dataset)")


@dataclass
class VLMTrainingArguments(SmolVLMTrainingArguments):
    """Stage 2's defaults (`train-vlm`): the adapter and LoRA at 1e-3 (5 x `learning_rate`) after 10 warm-up steps,
    and at least 240 steps, so that a few hundred photos are seen about eight times while a large set
    trains `num_train_epochs` (docs/training.md, "Training on your own photos")."""

    learning_rate: float = _default(2e-4, "the Q-Former's (with --train_qformer); the adapter and LoRA train at 5x")
    warmup_steps: int = _default(10, "learning-rate warm-up steps")
    min_steps: int = _default(240, "train at least this many steps (more epochs on a small dataset)")
