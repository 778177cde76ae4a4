"""Atomic checkpoints for `Trainer`: a `checkpoint-<step>` folder that exists is complete.

Trainer writes a checkpoint in place, so a run killed mid-save leaves a partial folder that
`resume_from_checkpoint="auto"` then picks. `AtomicCheckpointTrainer` writes it into `tmp-checkpoint-<step>/`
(which Trainer's lookups ignore), syncs it to disk and renames it into place once every process has written its
part. It overrides two of Trainer's private methods (`_get_output_dir`, `_save_checkpoint`), the one shim being the
checkpoint rotation, which moved from a Trainer method (4.x) to `trainer_utils.rotate_checkpoints` (5.x).
"""

from __future__ import annotations

import os
import shutil

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# `tmp-checkpoint-<step>` is not a checkpoint to Trainer's `checkpoint-<step>` lookups (resume, rotation).
STAGING_PREFIX = "tmp-"


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointTrainer(Trainer):
    """`Trainer` whose checkpoints appear only once complete."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._checkpoint_staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        """The run folder; while a checkpoint is being written, its staging folder (see `_save_checkpoint`)."""
        return self._checkpoint_staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Trainer's checkpoint, written into `tmp-checkpoint-<step>/` and renamed to `checkpoint-<step>` once every
        process has written its part: a checkpoint folder that exists is complete. (Trainer itself writes in place,
        so a run killed mid-save leaves a partial folder that `resume_from_checkpoint` then picks.)"""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed mid-save
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-<step>, rotation a no-op there
        finally:
            self._checkpoint_staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name))
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, staged: str, final: str) -> None:
        """Moves a complete staged checkpoint into place (after syncing it to disk, so it survives a power cut)."""
        if self.state.best_model_checkpoint == staged:  # Trainer recorded the folder it wrote into
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        for folder, _, files in os.walk(staged):
            for file in files:
                _fsync(os.path.join(folder, file))
        staging = os.path.dirname(staged)
        if os.path.isdir(final):  # the same step saved again: replaced once the new one is in place
            os.replace(final, os.path.join(staging, "replaced"))
        os.replace(staged, final)
        _fsync(os.path.dirname(final))
        shutil.rmtree(staging)

    def _rotate(self, run_dir: str) -> None:
        """Trainer's `save_total_limit` rotation, over the run folder."""
        if hasattr(self, "_rotate_checkpoints"):  # transformers 4.x
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
