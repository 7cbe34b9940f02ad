"""Interruptible inversions: deferred preemption, periodic checkpoints, and the trace (stage
starts, snapshots, attempts) saved inside them so a resumed cell keeps what it saw.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from gi_core.attacks import Progress
from storage.checkpoints import save_checkpoint

# Periodic saves also cover SIGTERM preemption and node failures. GI_CHECKPOINT_EVERY_S (read in
# the job process; sbatch and local jobs inherit the submitting environment) overrides it.
CHECKPOINT_EVERY_S = float(os.environ.get("GI_CHECKPOINT_EVERY_S", "120"))
TRACE_KEY = "gi_eval_trace"  # our own entry in a checkpoint beside the engine's state


class Preemption(Protocol):
    """Deferred preemption (tasks.executors.DeferredPreemption or `NoPreemption`)."""

    requested: bool

    def safe_point(self) -> None: ...


class NoPreemption:
    requested = False

    def safe_point(self) -> None:
        return None


@dataclass
class Trace:
    """What the progress callback sees and the attack result does not keep: the stage of each
    iteration (for run.curves()) and every restart's images at the snapshot iterations. Saved
    inside the checkpoint under TRACE_KEY, so a resumed cell keeps what it saw before."""

    snapshot_at: frozenset[int]
    stage_starts: dict[str, int]  # stage name -> first global iteration (0-based step index)
    snapshots: dict[int, torch.Tensor]  # iteration -> (R, B, C, H, W) in [0, 1], on the CPU
    # Schedule provenance (issue 20): this attempt's number, counting earlier attempts that left
    # a trace (a checkpoint, or a failure record); the global iteration the state resumes after.
    attempts: int = 1
    resumed_from: int | None = None

    @classmethod
    def resume(
        cls, state: dict[str, Any] | None, snapshots: Sequence[int], *, failed_before: bool = False
    ) -> Trace:
        saved = state.pop(TRACE_KEY, {}) if state is not None else {}
        starts = dict(saved.get("stage_starts", {}))
        earlier = int(saved.get("attempts", 1)) if state is not None else int(failed_before)
        resumed = None
        if state is not None:
            resumed = saved.get("iteration", _global_iteration(state, starts))
        return cls(
            frozenset(snapshots),
            starts,
            dict(saved.get("snapshots", {})),
            attempts=earlier + 1,
            resumed_from=resumed,
        )

    def around(self, inner: Callable[[Progress], None]) -> Callable[[Progress], None]:
        def on_progress(p: Progress) -> None:
            self.stage_starts.setdefault(p.stage, p.iteration - 1)
            if p.iteration in self.snapshot_at and p.render is not None:
                self.snapshots[p.iteration] = p.render().cpu()
            inner(p)

        return on_progress

    def saved(self, iteration: int) -> dict[str, Any]:
        """What a checkpoint taken after global `iteration` keeps of the trace."""
        return {
            "stage_starts": dict(self.stage_starts),
            "snapshots": dict(self.snapshots),
            "attempts": self.attempts,
            "iteration": iteration,
        }

    def stage_of(self, iteration: int) -> str:
        """The stage whose first step is the latest one at or before `iteration`."""
        started = [(start, name) for name, start in self.stage_starts.items() if start <= iteration]
        return max(started)[1] if started else ""

    def snapshot_arrays(self) -> dict[str, Any]:
        if not self.snapshots:
            return {}
        its = sorted(self.snapshots)
        return {
            "snapshots": torch.stack([self.snapshots[i] for i in its]).numpy(),
            "snapshot_iterations": np.asarray(its, dtype=np.int64),
        }


def _global_iteration(state: dict[str, Any], stage_starts: dict[str, int]) -> int:
    """A checkpoint written before its trace kept the iteration: its stage's first global step
    plus the step within that stage."""
    starts = sorted(stage_starts.values())
    stage = int(state.get("stage", 0))
    return (starts[stage] if stage < len(starts) else 0) + int(state.get("iteration", 0))


def _checkpointer(path: Any, preemption: Preemption, trace: Trace) -> Callable[[Progress], None]:
    """Save the attack state every CHECKPOINT_EVERY_S and when preemption is requested, then
    let the deferred preemption through (at an iteration boundary: the state is consistent)."""
    last = [time.monotonic()]

    def on_progress(p: Progress) -> None:
        due = time.monotonic() - last[0] >= CHECKPOINT_EVERY_S
        if (due or preemption.requested) and p.iteration < p.total:
            save_checkpoint(path, {**p.export_state(), TRACE_KEY: trace.saved(p.iteration)})
            last[0] = time.monotonic()
        preemption.safe_point()

    return on_progress
