"""The Parquet store of selections: one row per (image, split, model, selector).

    format.py  the pyarrow schema and its versions, folder layout and content-named shards, the
               compact step encoding of a removal order, version-1 conversion (no I/O)
    io.py      atomic writes, shard listing, validated reads (read_selections, done_ids,
               raw_image_ids, stored_mask), stored_rows from the footers, the overlap rule,
               validate_shards and list_selections
    check.py   `overinterp store check|repair` and its report table

Callers use the package: `from overinterp import store; store.read_selections(...)`.
"""

from overinterp.store.check import QUARANTINE, SelectionReport, check_store, repair_selection, repair_store, report_table
from overinterp.store.format import (
    READABLE_VERSIONS,
    REPAIR_HINT,
    SCHEMA,
    SCHEMA_VERSION,
    V1_SCHEMA,
    StoreError,
    decode_order,
    encode_steps,
    selection_dir,
    shard_name,
    steps_to_keep,
)
from overinterp.store.io import (
    CURVE_TOLERANCE,
    Overlap,
    Selections,
    done_ids,
    find_overlap,
    list_selections,
    raw_image_ids,
    read_selections,
    read_shard,
    shard_files,
    stored_mask,
    stored_rows,
    validate_shards,
    write_rows,
    write_table_atomic,
)

__all__ = [
    "CURVE_TOLERANCE", "QUARANTINE", "READABLE_VERSIONS", "REPAIR_HINT", "SCHEMA", "SCHEMA_VERSION", "V1_SCHEMA",
    "Overlap", "SelectionReport", "Selections", "StoreError",
    "check_store", "decode_order", "done_ids", "encode_steps", "find_overlap", "list_selections", "raw_image_ids", "stored_rows",
    "read_selections", "read_shard", "repair_selection", "repair_store", "report_table", "selection_dir", "shard_files", "shard_name",
    "steps_to_keep", "stored_mask", "validate_shards", "write_rows", "write_table_atomic",
]
