"""Shared fixtures: a tiny processor (tokenizers built locally) and tiny models; nothing is downloaded."""

import numpy as np
import pytest
import torch
from warnings_policy import attribute_to_callers

from smolvlm_qformer import hardware
from smolvlm_qformer.testing_utils import save_tiny_vlm, tiny_config, tiny_processor

attribute_to_callers()


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, processor):
    """A stage-2 folder as a user has it: a tiny saved model + processor, remote code included."""
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm"), processor)


@pytest.fixture
def config(processor):
    return tiny_config(processor, losses=["itc", "itm", "itg"])


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(4)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fake_cpu(monkeypatch):
    """`fake_cpu(native_bf16, capability="AVX512", vendor="AuthenticAMD", amx=False)`: the CPU that
    `hardware.bf16_is_fast` sees (AVX512-BF16 if `native_bf16`), with a bf16 matmul timed at 4x float32 (a figure
    only reported)."""

    def fake(native_bf16: bool, capability: str = "AVX512", vendor: str = "AuthenticAMD", amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(hardware, "cpu_bf16_matmul_speedup", lambda: 4.0)

    return fake
