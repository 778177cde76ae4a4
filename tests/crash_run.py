"""Runs a `smolvlm-qformer` command with a SIGKILL injected at a chosen point, for the crash-safety tests.

`python tests/crash_run.py KILL RECORD COMMAND [ARGS...]`

KILL: "none"; "save:<step>" (killed while writing checkpoint-<step>, after its weights, before its optimizer);
"step:<step>" (killed in the middle of training step <step>, after its forward pass); "shard:<n>" (killed halfway
through writing the features of cache shard n).
RECORD: a file that gets the sample indices of every training batch, one JSON list per line, or "-".
"""

import io
import json
import os
import signal
import sys

import numpy as np
from transformers import Trainer

from smolvlm_qformer.cli import main
from smolvlm_qformer.data import collators
from smolvlm_qformer.training import trainers


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(step: int) -> None:
    save = Trainer._save_optimizer_and_scheduler

    def saving(self, output_dir):
        if self.state.global_step == step:
            die()
        save(self, output_dir)

    Trainer._save_optimizer_and_scheduler = saving


def kill_during_step(step: int) -> None:
    compute_loss = trainers._SmolVLMTrainer.compute_loss

    def computing(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step == step - 1:  # global_step counts finished steps
            die()
        return loss

    trainers._SmolVLMTrainer.compute_loss = computing


def kill_while_writing_shard(shard: int) -> None:
    save = np.save

    def saving(file, array, *args, **kwargs):
        if getattr(file, "name", "").endswith(f"shard_{shard:05d}.npy.tmp"):
            buffer = io.BytesIO()
            save(buffer, array)
            file.write(buffer.getvalue()[: buffer.tell() // 2])
            file.flush()
            die()
        save(file, array, *args, **kwargs)

    np.save = saving


def record_batches(path: str) -> None:
    for collator in (collators.RetrievalCollator, collators.ChatCollator):

        def recording(self, rows, collate=collator.__call__):
            with open(path, "a") as f:
                f.write(json.dumps([row["sample_index"] for row in rows]) + "\n")
            return collate(self, rows)

        collator.__call__ = recording


if __name__ == "__main__":
    kill, record, *command = sys.argv[1:]
    if kill != "none":
        where, value = kill.split(":")
        {"save": kill_while_saving, "step": kill_during_step, "shard": kill_while_writing_shard}[where](int(value))
    if record != "-":
        record_batches(record)
    main(command)
