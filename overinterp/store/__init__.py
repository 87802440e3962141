"""The Parquet store of selections: one row per (image, split, model, selector).

    format.py  the pyarrow schema and its versions, folder layout and content-named shards, the
               compact step encoding of a removal order, version-1 conversion (no I/O)
    io.py      atomic writes, shard listing, validated reads (read_selections, done_ids,
               raw_image_ids, stored_mask, stored_params), stored_rows from the footers, the overlap rule,
               validate_shards and list_selections
    check.py   `overinterp store check|repair` and its report table

Callers use the package (`from overinterp import store; store.read_selections(...)`) for what it
names below; the store's check and its format details are imported from their modules.
"""

from overinterp.store.check import repair_selection
from overinterp.store.format import SCHEMA, V1_SCHEMA, StoreError, decode_order, encode_steps, steps_to_keep
from overinterp.store.io import (Selections, done_ids, list_selections, raw_image_ids, read_selections, read_shard, shard_files,
                                 stored_mask, stored_params, stored_rows, validate_shards, write_rows)

