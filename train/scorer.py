"""Raw impressions -> pCTR, pCVR, pCTCVR, from a model bundle alone (torch + pyarrow).

    scorer = Scorer("BUNDLE")
    p = scorer.score(table)      # pyarrow Table / RecordBatch / list of dicts, raw log columns
    p["p_ctr"], p["p_cvr"], p["p_ctcvr"]   # numpy float32 [n]

Each field's raw column is encoded exactly as the ETL encodes it (etl/vocab.py
``encode_columns``, etl/features.py kinds), so a row scores the same here as its shard
row does in training:

- a value is looked up as Spark's ``cast(... as string)`` writes it (ints in decimal,
  booleans ``true``/``false``); unknown, null or missing -> id 0;
- single: one id per row (null -> [0]); multi: one id per element (null list -> [],
  null element -> 0); weighted: a map's keys sorted by key with its values as weights
  (null weight -> 1.0), an array with weight 1.0 per element;
- hashed fields (``hash_buckets`` B): ``1 + pmod(xxhash64(value, seed 42), B)``, Spark's
  ``xxhash64`` on the UTF-8 bytes (the ``xxhash`` package; checked against Spark in
  tests/test_bundle.py).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from train.bundle import load_bundle, read_vocab
from train.data import FieldColumn, collate
from train.errors import InputError

SPARK_XXHASH_SEED = 42  # Spark's XxHash64 default seed
OUTPUTS = ("p_ctr", "p_cvr", "p_ctcvr")


def spark_xxhash64(values: list) -> np.ndarray:
    """Spark's ``xxhash64(cast(v as string))`` per value, as signed int64 (None -> 0, unused)."""
    try:
        import xxhash
    except ImportError:
        raise InputError("hashed fields need the `xxhash` package (pip install xxhash) to reproduce "
                         "Spark's xxhash64") from None
    out = np.zeros(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = xxhash.xxh64_intdigest(v.encode("utf-8"), seed=SPARK_XXHASH_SEED)
    return out.view(np.int64)


def _as_strings(arr: pa.Array) -> pa.Array:
    """Spark's cast to string of a scalar column (string, integer or boolean)."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    if pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type) or pa.types.is_null(arr.type):
        return pc.cast(arr, pa.string())  # 12 -> "12", True -> "true": as Spark writes them
    raise InputError(f"type {arr.type} cannot be a feature value (string, integer or boolean)")


def _combine(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


class FieldEncoder:
    """Raw column -> (ids, offsets, weights) of one field, the ETL's way."""

    def __init__(self, spec: dict, bundle):
        self.name, self.kind = spec["name"], spec["kind"]
        self.size = int(spec["vocab_size"])
        self.buckets = int(spec["hash_buckets"]) if spec.get("hash_buckets") else None
        if self.buckets is None:
            import pandas as pd

            values, ids = read_vocab(bundle, self.name)
            self.index = pd.Index(values, dtype=object)
            self.ids = np.append(ids, 0)  # get_indexer's -1 (unknown) picks the last: id 0
            if len(ids) and int(ids.max()) >= self.size:
                raise InputError(f"{bundle.path}/vocab/field={self.name}: id {int(ids.max())} outside the "
                                 f"model's table ({self.size} rows)")

    def lookup(self, strings: pa.Array) -> np.ndarray:
        vals = strings.to_pylist()
        if self.buckets is None:
            return self.ids[self.index.get_indexer(vals)]
        h = spark_xxhash64(vals)
        ids = np.mod(h, self.buckets) + 1  # numpy mod of a positive divisor is Spark's pmod
        ids[np.array([v is None for v in vals], dtype=bool)] = 0
        return ids.astype(np.int64)

    def encode(self, col, n: int) -> FieldColumn:
        col = _combine(col)
        t = col.type
        if self.kind == "single":
            if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
                raise InputError(f"field {self.name!r}: single-valued, got a column of {t}")
            ids = self.lookup(_as_strings(col))
            return FieldColumn(torch.from_numpy(ids), torch.arange(n + 1, dtype=torch.int64), None)
        weights = None
        if pa.types.is_map(t):
            keys, w, offsets = self._sorted_map(col)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            col = pc.fill_null(col, pa.scalar([], t)) if col.null_count else col
            offsets = np.array(col.offsets, dtype=np.int64)
            keys = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            offsets = offsets - offsets[0]
            w = None
        else:
            raise InputError(f"field {self.name!r}: {self.kind}-valued, got a column of {t} "
                             f"(expected array<string> or map<string,float>)")
        ids = self.lookup(_as_strings(keys))
        if self.kind == "weighted":
            weights = torch.ones(len(ids)) if w is None else torch.from_numpy(w)
        return FieldColumn(torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(offsets), weights)

    @staticmethod
    def _sorted_map(col: pa.MapArray):
        """(keys, weights float32, offsets) with each row's entries sorted by key, as the
        ETL's ``array_sort(map_entries(...))`` orders them."""
        col = pc.fill_null(col, pa.scalar([], col.type)) if col.null_count else col
        offsets = np.array(col.offsets, dtype=np.int64)
        lo, hi = int(offsets[0]), int(offsets[-1])
        keys, items = col.keys.slice(lo, hi - lo), col.items.slice(lo, hi - lo)
        offsets = offsets - lo
        row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        order = pc.sort_indices(pa.table({"r": pa.array(row), "k": keys}),
                                sort_keys=[("r", "ascending"), ("k", "ascending")])
        keys = keys.take(order)
        w = pc.fill_null(pc.cast(items.take(order), pa.float64()), 1.0)
        return keys, np.array(pc.cast(w, pa.float32()).to_numpy(zero_copy_only=False), dtype=np.float32), offsets


class Scorer:
    """A bundle loaded once; ``score`` maps raw impression rows to the model's probabilities.

    Args:
        bundle (str): a model bundle directory (train/bundle.py).
        batch_size (int): rows per forward pass.
        device (str): torch device for the model (default cpu).
    """

    def __init__(self, bundle: str | os.PathLike, batch_size: int = 8192, device: str = "cpu"):
        self.model, self.bundle = load_bundle(bundle)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.encoders = [FieldEncoder(f, self.bundle) for f in self.bundle.fields]
        missing = [o for o in OUTPUTS if o not in getattr(self.model, "outputs", ())]
        if missing:
            raise InputError(f"{bundle}: model {self.bundle.meta['model']!r} does not give {missing}")

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    def encode(self, table: pa.Table | pa.RecordBatch):
        """Raw rows -> a Batch (no labels) of the bundle's fields, ids as the ETL assigns them."""
        n = table.num_rows
        names = table.schema.names
        cols = []
        for e in self.encoders:
            if e.name not in names:
                raise InputError(f"scorer: no column {e.name!r} in the input (the bundle's fields: "
                                 f"{', '.join(x.name for x in self.encoders)})")
            cols.append(e.encode(table.column(e.name), n))
        zeros = torch.zeros(n)
        return collate(cols, [e.name for e in self.encoders], zeros, zeros)

    @torch.no_grad()
    def score(self, rows) -> dict[str, np.ndarray]:
        """{p_ctr, p_cvr, p_ctcvr}: float32 [n] for the raw rows (Table, RecordBatch or list of dicts)."""
        if isinstance(rows, list):
            rows = pa.Table.from_pylist(rows)
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        out = {k: [] for k in OUTPUTS}
        for start in range(0, rows.num_rows, self.batch_size):
            part = rows.slice(start, self.batch_size)
            batch = self.encode(part)
            if self.device.type != "cpu":
                from train.device import to_device

                batch = to_device(batch, self.device)
            p = self.model.predict(batch.features)
            for k in OUTPUTS:
                out[k].append(p[k].float().cpu().numpy())
        return {k: (np.concatenate(v) if v else np.zeros(0, np.float32)) for k, v in out.items()}
