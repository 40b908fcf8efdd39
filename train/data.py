"""Shards -> jagged batches, straight from Arrow buffers (see README, "Shard contract").

The manifest is the only way in: ``load_manifest(DATA)`` names the fields and the
files of each split. Two ways out, sharing one converter:

- ``arrow_to_batch(table, fields)``: any Arrow table / record batch with the shard
  columns -> one ``Batch``; list offsets and values go pyarrow -> numpy -> torch
  without copying row by row. The Ray Data path calls it on its batches.
- ``load_split(DATA, "train")``: a whole split in memory as per-field column arrays
  (``Columns``); ``Columns.batches(...)`` slices batches out of it, shuffled per epoch
  with a seed, resumable at any step. This is the fast local path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from train.embedding import FieldConfig
from train.errors import InputError
from train.jagged import Batch, KeyedJagged, take_bags, unit_offsets

LABELS = ("click", "conversion")
HOLDOUT_SEED = 12345  # validation rows: the same for every model and training seed


# ---------------------------------------------------------------- manifest

def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and check ``DATA/manifest.json``; raises InputError naming what is wrong."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{path}: no manifest.json (is {data_dir} an `esmm etl` output?)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable manifest ({e})") from None
    if m.get("format_version") not in (1, 2):
        raise InputError(f"{path}: format_version {m.get('format_version')!r}, expected 1 or 2")
    for key in ("fields", "splits"):
        if key not in m:
            raise InputError(f"{path}: missing key {key!r}")
    for i, f in enumerate(m["fields"]):
        if f.get("kind") not in ("single", "multi", "weighted") or int(f.get("vocab_size", 0)) < 1:
            raise InputError(f"{path}: fields[{i}] ({f.get('name')!r}) needs kind single|multi|weighted and vocab_size >= 1")
    return m


def manifest_fields(manifest: dict, pooling: str = "sum") -> list[FieldConfig]:
    """FieldConfigs in manifest order; ``pooling`` applies to multi and weighted fields."""
    return [FieldConfig(f["name"], f["kind"], int(f["vocab_size"]),
                        "sum" if f["kind"] == "single" else pooling) for f in manifest["fields"]]


def split_files(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise InputError(f"{data_dir}/manifest.json: no split {split!r} (has {sorted(manifest['splits'])})")
    files = [str(Path(data_dir) / f) for f in manifest["splits"][split].get("files", [])]
    for f in files:
        if not os.path.isfile(f):
            raise InputError(f"{f}: listed in manifest.json split {split!r} but missing")
    return files


def shard_columns(fields: list[FieldConfig], sample_id: bool = True) -> list[str]:
    cols = (["sample_id"] if sample_id else []) + list(LABELS)
    for f in fields:
        cols.append(f.name)
        if f.kind == "weighted":
            cols.append(f"{f.name}__w")
    return cols


# ---------------------------------------------------------------- Arrow -> torch

def _list_buffers(arr: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1] from 0, values) of a list array, zero-copy where Arrow allows;
    an integer column (a single field, format 2) is one id per row."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_integer(arr.type):
        if arr.null_count:
            raise InputError(f"column {name!r}: null ids")
        return np.arange(len(arr) + 1, dtype=np.int64), arr.to_numpy(zero_copy_only=False)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise InputError(f"column {name!r}: expected list<...>, got {arr.type}")
    if arr.null_count:  # a null list is an empty bag, like a missing value
        arr = pa.compute.if_else(pa.compute.is_null(arr), pa.scalar([], arr.type), arr)
    offsets = np.asarray(arr.offsets).astype(np.int64, copy=False)
    lo, hi = int(offsets[0]), int(offsets[-1])
    values = arr.values.slice(lo, hi - lo)
    if values.null_count:
        raise InputError(f"column {name!r}: null ids inside lists")
    return offsets - lo, values.to_numpy(zero_copy_only=False)


def _column(table, name: str):
    try:
        return table.column(name)
    except KeyError:
        raise InputError(f"missing column {name!r} (have {table.schema.names})") from None


@dataclass
class FieldColumn:
    """One field of a split in memory: bag r is values[offsets[r]:offsets[r+1]]."""
    values: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [n+1]
    weights: torch.Tensor | None  # float32 [N] for weighted fields, else None (= 1)
    _one_per_row: bool | None = None  # cache of one_per_row()

    def one_per_row(self) -> bool:
        """Every bag holds exactly one value (offsets 0, 1, ..., n): rows gather without take_bags."""
        if self._one_per_row is None:
            n = self.offsets.numel() - 1
            self._one_per_row = self.values.numel() == n and bool(
                torch.equal(self.offsets, torch.arange(n + 1, dtype=self.offsets.dtype)))
        return self._one_per_row

    def take(self, rows: torch.Tensor) -> "FieldColumn":
        """Bags ``rows`` (any order, repeats allowed), offsets from 0."""
        if self.one_per_row():
            w = None if self.weights is None else self.weights[rows]
            return FieldColumn(self.values[rows], torch.arange(rows.numel() + 1), w, True)
        return FieldColumn(*take_bags(self.values, self.offsets, rows, self.weights))


def field_column(table, f: FieldConfig) -> FieldColumn:
    offsets, values = _list_buffers(_column(table, f.name), f.name)
    values = values.astype(np.int64, copy=False)
    if not values.flags.writeable:  # Arrow buffers are read-only; torch wants to own them
        values = values.copy()
    if values.size and (values.min() < 0 or values.max() >= f.vocab_size):
        bad = int(np.flatnonzero((values < 0) | (values >= f.vocab_size))[0])
        row = int(np.searchsorted(offsets, bad, side="right") - 1)
        raise InputError(f"field {f.name!r}: id {int(values[bad])} at row {row} outside [0, {f.vocab_size})")
    w = None
    if f.kind == "weighted":
        w_off, w = _list_buffers(_column(table, f"{f.name}__w"), f"{f.name}__w")
        if not np.array_equal(w_off, offsets):
            raise InputError(f"field {f.name!r}: {f.name}__w lists differ in length from the ids")
        w = np.ascontiguousarray(w, dtype=np.float32)
        w = torch.from_numpy(w if w.flags.writeable else w.copy())
    return FieldColumn(torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(offsets), w)


def _labels(table) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for name in LABELS:
        col = _column(table, name)
        if col.null_count:
            raise InputError(f"column {name!r}: null labels")
        out.append(torch.from_numpy(np.asarray(col.to_numpy(), dtype=np.float32)))
    return out[0], out[1]


def collate(columns: list[FieldColumn], keys: list[str], click, conversion) -> Batch:
    """Per-field bags (each starting at offset 0, same row count) -> one field-major Batch."""
    B = click.numel()
    values = torch.cat([c.values for c in columns])
    if all(c.values.numel() == B and c._one_per_row for c in columns):  # one value per bag
        offsets = torch.arange(values.numel() + 1)
    else:
        bases = torch.tensor([0] + [c.values.numel() for c in columns]).cumsum(0)
        offsets = torch.cat([c.offsets[:-1] + bases[i] for i, c in enumerate(columns)] + [bases[-1:]])
    weights = None  # no weighted field: every weight is 1, no all-ones tensor to build and scan
    if any(c.weights is not None for c in columns):
        weights = torch.cat([c.weights if c.weights is not None else torch.ones(c.values.numel())
                             for c in columns])
    return Batch(KeyedJagged(keys, values, offsets, weights, B), click, conversion)


def arrow_to_batch(table: pa.Table | pa.RecordBatch, fields: list[FieldConfig]) -> Batch:
    """One Arrow table or record batch with the shard columns -> one Batch (no per-row Python)."""
    click, conversion = _labels(table)
    cols = [field_column(table, f) for f in fields]
    return collate(cols, [f.name for f in fields], click, conversion)


# ---------------------------------------------------------------- a split in memory

@dataclass
class Columns:
    """A split (or part of one) held as column arrays; batches are slices of it."""
    fields: list[FieldConfig]
    columns: list[FieldColumn]
    click: torch.Tensor  # float32 [n]
    conversion: torch.Tensor  # float32 [n]
    sample_id: np.ndarray | None = None  # object [n], for joining the truth table
    weight: torch.Tensor | None = None  # float32 [n] per-sample loss weights (UNBIAS), None = 1

    def __len__(self) -> int:
        return self.click.numel()

    def take(self, rows: torch.Tensor) -> "Columns":
        """Rows ``rows`` (any order, repeats allowed) as a new Columns."""
        cols = [c.take(rows) for c in self.columns]
        sid = None if self.sample_id is None else self.sample_id[rows.numpy()]
        w = None if self.weight is None else self.weight[rows]
        return Columns(self.fields, cols, self.click[rows], self.conversion[rows], sid, w)

    def slice(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a Batch: a few tensor slices per field."""
        cols = []
        for c in self.columns:
            lo, hi = int(c.offsets[start]), int(c.offsets[stop])
            cols.append(FieldColumn(c.values[lo:hi], c.offsets[start:stop + 1] - lo,
                                    None if c.weights is None else c.weights[lo:hi], c._one_per_row))
        b = collate(cols, [f.name for f in self.fields], self.click[start:stop], self.conversion[start:stop])
        if self.weight is not None:
            b.weight = self.weight[start:stop]
        return b

    def permutation(self, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(len(self), generator=g)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start_step: int = 0, drop_last: bool = False) -> Iterator[Batch]:
        """Batches of one epoch; with ``shuffle`` the order is a function of (seed, epoch),
        so ``start_step=k`` resumes exactly where step k of the same epoch began."""
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        # shuffled batches gather their rows from the split (no copy of the whole split per epoch)
        perm = self.permutation(seed, epoch) if shuffle else None
        for s in range(start_step * batch_size, stop, batch_size):
            e = min(s + batch_size, n)
            yield self.slice(s, e) if perm is None else self.gather(perm[s:e])

    def _single_grid(self) -> torch.Tensor | None:
        """[n, F] ids when every field holds one unweighted value per row (Ali-CCP's 23
        fields), built once; the columns' values become its columns (no second copy).
        Sample-major, so a shuffled batch reads B rows of F ids each (~3 cache lines a row)
        rather than B*F scattered ids: ~5x faster to gather once the split outgrows the cache."""
        if "_grid" not in self.__dict__:
            grid = None
            if self.columns and all(c.weights is None and c.one_per_row() for c in self.columns):
                from train.shard.table_memory import table_empty

                # 2 MB pages: a batch reads 2048 random rows of it (~1.5x faster gathers)
                grid = table_empty((len(self), len(self.columns)), self.columns[0].values.dtype)
                torch.stack([c.values for c in self.columns], dim=1, out=grid)
                for f, c in enumerate(self.columns):
                    c.values = grid[:, f]
            self.__dict__["_grid"] = grid
        return self.__dict__["_grid"]

    def gather(self, rows: torch.Tensor) -> Batch:
        """Rows ``rows`` as a Batch: the batch ``take(rows).slice(0, len(rows))`` gives."""
        keys = [f.name for f in self.fields]
        grid = self._single_grid()
        if grid is not None:  # one gather for all fields, then field-major (a [B, F] transpose)
            from train.shard.row_kernels import for_tensor

            k = for_tensor(grid, torch.int64)
            if k is not None and rows.dtype == torch.int64 and grid.is_contiguous() \
                    and all(t.dtype == torch.float32 and t.is_contiguous() for t in (self.click, self.conversion)):
                # ids and labels in one prefetched pass (train/shard/row_kernels.py)
                values, click, conversion = k.gather_batch(grid, rows, [self.click, self.conversion])
            else:
                values = grid.index_select(0, rows).t()
                click, conversion = self.click.index_select(0, rows), self.conversion.index_select(0, rows)
            values = values.reshape(-1)
            kjt = KeyedJagged(keys, values, unit_offsets(values.numel()), None, rows.numel())
            b = Batch(kjt, click, conversion)
        else:
            b = collate([c.take(rows) for c in self.columns], keys, self.click[rows], self.conversion[rows])
        if self.weight is not None:
            b.weight = self.weight.index_select(0, rows)
        return b

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def split_off(self, fraction: float, seed: int = HOLDOUT_SEED) -> tuple["Columns", "Columns"]:
        """(rest, held-out): the rows ``holdout_mask`` picks by sample_id (the Ray path holds
        out the same rows); by a seeded permutation when there are no sample ids."""
        if self.sample_id is not None:
            out_mask = torch.from_numpy(holdout_mask(self.sample_id, fraction, seed))
            return self.take(torch.nonzero(~out_mask).flatten()), self.take(torch.nonzero(out_mask).flatten())
        n_out = int(round(len(self) * fraction))
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        rest, out = perm[n_out:].sort().values, perm[:n_out].sort().values
        return self.take(rest), self.take(out)


def holdout_mask(sample_id, fraction: float, seed: int = HOLDOUT_SEED) -> np.ndarray:
    """bool [n]: the validation rows, picked by a keyed hash of each sample_id. It is a
    function of the id alone (not of file order, row position or worker), so every model,
    training seed and worker count validates on the same rows, and a day appended later
    leaves the earlier days' choice as it was."""
    import pandas as pd

    ids = np.asarray(sample_id, dtype=object)
    if len(ids) == 0 or fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    h = pd.util.hash_array(ids, hash_key=f"esmm-val{int(seed) % 10**8:08d}", categorize=False)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53) < float(fraction)


def table_to_columns(table: pa.Table, fields: list[FieldConfig]) -> Columns:
    click, conversion = _labels(table)
    sid = None
    if "sample_id" in table.schema.names:
        sid = np.asarray(table.column("sample_id").to_numpy(zero_copy_only=False), dtype=object)
    return Columns(fields, [field_column(table, f) for f in fields], click, conversion, sid)


def read_split_table(data_dir: str | os.PathLike, split: str, fields: list[FieldConfig],
                     manifest: dict | None = None) -> pa.Table:
    manifest = manifest or load_manifest(data_dir)
    files = split_files(data_dir, manifest, split)
    cols = shard_columns(fields)
    tables = []
    for f in files:
        try:
            t = pq.read_table(f, columns=cols, partitioning=None)
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise InputError(f"{f}: cannot read shard columns {cols} ({e})") from None
        tables.append(t)
    if not tables:
        raise InputError(f"{data_dir}/manifest.json: split {split!r} lists no files")
    return pa.concat_tables(tables).combine_chunks()


def load_split(data_dir: str | os.PathLike, split: str, fields: list[FieldConfig] | None = None,
               manifest: dict | None = None) -> Columns:
    """The whole split ``split`` of DATA in memory (fields default to the manifest's)."""
    manifest = manifest or load_manifest(data_dir)
    fields = fields or manifest_fields(manifest)
    table = read_split_table(data_dir, split, fields, manifest)
    try:
        return table_to_columns(table, fields)
    except InputError as e:
        raise InputError(f"{data_dir} split {split!r}: {e}") from None
