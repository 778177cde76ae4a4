"""Both training stages on generated coloured-shape data with tiny backbones: they learn, mask labels right,
train only what they should, resume exactly, read the feature cache, and skip bad rows."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainerCallback, TrainingArguments

from smolvlm_qformer import hardware
from smolvlm_qformer.data import (
    ChatCollator,
    DataArguments,
    IndexedDataset,
    PromptConfig,
    RetrievalCollator,
    build_feature_cache,
    decode_image,
    split_train_eval,
)
from smolvlm_qformer.hardware import bf16_is_fast, fast_dtype
from smolvlm_qformer.testing_utils import make_shapes_dataset, save_tiny_backbones
from smolvlm_qformer.training import (
    ModelArguments,
    QFormerTrainer,
    QFormerTrainingArguments,
    SmolVLMTrainingArguments,
    VLMTrainer,
    VLMTrainingArguments,
    build_stage1,
    build_stage2,
    save_stage2,
    train_qformer,
)
from smolvlm_qformer.training.run import apply_min_steps

CHANCE = 1 / 12  # 4 colours x 3 shapes
# transformers 5.24 renamed `gradient_checkpointing` (still accepted, with a FutureWarning) to this
CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in TrainingArguments.__dataclass_fields__
)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, processor):
    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"), processor)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return str(make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 192))


def _model_args(backbones, **kwargs) -> ModelArguments:
    return ModelArguments(
        vision_model=backbones["vision"],
        qformer_model=backbones["qformer"],
        language_model=backbones["language_model"],
        num_query_tokens=4,
        **kwargs,
    )


def _caption_data(shapes, **kwargs) -> DataArguments:
    return DataArguments(dataset="imagefolder", data_dir=shapes, eval_fraction=0.25, **kwargs)


def _vqa_data(shapes, **kwargs) -> DataArguments:
    return _caption_data(shapes, caption_column=None, question_column="question", answer_column="answer", **kwargs)


def _training_args(output_dir, **kwargs) -> SmolVLMTrainingArguments:
    defaults = dict(
        per_device_train_batch_size=12,
        per_device_eval_batch_size=12,
        learning_rate=2e-3,
        warmup_steps=5,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # the tests compare exact losses across code paths; bf16 is tested on its own
        disable_tqdm=True,
    )
    return SmolVLMTrainingArguments(output_dir=str(output_dir), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, backbones, shapes):
    """Stage 1 trained through its entry point; returns (output folder, metrics before, metrics after)."""
    output_dir = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model, processor = build_stage1(_model_args(backbones))
    train, evaluation = split_train_eval(_caption_data(shapes), seed=42)
    untrained = QFormerTrainer(
        model=model,
        args=_training_args(output_dir / "untrained"),
        eval_dataset=evaluation,
        data_collator=RetrievalCollator(processor),
    )
    before = untrained.evaluate()
    after = train_qformer(
        _model_args(backbones), _caption_data(shapes), _training_args(output_dir, num_train_epochs=30)
    )
    return output_dir, before, after


def test_stage1_lowers_itc_loss_and_retrieves_held_out_pairs(stage1):
    output_dir, before, after = stage1
    print(f"stage 1 held-out: {before} -> {after}")
    assert after["eval_loss"] < before["eval_loss"] - 0.5
    assert after["eval_image_to_text_accuracy"] >= 2.5 * CHANCE
    assert after["eval_text_to_image_accuracy"] >= 2.5 * CHANCE
    assert after["train_skipped_samples"] == 0
    assert (output_dir / "model.safetensors").exists() and (output_dir / "processor_config.json").exists()


def _greedy_matches(model, processor, rows) -> int:
    matches = 0
    for row in rows:
        inputs = processor(images=decode_image(row["image"]), text=row["question"])
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.decode(generated[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        matches += answer.strip() == row["answer"]
    return matches


def test_stage2_learns_answers_and_saves_a_folder_that_loads(stage1, backbones, shapes, tmp_path):
    model_args = ModelArguments(
        stage1_model=str(stage1[0]), language_model=backbones["language_model"], lora_r=8, lora_alpha=16
    )
    torch.manual_seed(0)
    model, processor = build_stage2(model_args)
    train, evaluation = split_train_eval(_vqa_data(shapes), seed=42)
    args = _training_args(
        tmp_path,
        num_train_epochs=40,
        learning_rate=5e-3,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=80,
        save_strategy="steps",
        save_steps=80,
        load_best_model_at_end=True,
    )
    trainer = VLMTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=ChatCollator(processor)
    )
    rows = [train[i] for i in range(24)]
    before, greedy_before = trainer.evaluate(), _greedy_matches(trainer.model, processor, rows)
    trainer.train()
    after, greedy_after = trainer.evaluate(), _greedy_matches(trainer.model, processor, rows)

    assert after["eval_loss"] < before["eval_loss"] / 4
    # held-out exact answers of a tiny random-vision model differ between transformers releases: better than untrained;
    # the learning itself is pinned by the loss above and the greedy matches below
    assert after["eval_answer_accuracy"] > before["eval_answer_accuracy"]
    print(f"greedy exact matches on {len(rows)} training prompts: {greedy_before} -> {greedy_after}")
    assert greedy_after >= greedy_before + len(rows) // 3

    save_stage2(trainer.model, processor, tmp_path / "final")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "final", trust_remote_code=True).eval()
    assert _greedy_matches(reloaded, processor, rows) == greedy_after
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("vqa", [False, True])
def test_labels_cover_exactly_the_answer_and_end_of_turn_for_every_prompt(processor, shapes, vqa):
    data = (_vqa_data if vqa else _caption_data)(shapes)
    train, _ = split_train_eval(data, seed=42)
    prompts = PromptConfig()
    collator = ChatCollator(processor, prompts=prompts)
    row = train[0]
    seen = set()
    for sample_index in range(200):  # enough draws to meet every system x caption prompt pair
        batch = collator([{**row, "sample_index": sample_index}])
        seen.add(prompts.draw(0, sample_index))
        labels = batch["labels"][0]
        answer_tokens = labels[labels != -100]
        expected = (row["answer"] if vqa else row["caption"]) + "<|im_end|>"
        assert processor.tokenizer.decode(answer_tokens) == expected
        first_answer = int((labels != -100).nonzero()[0])
        assert (batch["input_ids"][0, first_answer:][: len(answer_tokens)] == answer_tokens).all()
    if not vqa:
        assert len(seen) == len(prompts.system_prompts) * len(prompts.caption_prompts)


@pytest.mark.parametrize(
    ("targets", "train_qformer"),
    [("attention", True), ("all-linear", True), ("all-linear", False)],
    ids=["attention", "all-linear", "all-linear-qformer-frozen"],
)
def test_stage2_changes_only_qformer_adapter_and_lora(backbones, shapes, processor, tmp_path, targets, train_qformer):
    model_args = _model_args(
        backbones, lora_r=4, lora_alpha=8, lora_target_modules=targets, train_qformer=train_qformer
    )
    model, processor = build_stage2(model_args)
    lora_layers = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
    attention, mlp = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
    assert lora_layers == (attention | mlp if targets == "all-linear" else attention)
    assert not any("lora_" in name for name, _ in model.named_parameters() if "vision_model" in name)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train, _ = split_train_eval(_vqa_data(shapes), seed=42)
    trainer = VLMTrainer(
        model=model,
        args=_training_args(tmp_path, max_steps=3),
        train_dataset=train,
        data_collator=ChatCollator(processor),
    )
    trainer.train()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    frozen = {n for n in before if "vision_model" in n or ("language_model" in n and "lora_" not in n)}
    if not train_qformer:
        frozen |= {n for n in before if "qformer" in n}
    assert not changed & frozen, "frozen weights changed"
    assert all(model.get_parameter(name).requires_grad for name in changed)
    trained_parts = ["adapter", "lora_B"]
    if train_qformer:
        trained_parts += ["qformer.queries.modules_to_save.default", "crossattention"]
    for part in trained_parts:
        assert any(part in name for name in changed), f"no {part} weight was trained"
    # the Q-Former's text embeddings are never read by the query path: frozen, and not in the adapter
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert not any("word_embeddings" in name or "position_embeddings" in name for name in trainable)
    assert any("qformer.embeddings.LayerNorm.modules_to_save" in name for name in trainable) == train_qformer


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.parametrize("stage", [1, 2])
def test_resuming_after_a_stop_gives_the_uninterrupted_losses(backbones, shapes, tmp_path, stage):
    def trainer(output_dir, callbacks=()):
        torch.manual_seed(0)  # the same fresh weights each time, as a rerun of the same script would build
        if stage == 1:
            model, processor = build_stage1(_model_args(backbones))
            data, collator_cls, trainer_cls = _caption_data(shapes), RetrievalCollator, QFormerTrainer
        else:
            model, processor = build_stage2(_model_args(backbones, lora_r=4, lora_alpha=8))
            data, collator_cls, trainer_cls = _vqa_data(shapes), ChatCollator, VLMTrainer
        train, _ = split_train_eval(data, seed=42)
        args = _training_args(output_dir, max_steps=8, save_strategy="steps", save_steps=4)
        return trainer_cls(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=collator_cls(processor),
            callbacks=list(callbacks),
        )

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.train()
    interrupted = trainer(tmp_path / "b", callbacks=[_StopAt(4)])
    interrupted.train()
    assert max(_losses(interrupted)) == 4
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    expected, actual = _losses(uninterrupted), _losses(resumed)
    assert sorted(actual) == list(range(1, 9))  # 1-4 restored from the checkpoint's state, 5-8 trained again
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_training_from_the_feature_cache_gives_the_same_losses(backbones, shapes, tmp_path):
    model, processor = build_stage1(_model_args(backbones))
    train, _ = split_train_eval(_caption_data(shapes), seed=42)
    cache = build_feature_cache(model.vision_model, processor.image_processor, train, tmp_path / "cache", shard_size=16)
    pixels = processor.image_processor([decode_image(train[i]["image"]) for i in range(3)], return_tensors="pt")
    with torch.no_grad():
        expected = model.vision_model(**pixels).last_hidden_state
    torch.testing.assert_close(cache.get([0, 1, 2])[0].float(), expected, atol=2e-3, rtol=1e-3)

    def losses(dataset, output_dir):
        torch.manual_seed(0)
        fresh, _ = build_stage1(_model_args(backbones))
        trainer = QFormerTrainer(
            model=fresh,
            args=_training_args(output_dir, max_steps=5),
            train_dataset=dataset,
            data_collator=RetrievalCollator(processor),
        )
        trainer.train()
        return list(_losses(trainer).values())

    from_images = losses(train, tmp_path / "images")
    from_cache = losses(IndexedDataset(train.dataset, cache), tmp_path / "cached")
    assert from_cache == pytest.approx(from_images, rel=1e-3, abs=1e-3)


@pytest.mark.compile
def test_compiled_stage2_training_from_the_feature_cache_gives_the_eager_losses(
    backbones, shapes, tmp_path, monkeypatch
):
    """Trainer's own `--torch_compile` on stage 2 (the PeftModel, VLMTrainer, cached features): the eager losses."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # dropout draws eager's random numbers
    model, processor = build_stage1(_model_args(backbones))
    train, _ = split_train_eval(_vqa_data(shapes), seed=42)
    cache = build_feature_cache(model.vision_model, processor.image_processor, train, tmp_path / "cache")

    def losses(output_dir, **kwargs):
        torch.manual_seed(0)
        model, processor = build_stage2(_model_args(backbones, lora_r=4, lora_alpha=8))
        trainer = VLMTrainer(
            model=model,
            args=_training_args(output_dir, max_steps=3, **kwargs),
            train_dataset=IndexedDataset(train.dataset, cache),
            data_collator=ChatCollator(processor),
        )
        trainer.train()
        return list(_losses(trainer).values())

    eager = losses(tmp_path / "eager")
    compiled = losses(tmp_path / "compiled", torch_compile=True)
    assert len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_a_rebuild_keeps_finished_shards(backbones, shapes, tmp_path):
    model, processor = build_stage1(_model_args(backbones))
    train, _ = split_train_eval(_caption_data(shapes), seed=42)
    folder = tmp_path / "cache"
    build_feature_cache(model.vision_model, processor.image_processor, train, folder, shard_size=16)
    first = folder / "shard_00000.npy"
    mtime = first.stat().st_mtime_ns
    (folder / "shard_00001.npy").unlink()  # as if the build had died before this shard
    build_feature_cache(model.vision_model, processor.image_processor, train, folder, shard_size=16)
    assert first.stat().st_mtime_ns == mtime and (folder / "shard_00001.npy").exists()


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(backbones, shapes, tmp_path):
    folder = make_shapes_dataset(tmp_path / "messy", 24)
    (folder / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[5]["caption"] = "   "
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    metrics = train_qformer(
        _model_args(backbones),
        DataArguments(dataset="imagefolder", data_dir=str(folder), eval_fraction=0),
        _training_args(tmp_path / "out", num_train_epochs=2, per_device_train_batch_size=4),
    )
    assert metrics["train_skipped_samples"] == 2  # the corrupt image, once per epoch
    assert metrics["train_empty_text_rows"] == 1


def test_optimizer_groups_give_new_parts_their_rate_and_no_decay_to_norms_and_biases(backbones, tmp_path):
    model, processor = build_stage1(_model_args(backbones))
    args = _training_args(tmp_path, learning_rate=1e-4, new_parts_learning_rate=1e-3, weight_decay=0.1)
    trainer = QFormerTrainer(model=model, args=args, data_collator=RetrievalCollator(processor))
    optimizer = trainer.create_optimizer()
    settings = {
        id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
    }
    named = dict(model.named_parameters())
    layer = "qformer.transformer.layer.0"
    assert settings[id(named["qformer.queries.weight"])] == (1e-3, 0.1)
    assert settings[id(named[f"{layer}.attention.q_lin.weight"])] == (1e-4, 0.1)
    assert settings[id(named[f"{layer}.crossattention.q_lin.weight"])] == (1e-3, 0.1)
    assert settings[id(named[f"{layer}.sa_layer_norm.weight"])] == (1e-4, 0.0)
    assert settings[id(named["vision_proj.bias"])] == (1e-3, 0.0)
    assert settings[id(named["temperature"])] == (1e-3, 0.0)
    assert not any(id(p) in settings for name, p in named.items() if name.startswith("vision_model"))


def test_bf16_defaults_to_what_the_device_runs_natively_and_can_be_turned_off(tmp_path, monkeypatch, fake_cpu):
    for native in (True, False):
        fake_cpu(native)
        assert bf16_is_fast("cpu") is native
        assert fast_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
        assert _training_args(tmp_path, bf16=None).bf16 is native
    fake_cpu(True, capability="AVX2")  # kernels held to AVX2 (ATEN_CPU_CAPABILITY=avx2): bf16 would be emulated
    assert bf16_is_fast("cpu") is False
    # AVX512-BF16 without AMX on an Intel Xeon: its bf16 matmul ran at 0.56x float32; with AMX, several times faster
    fake_cpu(True, vendor="GenuineIntel")
    assert bf16_is_fast("cpu") is False and _training_args(tmp_path, bf16="auto").bf16 is False
    fake_cpu(True, vendor="GenuineIntel", amx=True)
    assert bf16_is_fast("cpu") is True
    fake_cpu(True)
    assert _training_args(tmp_path, bf16=False).bf16 is False
    assert _training_args(tmp_path, bf16="false").bf16 is False and _training_args(tmp_path, bf16="true").bf16 is True
    # a GPU that only emulates bf16 (pre-Ampere): slower, and Trainer refuses bf16 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bf16_is_fast("cuda") is False
    if not torch.cuda.is_available():  # no CUDA and no use_cpu: transformers would refuse bf16, so it stays off
        assert _training_args(tmp_path, bf16=None, use_cpu=False).bf16 is False


def test_bf16_auto_is_decided_by_the_hardware_never_by_a_timing(monkeypatch):
    decided = bf16_is_fast("cpu")
    monkeypatch.setattr(hardware, "cpu_bf16_matmul_speedup", lambda: 1 / 0)  # a timing would raise
    assert hardware.resolve_bf16("auto", "cpu") is decided and hardware.resolve_bf16(None, "cpu") is decided
    assert hardware.describe_cpu(timed=False)["bf16_is_fast"] is decided


def test_streaming_data_and_gradient_checkpointing(backbones, shapes, tmp_path):
    metrics = train_qformer(
        _model_args(backbones),
        _caption_data(shapes, streaming=True, max_samples=40),
        _training_args(tmp_path, max_steps=3, **{CHECKPOINTING: True}),
    )
    assert metrics["train_loss"] > 0 and metrics["train_skipped_samples"] == 0
    model, processor = build_stage2(_model_args(backbones, lora_r=4, lora_alpha=8))
    train, _ = split_train_eval(_vqa_data(shapes), seed=42)
    args = _training_args(tmp_path / "vlm", max_steps=2, **{CHECKPOINTING: True})
    VLMTrainer(model=model, args=args, train_dataset=train, data_collator=ChatCollator(processor)).train()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def test_checkpointed_stage1_computes_the_same_gradients(backbones, shapes, tmp_path):
    """Recomputing activations in the backward changes no gradient (the text-only ITC pass starts from frozen
    embeddings, which reentrant checkpointing alone would cut off)."""
    model, processor = build_stage1(_model_args(backbones))
    train, _ = split_train_eval(_caption_data(shapes), seed=42)
    batch = RetrievalCollator(processor)([train[i] for i in range(6)])
    batch.pop("num_skipped")  # the trainer's count

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both runs
        model(**batch).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    trainer = QFormerTrainer(
        model=model, args=_training_args(tmp_path, max_steps=1, learning_rate=0.0, **{CHECKPOINTING: True})
    )
    trainer.train_dataset, trainer.data_collator = train, RetrievalCollator(processor)
    trainer.train()  # switches checkpointing on the way a user's run does
    model.train()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    checkpointed = gradients()
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    plain = gradients()
    assert checkpointed.keys() == plain.keys()
    assert any("transformer.layer.0." in name for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_frozen_lm_dtype_auto_is_bf16_only_where_the_cpu_runs_it_natively(backbones, fake_cpu, native_bf16):
    """On an AVX2-only CPU a bf16 LM falls back to torch's generic GEMM (a demo step took 170 s instead of 3)."""
    fake_cpu(native_bf16)
    model, _ = build_stage2(_model_args(backbones, lora_r=4, frozen_lm_dtype="auto", lm_attn_implementation="eager"))
    expected = torch.bfloat16 if native_bf16 else torch.float32
    frozen = {p.dtype for p in model.get_decoder().parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {expected} and trainable == {torch.float32}  # LoRA, Q-Former and adapter stay float32
    assert model.get_decoder().config._attn_implementation == "eager"


def test_a_missing_backbone_names_the_flag_to_pass(backbones, tmp_path):
    """Stage 1 saves the LM's tokenizer for stage 2: without Hub access the default LM id cannot load, and the error
    says which argument to set."""
    args = _model_args(backbones)
    args.language_model = str(tmp_path / "no-such-lm")
    with pytest.raises(OSError, match="--language_model"):
        build_stage1(args)


def test_min_steps_gives_a_small_dataset_more_epochs(tmp_path):
    args = _training_args(tmp_path, per_device_train_batch_size=8, num_train_epochs=3, min_steps=50)
    apply_min_steps(args, 100)  # 3 epochs of 13 batches: 39 steps
    assert args.max_steps == 50
    large = _training_args(tmp_path, per_device_train_batch_size=8, num_train_epochs=3, min_steps=50)
    apply_min_steps(large, 1000)  # 375 steps: the epochs rule
    assert large.max_steps == -1
    capped = _training_args(tmp_path, per_device_train_batch_size=8, max_steps=10, min_steps=50)
    apply_min_steps(capped, 100)  # an explicit max_steps wins
    assert capped.max_steps == 10


def test_each_command_parses_its_stage_defaults(tmp_path):
    from smolvlm_qformer.cli import parse_arguments

    out = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    stage1 = parse_arguments((QFormerTrainingArguments,), out)[0]
    stage2 = parse_arguments((VLMTrainingArguments,), [*out, "--learning_rate", "3e-4"])[0]
    assert (stage1.learning_rate, stage1.per_device_train_batch_size, stage1.min_steps) == (1e-4, 16, 150)
    assert (stage2.learning_rate, stage2.min_steps, stage2.warmup_steps) == (3e-4, 240, 10)
