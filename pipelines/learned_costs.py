"""The cost table learns from finished cells (issue 18, Deliver 5).

After a run's report, the measured seconds per iteration of its committed cells are grouped by
what a price depends on (device, method, prior, victim and width, image size, batch, restarts,
torch threads) and stored twice: in the run (reports/learned-costs.json, what this run
measured) and in a user-level file that every later `gi-eval plan` reads (default
~/.cache/gi-eval/learned-costs.json, or $XDG_CACHE_HOME/gi-eval/..., or the path in
$GI_LEARNED_COSTS). A key measured again by a later run takes that run's price.

The cost model (pipelines.costmodel) prefers a learned price over the committed table when the
key matches exactly, and says so ("learned from RUN"). Only an exact key counts: a price
measured at 4 threads says little about 1 thread, and scaling is the table's job. Learned
prices never price a seconds-matched budget (tasks.budget): that price enters cell ids.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from storage import records
from storage.atomic import write_bytes_atomic
from storage.run import RunDir
from tasks.pricing import CellCost, protocol_key

ENV = "GI_LEARNED_COSTS"  # path of the user-level file (tests point it at a tmp directory)
RUN_FILE = records.LEARNED_COSTS_FILE  # under the run's reports/
FORMAT = 1
_COLUMNS = [
    "cell_id", "method", "generator", "victim", "victim_width", "image_size", "batch_size",
    "budget_restarts", "iterations", "wall_seconds", "device", "threads",
    "resumed_from_iteration", "protocol", "local_steps", "local_batch_size", "n_clients",
]  # fmt: skip


@dataclass(frozen=True)
class PriceKey:
    """What one iteration's price depends on; matched exactly."""

    device: str  # cpu | cuda
    method: str
    prior: str  # generator kind, "none" for pixel methods
    victim: str
    width: int | None  # None: the architecture's default width
    image_size: int
    batch: int
    restarts: int
    threads: int  # torch threads of the job
    protocol: str = "fedsgd"  # tasks.pricing.protocol_key (files written before it: fedsgd)

    def text(self) -> str:
        width = "" if self.width is None else f" w{self.width}"
        return (
            f"{self.method} / {self.prior} / {self.victim}{width} / {self.image_size} px / "
            f"B={self.batch} R={self.restarts} / {self.device}, {self.threads} thread(s)"
            + ("" if self.protocol == "fedsgd" else f" / {self.protocol}")
        )


@dataclass(frozen=True)
class Learned:
    key: PriceKey
    seconds_per_iteration: float  # mean over the cells
    cells: int
    run: str  # the run directory that measured it
    learned: str  # UTC time of the learning

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "key": asdict(self.key)}


def user_file() -> Path:
    """The user-level learned-cost file ($GI_LEARNED_COSTS, else the user's cache directory)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gi-eval" / "learned-costs.json"


def cell_key(cell: Any, *, device: str, threads: int) -> PriceKey:
    """The key of an InversionCell about to run on `device` with `threads` torch threads."""
    g = cell.gradient
    return PriceKey(
        device=device,
        method=cell.method,
        prior=cell.generator.kind if cell.generator is not None else "none",
        victim=g.victim.arch,
        width=g.victim.width,
        image_size=int(g.image_size),
        batch=int(g.batch_size),
        restarts=int(cell.config.restarts),
        threads=int(threads),
        protocol=protocol_key(
            g.protocol.kind,
            local.local_steps if (local := g.protocol.local) else None,
            local.local_batch_size if local else None,
            g.protocol.n_clients,
        ),
    )


def measure(run: RunDir) -> list[Learned]:
    """Seconds per iteration of the run's committed cells, per key. Left out: resumed cells
    (their wall time covers the last attempt only) and cells without a positive time, iteration
    count or thread count (rows written before those columns existed)."""
    if not run.committed_cells():
        return []
    df = run.metrics(columns=_COLUMNS).drop_duplicates("cell_id")
    df = df[df["resumed_from_iteration"].isna() & df["threads"].notna()]
    df = df[(df["iterations"] > 0) & (df["wall_seconds"] > 0)]
    if df.empty:
        return []
    df = df.assign(
        per_it=df["wall_seconds"] / df["iterations"],
        dev=df["device"].astype(str).str.split(":").str[0],
        prior=df["generator"].fillna("none"),
        protocol_key=[protocol_key(*r) for r in _protocol_columns(df).itertuples(index=False)],
    )
    stamp = _now()
    return [
        Learned(_row_key(group.iloc[0]), float(group["per_it"].mean()), len(group),
                str(run.root.resolve()), stamp)
        for _, group in df.groupby(_GROUP, dropna=False, sort=True)
    ]


_GROUP = ["dev", "method", "prior", "victim", "victim_width", "image_size", "batch_size",
          "budget_restarts", "threads", "protocol_key"]  # fmt: skip


def _protocol_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The rows' protocol columns with None for null (rows written before they existed)."""
    cols = df[["protocol", "local_steps", "local_batch_size", "n_clients"]].astype(object)
    return cols.where(cols.notna(), None)


def _row_key(row: pd.Series) -> PriceKey:
    width = row["victim_width"]
    return PriceKey(
        device=str(row["dev"]),
        method=str(row["method"]),
        prior=str(row["prior"]),
        victim=str(row["victim"]),
        width=None if pd.isna(width) else int(width),
        image_size=int(row["image_size"]),
        batch=int(row["batch_size"]),
        restarts=int(row["budget_restarts"]),
        threads=int(row["threads"]),
        protocol=str(row["protocol_key"]),
    )


def learn_from_run(run: RunDir) -> list[Learned]:
    """Measure the run's cells and store the prices in the run and in the user-level file.
    A user file that cannot be written (read-only home) leaves the run's copy alone."""
    learned = measure(run)
    if not learned:
        return []
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    _write(run.reports_dir / RUN_FILE, learned)
    try:
        merge_into(user_file(), learned)
    except OSError as e:
        import logging

        logging.getLogger(__name__).warning(
            "learned costs not stored in %s (%s); set %s to a writable path", user_file(), e, ENV
        )
    return learned


def merge_into(path: Path, learned: Sequence[Learned]) -> None:
    """Add `learned` to the file at `path`, replacing the entries of the same keys; a lock
    beside it serialises two runs that finish at once (each rewrite is atomic anyway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        book = {e.key: e for e in load(path)}
        book.update({e.key: e for e in learned})
        _write(path, sorted(book.values(), key=lambda e: e.key.text()))


def load(path: Path) -> list[Learned]:
    """The entries of a learned-cost file; [] when it is missing or damaged (logged)."""
    value = records.read_json(path, records.is_learned_costs)
    return [_entry(e) for e in value["entries"]] if value else []


def _entry(e: Mapping[str, Any]) -> Learned:
    return Learned(PriceKey(**e["key"]), float(e["seconds_per_iteration"]), int(e["cells"]),
                   str(e["run"]), str(e["learned"]))


class LearnedPrices:
    """Lookup of learned prices for the cost model (`cell_cost(learned=prices.for_device(...))`)."""

    def __init__(self, entries: Sequence[Learned]) -> None:
        self.by_key = {e.key: e for e in entries if math.isfinite(e.seconds_per_iteration)}

    @classmethod
    def from_user_file(cls) -> LearnedPrices:
        return cls(load(user_file()))

    def price(self, cell: Any, *, device: str, threads: int) -> CellCost | None:
        found = self.by_key.get(cell_key(cell, device=device, threads=threads))
        if found is None:
            return None
        return CellCost(found.seconds_per_iteration, f"learned from {found.run}")


def _write(path: Path, entries: Sequence[Learned]) -> None:
    record = {"format": FORMAT, "entries": [e.to_json() for e in entries]}
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
