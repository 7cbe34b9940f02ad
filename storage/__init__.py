"""The only package that imports zarr and pyarrow: run directory, Zarr groups, Parquet
metrics, checkpoints, commit markers, resume scan and pandas queries.

    run = storage.open_run("runs/smoke")
    df = run.metrics()                 # one row per image of every committed cell
"""

from storage.checkpoints import delete_checkpoint, load_checkpoint, save_checkpoint
from storage.commits import CompactionReport
from storage.metrics import ROW_COLUMNS, SCHEMA, provenance
from storage.run import RunDir, create_run, open_run
from storage.zarr_store import (
    StoredGradient,
    StoredReconstruction,
    open_group,
    read_gradient,
    read_reconstruction,
    write_gradient,
    write_reconstruction,
)

__all__ = [
    "ROW_COLUMNS",
    "SCHEMA",
    "CompactionReport",
    "RunDir",
    "StoredGradient",
    "StoredReconstruction",
    "create_run",
    "delete_checkpoint",
    "load_checkpoint",
    "open_group",
    "open_run",
    "provenance",
    "read_gradient",
    "read_reconstruction",
    "save_checkpoint",
    "write_gradient",
    "write_reconstruction",
]
