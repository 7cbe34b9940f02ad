"""Where everything of a run lives: every path into a run directory is named here (decision 222).

    <run>/grid.yaml                                frozen copy of the spec that created the run
    <run>/history/grid-<time>-<pid>.yaml           specs it had before a rerun extended it
    <run>/store/gradients/<gradient id>.zarr.zip   one Zarr group per gradient cell
    <run>/store/reconstructions/<cell id>.zarr.zip one Zarr group per inversion cell
    <run>/metrics/method=<m>/part-<cell id>.parquet  per-image rows; presence = committed
    <run>/curves/, <run>/failures/<cell id>.json   loss curves; failure records
    <run>/checkpoints/<cell id>.pt                 in-flight attack state (deleted on commit)
    <run>/victims/<lineage id>/round-<r>.pt        a victim after r FedAvg rounds (decision 271)
    <run>/victims/<lineage id>/round-<r>.json      its record: weights sha256, training samples
    <run>/jobs/<record>.json, <run>/jobs/CANCEL    job records; `gi-eval cancel`'s marker
    <run>/driver.json                              the detached driver's job (issue 18)
    <run>/reports/, <run>/logs/, <run>/quarantine/
    GIML runs: store/tasks/, store/thetas/, <kind>/{state.pt,done.json}, prior/ and eval/<label>/
    (nested runs); multigrad runs: multigrad/<cell id>.json.
    Siblings: <run>-tune (the tuning stage's run), <run>.specs (its round and tuned specs).

Other layers ask for a path by what it is (`run.checkpoints_dir`, `run.report_file("x.md")`),
never join names onto a run's root themselves, so this file is the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.metrics import part_filename, partition_dirname

GRID_FILE = "grid.yaml"
GROUP_SUFFIX = ".zarr.zip"
CURVES_DIR = "curves"
FAILURES_DIR = "failures"
QUARANTINE_DIR = "quarantine"
CANCEL_MARKER = "CANCEL"
DRIVER_FILE = "driver.json"
PLAN_FILE = "plan.json"  # under reports/: `gi-eval plan`'s estimate
# Created with the run, so that writers never race to create them.
SUBDIRS = ("store/gradients", "store/reconstructions", "metrics", "checkpoints", "reports", "logs")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory. Pure path arithmetic: nothing is read or created."""

    root: Path

    # --- the spec ---------------------------------------------------------------------------
    @property
    def grid_path(self) -> Path:
        return self.root / GRID_FILE

    @property
    def history_dir(self) -> Path:
        return self.root / "history"

    @property
    def is_run(self) -> bool:
        """True when the directory holds a run (its frozen grid.yaml exists)."""
        return self.grid_path.is_file()

    # --- cells ------------------------------------------------------------------------------
    @property
    def gradients_dir(self) -> Path:
        return self.root / "store" / "gradients"

    @property
    def reconstructions_dir(self) -> Path:
        return self.root / "store" / "reconstructions"

    def gradient_path(self, gradient_id: str) -> Path:
        return self.gradients_dir / f"{gradient_id}{GROUP_SUFFIX}"

    def reconstruction_path(self, cell_id: str) -> Path:
        return self.reconstructions_dir / f"{cell_id}{GROUP_SUFFIX}"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def part_path(self, method: str, cell_id: str) -> Path:
        return self.metrics_dir / partition_dirname(method) / part_filename(cell_id)

    @property
    def curves_dir(self) -> Path:
        return self.root / CURVES_DIR

    @property
    def failures_dir(self) -> Path:
        return self.root / FAILURES_DIR

    def failure_path(self, cell_id: str) -> Path:
        return self.failures_dir / f"{cell_id}.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.checkpoints_dir / f"{cell_id}.pt"

    # --- trained victims (decision 271) -----------------------------------------------------
    @property
    def victims_dir(self) -> Path:
        return self.root / "victims"

    def victim_lineage_dir(self, lineage: str) -> Path:
        """Every stored round of one training (victim, data, hyperparameters less rounds)."""
        return self.victims_dir / lineage

    def trained_victim_path(self, lineage: str, rounds: int) -> Path:
        return self.victim_lineage_dir(lineage) / f"round-{rounds}.pt"

    def trained_victim_record(self, lineage: str, rounds: int) -> Path:
        return self.victim_lineage_dir(lineage) / f"round-{rounds}.json"

    def victim_lock(self, lineage: str) -> Path:
        return self.victim_lineage_dir(lineage) / "train.lock"

    # --- jobs and drivers -------------------------------------------------------------------
    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def job_record(self, name: str) -> Path:
        return self.jobs_dir / f"{name}.json"

    @property
    def cancel_marker(self) -> Path:
        return self.jobs_dir / CANCEL_MARKER

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def driver_record(self) -> Path:
        return self.root / DRIVER_FILE

    @property
    def driver_script(self) -> Path:
        return self.logs_dir / "driver.sbatch"

    def driver_log(self, job_id: str) -> Path:
        """The detached driver's log; `job_id` "%j" gives the sbatch pattern."""
        return self.logs_dir / f"driver-{job_id}.log"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / QUARANTINE_DIR

    # --- reports ----------------------------------------------------------------------------
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def report_file(self, name: str) -> Path:
        """A file of reports/ (the report writers name their files; the folder is the run's)."""
        return self.reports_dir / name

    @property
    def plan_record(self) -> Path:
        return self.report_file(PLAN_FILE)

    # --- GIML and multigrad runs ------------------------------------------------------------
    @property
    def tasks_index(self) -> Path:
        return self.root / "store" / "tasks" / "index.json"

    def task_path(self, task_id: str) -> Path:
        return self.root / "store" / "tasks" / f"{task_id}{GROUP_SUFFIX}"

    def theta_path(self, round: int) -> Path:
        return self.root / "store" / "thetas" / f"round-{round}.pt"

    def training_state(self, kind: str) -> Path:
        return self.root / kind / "state.pt"

    def training_done(self, kind: str) -> Path:
        return self.root / kind / "done.json"

    @property
    def prior_root(self) -> Path:
        """A GIML run's generator pretraining, itself a run directory."""
        return self.root / "prior"

    def eval_root(self, label: str) -> Path:
        """A GIML run's evaluation grid of one generator, itself a run directory."""
        return self.root / "eval" / label

    def eval_spec(self, label: str) -> Path:
        return self.root / "eval" / f"{label}.yaml"

    def multigrad_result(self, cell_id: str) -> Path:
        return self.root / "multigrad" / f"{cell_id}.json"

    # --- siblings ---------------------------------------------------------------------------
    @property
    def tuning_root(self) -> Path:
        """The tuning stage's run beside this one (`tuning.stage: true`): <run>-tune."""
        return self.root.with_name(self.root.name + "-tune")

    @property
    def specs_dir(self) -> Path:
        """The specs a tuning run writes beside itself: <run>.specs (rounds, tuned.yaml)."""
        return self.root.with_name(self.root.name + ".specs")

    def round_spec(self, index: int) -> Path:
        return self.specs_dir / f"round-{index:04d}.yaml"

    @property
    def tuned_spec(self) -> Path:
        return self.specs_dir / "tuned.yaml"
