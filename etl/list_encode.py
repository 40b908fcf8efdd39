"""List-valued vocabulary fields -> ids (and weights), in Arrow batches on the Python workers.

:func:`list_udf` is the one place a log or Ali-CCP row goes through Python: a scalar
Arrow UDF over that one column. Everything in a batch is an Arrow compute kernel (no
Python object per value): a list column arrives as ``array<string>`` (cast on the JVM),
a map column as it is and is ordered by key here (what ``array_sort(map_entries(...))``
did on the JVM, where its lambdas ran interpreted and cost more than the lookup).
"""
from __future__ import annotations

from pyspark.sql import functions as F

_CACHE: dict = {}  # per Python worker: broadcast token -> {field: ValueIndex}


class ValueIndex:
    """value -> id (its position + 1 in the field's value list; 0 when absent).

    Arrow's ``index_in`` builds its hash table on every call, which pays while a batch
    holds at least a quarter as many values as the vocabulary; larger vocabularies use
    a pandas index built once per worker. ``None`` in the list is an id a parent
    vocabulary left unused: no value maps to it.
    """

    def __init__(self, values: list):
        import pyarrow as pa

        self.values = pa.array(values, pa.string())
        self._pandas = None

    def ids(self, flat):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if len(self.values) <= 4 * len(flat):
            pos = pc.index_in(flat, value_set=self.values, skip_nulls=True)
            return pc.fill_null(pc.add(pos.cast(pa.int64()), 1), 0).to_numpy()
        if self._pandas is None:
            import pandas as pd

            vals = self.values.to_pylist()
            keep = np.array([i for i, v in enumerate(vals) if v is not None], dtype=np.int64)
            self._pandas = (pd.Index([vals[i] for i in keep], dtype=object), np.append(keep + 1, 0))
        index, ids = self._pandas
        return ids[index.get_indexer(flat.to_numpy(zero_copy_only=False))]


def _index(bc, token: str, name: str) -> ValueIndex:
    if token not in _CACHE:
        _CACHE.clear()
        _CACHE[token] = {f: ValueIndex(v) for f, v in bc.value.items()}
    return _CACHE[token][name]


def sorted_map(col):
    """(keys, weights float32 (null -> 1.0), int32 offsets) of a map column, each row's
    entries sorted by key; a null map is empty."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    entries, offsets = _list_parts(col)  # a map is a list of (key, value) structs
    keys, items = entries.field(0), entries.field(1)
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    order = pc.sort_indices(pa.table({"r": row, "k": keys}), sort_keys=[("r", "ascending"), ("k", "ascending")])
    w = pc.fill_null(pc.cast(items.take(order), pa.float64()), 1.0)
    return keys.take(order), pc.cast(w, pa.float32()), offsets


def _list_parts(col):
    """(values, int32 offsets from 0) of a list (or map) column; a null list is empty."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    col = pc.fill_null(col, pa.scalar([], col.type)) if col.null_count else col
    offsets = np.asarray(col.offsets, dtype=np.int64)
    lo, hi = int(offsets[0]), int(offsets[-1])
    return col.values.slice(lo, hi - lo), (offsets - lo).astype(np.int32)


def list_udf(bc, token: str, name: str, weighted: bool, is_map: bool):
    """Scalar Arrow UDF over field ``name``'s column (``array<string>``, or a map as read):
    its ids as ``array<bigint>`` (0 where unseen), or for a weighted field the struct
    ``(ids, w)`` with ``w`` the map's values (1.0 for an array's values or a null weight)."""
    import pyarrow as pa

    def lookup(col):
        import numpy as np
        import pyarrow.compute as pc

        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if is_map:
            keys, w, offsets = sorted_map(col)
            keys = keys if pa.types.is_string(keys.type) else pc.cast(keys, pa.string())  # Spark's cast
        else:
            keys, offsets = _list_parts(col)
            w = None
        off = pa.array(offsets, pa.int32())
        ids = pa.ListArray.from_arrays(off, pa.array(_index(bc, token, name).ids(keys), pa.int64()))
        if not weighted:
            return ids
        w = w if w is not None else pa.array(np.ones(len(keys), dtype=np.float32))
        return pa.StructArray.from_arrays([ids, pa.ListArray.from_arrays(off, w)], names=["ids", "w"])

    lookup.__annotations__ = {"col": pa.Array, "return": pa.Array}  # scalar Arrow UDF (hints, not strings)
    kind = "struct<ids: array<bigint>, w: array<float>>" if weighted else "array<bigint>"
    return F.arrow_udf(lookup, kind)
