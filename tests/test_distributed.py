"""Both trainers under 2-process DDP on CPU (gloo, through `torchrun`): the ranks stay identical, and stage 1's ITC
losses equal a single-process run over the same global batches, which needs the cross-rank gather with gradients.

Same global batch, by construction: Trainer's sampler shuffles once with the run's seed, and accelerate hands rank r
the batches r, r + N, ... of that order; so with N ranks of B samples, step t's global batch is the single-process
run's batch t at N x B. The test checks the batches themselves too. Dropout is off so both runs compute the same.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvlm_qformer.testing_utils import make_shapes_dataset, save_tiny_backbones

sys.path.insert(0, str(Path(__file__).parent))
from ddp_run import run_stage1  # noqa: E402

WORLD_SIZE, BATCH, STEPS = 2, 6, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("ddp")
    backbones = save_tiny_backbones(root / "backbones", processor)
    qformer_config = Path(backbones["qformer"]) / "config.json"
    config = json.loads(qformer_config.read_text())
    qformer_config.write_text(json.dumps({**config, "dropout": 0.0, "attention_dropout": 0.0}))
    data_dir = str(make_shapes_dataset(root / "shapes", 48))
    setup = {"backbones": backbones, "data_dir": data_dir, "batch_size": BATCH, "steps": STEPS}
    (root / "setup.json").write_text(json.dumps(setup))
    return root, setup


def test_two_process_ddp_matches_one_process_over_the_global_batch(setup):
    root, config = setup
    out = root / "out"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    command += [str(Path(__file__).parent / "ddp_run.py"), str(root / "setup.json"), str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]

    reports = [json.loads((out / f"stage1-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [report["world_size"] for report in reports] == [WORLD_SIZE] * WORLD_SIZE
    for stage in (1, 2):
        ranks = [load_file(out / f"stage{stage}-rank{rank}.safetensors") for rank in range(WORLD_SIZE)]
        assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0]), stage

    single, single_batches = run_stage1(config, str(root / "single"), WORLD_SIZE * BATCH)
    for step in range(STEPS):
        per_rank = [report["batches"][step] for report in reports]
        assert len(set(per_rank[0]) & set(per_rank[1])) == 0  # the ranks see different samples...
        assert sorted(per_rank[0] + per_rank[1]) == sorted(single_batches[step])  # ...that make up the global batch
    expected = {entry["step"]: entry["loss"] for entry in single.state.log_history if "loss" in entry}
    actual = {int(step): loss for step, loss in reports[0]["losses"].items()}
    print(f"DDP losses {actual} vs single process {expected}")
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], rel=1e-4), step
