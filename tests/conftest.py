"""Shared fixtures: a tiny processor (tokenizers built locally) and tiny models; nothing is downloaded."""

import numpy as np
import pytest
import torch
from warnings_policy import attribute_to_callers

from smolvlm_qformer.testing_utils import tiny_config, tiny_processor

attribute_to_callers()


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


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
