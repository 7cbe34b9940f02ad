"""What one job-array element does: run a chunk of cells in sequence, idempotently.

Each function is load -> one gi_core call -> save. Victims, generators and the LPIPS network
are loaded once per element (cached per process) and reused by every cell of the chunk. A cell
whose outputs are committed does nothing, so a requeued or resubmitted element only finishes
what is missing.

The package, along its seams (each module imports only those above it; rows names the
inversion's prepared cell only for the type checker):
  training   the trained-victim stage: FedAvg rounds, stored once per run (decision 271)
  cache      the device and the per-process victim (trained ones from the run) and generator
  resume     preemption, periodic checkpoints and the trace saved in them
  gradient   the gradient job
  rows       result rows: metrics columns and their provenance
  inversion  the inversion job, one cell or a group of one batch key
  chunk      one job-array element: units of cells, failures recorded
Importers use `tasks.work` itself; the names below are its interface.
"""

from tasks.work.cache import device, generator_for, victim_for, victim_sha256_for
from tasks.work.chunk import Chunk, run_chunk
from tasks.work.gradient import _refuse_degenerate, generate_gradient
from tasks.work.inversion import invert, invert_group
from tasks.work.resume import CHECKPOINT_EVERY_S, TRACE_KEY, NoPreemption, Preemption, Trace
from tasks.work.training import train_stage, trained_state

__all__ = [
    "CHECKPOINT_EVERY_S",
    "TRACE_KEY",
    "Chunk",
    "NoPreemption",
    "Preemption",
    "Trace",
    "_refuse_degenerate",
    "device",
    "generate_gradient",
    "generator_for",
    "invert",
    "invert_group",
    "run_chunk",
    "train_stage",
    "trained_state",
    "victim_for",
    "victim_sha256_for",
]
