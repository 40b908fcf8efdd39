"""A self-contained model bundle: what serving, scoring and warm starts load.

Layout (``esmm train`` writes it into MODEL/ beside model.pt; ``esmm export`` anywhere)::

    BUNDLE/bundle.json                         format_version, model, model_version, fields
                                               (the manifest's, + pooling), config (model_cfg,
                                               train_cfg), weights (file index), metrics, lineage
    BUNDLE/weights.safetensors                 the dense tensors (towers, biases)
    BUNDLE/emb-<k>.rank=<r>-of-<W>.safetensors embedding table k, the rows owned by rank r of
                                               W (global row r + i*W is row i of tensor "rows")
    BUNDLE/vocab/field=<name>/*.parquet        value, id[, count] per field (contract 1)

The embedding is written shard by shard, exactly as the training run held it (one
file when it trained in one process): no host ever holds more than one shard plus
the file being written. ``load_bundle`` merges the shards back into one table.

Loading needs torch, safetensors and pyarrow only (no Spark, Ray or data folder).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from train.errors import InputError

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
DENSE_FILE = "weights.safetensors"
SHARD_FILE = re.compile(r"^shard-rank=(\d+)\.pt$")
TABLE_KEY = re.compile(r"(^|\.)embeddings\.\d+\.weight$")  # row tables in a model state dict


def is_table(key: str) -> bool:
    return bool(TABLE_KEY.search(key))


def table_file(k: int, rank: int, world: int) -> str:
    return f"emb-{k}.rank={rank}-of-{world}.safetensors"


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _safetensors_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------- writing

def _copy_vocab(data_dir: Path | None, out: Path) -> list[str]:
    """DATA/vocab/field=*/ -> BUNDLE/vocab/ (contract 1); returns the fields copied."""
    if data_dir is None or not (data_dir / "vocab").is_dir():
        return []
    copied = []
    for d in sorted((data_dir / "vocab").iterdir()):
        if d.is_dir() and d.name.startswith("field="):
            shutil.copytree(d, out / "vocab" / d.name, ignore=shutil.ignore_patterns(".*", "_*"))
            copied.append(d.name[len("field="):])
    return copied


def _fields(cfg: dict, manifest: dict | None) -> list[dict]:
    """The model's FieldConfigs (+ pooling) merged with the manifest's field entries
    (group, min_count or hash_buckets: what the Scorer needs to encode raw values)."""
    by_name = {f["name"]: f for f in (manifest or {}).get("fields", [])}
    out = []
    for f in cfg["fields"]:
        m = {k: v for k, v in by_name.get(f["name"], {}).items() if k != "weights"}
        out.append({**m, **f})
    return out


def write_bundle(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 shards_dir: str | os.PathLike | None = None, parent_model: str | None = None) -> dict:
    """Write the bundle of MODEL (``esmm train``'s output) to ``out_dir`` (default MODEL itself).

    Args:
        model_dir: MODEL with model.pt, config.json (its ``data`` names the DATA dir whose
            manifest and vocab/ the model was trained on) and metrics.json.
        shards_dir: a Ray checkpoint with ``shard-rank=<r>.pt`` files (default: the one
            config.json names, if it still exists): the embedding is copied from those
            shard by shard; otherwise model.pt holds the whole table (one shard), or, for
            a Ray-trained MODEL (dense weights only in model.pt), MODEL's own bundle files.
        parent_model: the model this one was warm-started from (lineage).

    Returns:
        dict: the bundle.json content.
    """
    src = Path(model_dir).resolve()
    out = Path(out_dir).resolve() if out_dir else src
    for name in ("config.json", "model.pt"):
        if not (src / name).is_file():
            raise InputError(f"{src}: not a model dir (needs {name} from `esmm train`)")
    cfg = json.loads((src / "config.json").read_text())
    data_dir = Path(cfg["data"]).resolve() if cfg.get("data") else None
    manifest_path = data_dir / "manifest.json" if data_dir else None
    manifest = json.loads(manifest_path.read_text()) if manifest_path and manifest_path.is_file() else None
    if shards_dir is None and cfg.get("ray", {}).get("checkpoint"):
        ck = Path(cfg["ray"]["checkpoint"])
        shards_dir = ck if ck.is_dir() and any(SHARD_FILE.match(p) for p in os.listdir(ck)) else None
    # mmap: the tables in model.pt are never read from it when the shards are the source
    state = torch.load(src / "model.pt", map_location="cpu", mmap=True, weights_only=True)
    tables = sorted(k for k in state if is_table(k))
    # a Ray run's model.pt holds the dense weights only: its tables are the shards it was
    # trained as, in its checkpoint or (once that is gone) in MODEL's own bundle files
    own = read_bundle(src).meta["weights"]["tables"] if not tables and is_bundle(src) else None
    if not tables and shards_dir is None and own is None:
        raise InputError(f"{src}/model.pt holds no embedding tables and neither its Ray checkpoint nor a "
                         f"bundle in {src} has them")

    if out != src:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    else:  # rewriting MODEL's own bundle: drop a previous one's files (its tables when they are rewritten)
        olds = [out / DENSE_FILE, out / BUNDLE_FILE] + ([] if own is not None and shards_dir is None
                                                        else list(out.glob("emb-*.safetensors")))
        for p in olds:
            p.unlink(missing_ok=True)
        shutil.rmtree(out / "vocab", ignore_errors=True)

    _safetensors_save({k: v for k, v in state.items() if not is_table(k)}, out / DENSE_FILE)
    if shards_dir is not None:
        index = _copy_shards(Path(shards_dir), out)
    elif tables:
        index = {}
        for k, key in enumerate(tables):
            rows, dim = state[key].shape
            index[key] = {"rows": int(rows), "dim": int(dim), "world": 1, "files": [table_file(k, 0, 1)]}
            _safetensors_save({"rows": state[key]}, out / index[key]["files"][0])
    else:
        index = own
        if out != src:
            for t in own.values():
                for f in t["files"]:
                    shutil.copyfile(src / f, out / f)
    del state

    weight_files = [out / DENSE_FILE] + [out / f for t in index.values() for f in t["files"]]
    metrics = json.loads((src / "metrics.json").read_text()) if (src / "metrics.json").is_file() else {}
    metrics.pop("training", None)  # per-epoch history: stays in MODEL/metrics.json
    meta = {
        "format_version": FORMAT_VERSION,
        "model": cfg["model"],
        "model_version": _sha256(weight_files)[:16],
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fields": _fields(cfg, manifest),
        "config": {"model_cfg": cfg["model_cfg"], "train_cfg": cfg["train_cfg"]},
        "weights": {"dense": DENSE_FILE, "tables": index},
        "vocab_fields": _copy_vocab(data_dir, out),
        "metrics": metrics,
        "lineage": {
            "model_dir": str(src),
            "data": str(data_dir) if data_dir else None,
            "manifest": str(manifest_path) if manifest else None,
            "manifest_created_at": (manifest or {}).get("created_at"),
            "vocab_parent": ((manifest or {}).get("vocab") or {}).get("parent"),
            "parent_model": parent_model if parent_model is not None else cfg.get("init_from"),
        },
    }
    tmp = out / (BUNDLE_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=float) + "\n")
    os.replace(tmp, out / BUNDLE_FILE)  # bundle.json last: its presence means the bundle is whole
    return meta


def _copy_shards(shards_dir: Path, out: Path) -> dict:
    """Every embedding table of a Ray checkpoint's final model, from its shard files, one
    shard file in memory at a time; the bundle's table index."""
    files = sorted((int(m.group(1)), shards_dir / p) for p in os.listdir(shards_dir) if (m := SHARD_FILE.match(p)))
    world = len(files)
    if [r for r, _ in files] != list(range(world)):
        raise InputError(f"{shards_dir}: shard files {[r for r, _ in files]} are not ranks 0..{world - 1}")
    index: dict = {}
    for r, path in files:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if shard.get("world") != world:
            raise InputError(f"{path}: written by a world of {shard.get('world')}, found {world} shard files")
        keys = sorted(n[len("model/"):] for n in shard["tensors"] if n.startswith("model/") and is_table(n[6:]))
        if not keys:
            raise InputError(f"{path}: no embedding rows 'model/...' (not a final model checkpoint?)")
        if r == 0:
            index = {key: {"rows": int(shard["num_rows"][f"model/{key}"]), "world": world, "files": []}
                     for key in keys}
        elif sorted(index) != keys:
            raise InputError(f"{path}: tables {keys}, rank 0 has {sorted(index)}")
        for k, key in enumerate(keys):
            t, rows = shard["tensors"][f"model/{key}"], index[key]["rows"]
            want = max(0, (rows - r + world - 1) // world)
            if t.shape[0] != want:
                raise InputError(f"{path}: {t.shape[0]} rows of {key}, rank {r} of {world} owns {want} of {rows}")
            index[key]["dim"] = int(t.shape[1])
            index[key]["files"].append(table_file(k, r, world))
            _safetensors_save({"rows": t}, out / index[key]["files"][-1])
        del shard
    return index


# ---------------------------------------------------------------- reading

@dataclass
class Bundle:
    path: Path
    meta: dict

    @property
    def fields(self) -> list[dict]:
        return self.meta["fields"]

    @property
    def model_version(self) -> str:
        return self.meta["model_version"]


def read_bundle(path: str | os.PathLike) -> Bundle:
    """bundle.json, checked; InputError naming what is wrong."""
    p = Path(path)
    f = p / BUNDLE_FILE
    if not f.is_file():
        raise InputError(f"{p}: not a model bundle (no {BUNDLE_FILE}; `esmm export --model MODEL --out BUNDLE` writes one)")
    try:
        meta = json.loads(f.read_text())
    except ValueError as e:
        raise InputError(f"{f}: unreadable ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{f}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return Bundle(p.resolve(), meta)


def table_shards(bundle: Bundle, key: str):
    """(world, iterator of (rank, rows tensor)) of table ``key``: one shard file at a time."""
    from safetensors.torch import load_file

    t = bundle.meta["weights"]["tables"][key]

    def it():
        for r, name in enumerate(t["files"]):
            f = bundle.path / name
            if not f.is_file():
                raise InputError(f"{f}: missing (listed in {BUNDLE_FILE})")
            yield r, load_file(str(f))["rows"]

    return int(t["world"]), it()


def dense_state(bundle: Bundle) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(bundle.path / bundle.meta["weights"]["dense"]))


def merged_table(bundle: Bundle, key: str) -> torch.Tensor:
    """Table ``key`` as one [rows, dim] tensor (shards interleaved back: row g from rank g % W)."""
    t = bundle.meta["weights"]["tables"][key]
    out = torch.empty(int(t["rows"]), int(t["dim"]))
    world, shards = table_shards(bundle, key)
    for r, rows in shards:
        out[r::world] = rows
    return out


def field_configs(bundle: Bundle):
    from train.embedding import FieldConfig

    return [FieldConfig(f["name"], f["kind"], int(f["vocab_size"]), f.get("pooling", "sum")) for f in bundle.fields]


def load_bundle(path: str | os.PathLike):
    """(model in eval mode, Bundle): the model rebuilt from the bundle's weights alone."""
    from train.baselines import build_model
    from train.model import EsmmConfig

    b = read_bundle(path)
    cfg = EsmmConfig.from_dict(b.meta["config"]["model_cfg"])
    model = build_model(b.meta["model"], field_configs(b), cfg)
    state = dense_state(b)
    for key in b.meta["weights"]["tables"]:
        state[key] = merged_table(b, key)
    model.load_state_dict(state)
    model.eval()
    return model, b


def read_vocab(bundle: Bundle, field: str):
    """(values: list[str], ids: np.ndarray int64) of ``field`` from BUNDLE/vocab/ (contract 1)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = bundle.path / "vocab" / f"field={field}"
    files = sorted(p for p in d.glob("*.parquet")) if d.is_dir() else []
    if not files:
        raise InputError(f"{d}: no vocabulary for field {field!r} in the bundle")
    t = pa.concat_tables([pq.read_table(f, columns=["value", "id"], partitioning=None) for f in files])
    return t.column("value").to_pylist(), np.asarray(t.column("id").to_numpy(), dtype=np.int64)
