"""Per-rank shard files, re-sharded on load to any world size.

Each rank writes ``shard-rank={r}.pt``: its row-aligned tensors (embedding rows and the
optimizer state that lives with them), each with the global row count it is a shard
of, plus the world size that wrote it::

    {"format": 1, "rank": r, "world": W,
     "tensors": {name: local tensor [n_local(N, r, W), ...]},
     "num_rows": {name: N},
     "meta": {...}}                       # replicated, small (optimizer kinds, steps)

Local row i of rank r is global row ``r + i * W`` (owner = gid % W). Loading for
(rank', W') gathers global rows ``rank' + k * W'`` from whichever old shards own them,
so a run saved by 2 workers restores on 1 (or 3) and vice versa.

``split_state`` / ``merge_state`` cut a training state (``train.loop.fit``'s: model
state, optimizer states, best-model snapshot, data position) into this rank's shard
part and the replicated rest that rank 0 writes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from train.errors import InputError
from train.shard.collection import ShardedEmbeddingCollection, local_row_count, owned_gids

FORMAT = 1
SHARD_FILE = "shard-rank={rank}.pt"
_SHARD_RE = re.compile(r"^shard-rank=(\d+)\.pt$")


def shard_path(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / SHARD_FILE.format(rank=rank)


def save_shard(directory: str | os.PathLike, rank: int, world: int, tensors: dict[str, torch.Tensor],
               num_rows: dict[str, int], meta: dict | None = None) -> Path:
    """Write this rank's row-aligned ``tensors`` (each ``[n_local(num_rows[name]), ...]``)."""
    for name, t in tensors.items():
        want = local_row_count(num_rows[name], rank, world)
        if t.shape[0] != want:
            raise ValueError(f"{name}: {t.shape[0]} rows, rank {rank}/{world} owns {want} of {num_rows[name]}")
    path = shard_path(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT, "rank": rank, "world": world,
                "tensors": {k: v.detach().cpu() for k, v in tensors.items()},
                "num_rows": dict(num_rows), "meta": meta or {}}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn shard file
    return path


def shard_files(directory: str | os.PathLike) -> dict[int, Path]:
    d = Path(directory)
    found = {int(m.group(1)): d / p for p in (os.listdir(d) if d.is_dir() else []) if (m := _SHARD_RE.match(p))}
    return dict(sorted(found.items()))


def load_shard(directory: str | os.PathLike, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Rank ``rank`` of ``world``'s row-aligned tensors, gathered from the saved shards
    whatever world size wrote them. Returns (tensors, meta)."""
    files = shard_files(directory)
    if not files:
        raise InputError(f"{directory}: no shard-rank=*.pt files")
    old = {r: torch.load(p, map_location="cpu", mmap=True, weights_only=True) for r, p in files.items()}
    W0 = old[min(old)]["world"]
    if sorted(old) != list(range(W0)) or any(s["world"] != W0 or s.get("format") != FORMAT for s in old.values()):
        raise InputError(f"{directory}: shard files {sorted(old)} do not make one complete world of {W0}")
    first = old[0]
    out: dict[str, torch.Tensor] = {}
    for name, N in first["num_rows"].items():
        if W0 == world:  # same layout: this rank's own file
            out[name] = old[rank]["tensors"][name].clone()
            continue
        gids = owned_gids(N, rank, world)
        src_rank, src_row = gids % W0, gids // W0
        ref = first["tensors"][name]
        t = torch.empty((gids.numel(), *ref.shape[1:]), dtype=ref.dtype)
        for r in range(W0):
            m = src_rank == r
            t[m] = old[r]["tensors"][name][src_row[m]]
        out[name] = t
    return out, dict(old[rank if W0 == world else 0]["meta"])


# ---------------------------------------------------------------- training states

def _ddp_prefixes(model: nn.Module) -> list[str]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return [(n + "." if n else "") for n, m in model.named_modules() if isinstance(m, DDP)]


def plain_keys(model: nn.Module, sd: dict) -> dict:
    """State-dict keys without DDP's ``module.`` level (``dense.module.x`` -> ``dense.x``),
    so a checkpoint reads the same whatever wrapped the dense part when it was written."""
    out = dict(sd)
    for p in _ddp_prefixes(model):
        out = {(p + k[len(p) + 7:] if k.startswith(p + "module.") else k): v for k, v in out.items()}
    return out


def wrapped_keys(model: nn.Module, sd: dict) -> dict:
    """Inverse of ``plain_keys`` for ``model`` as it is wrapped now."""
    out = dict(sd)
    for p in _ddp_prefixes(model):
        out = {(p + "module." + k[len(p):] if k.startswith(p) and not k.startswith(p + "module.") else k): v
               for k, v in out.items()}
    return out


def sharded_modules(model: nn.Module) -> dict[str, ShardedEmbeddingCollection]:
    """State-dict prefix -> sharded collection, for every one inside ``model``."""
    return {(name + "." if name else ""): m for name, m in model.named_modules()
            if isinstance(m, ShardedEmbeddingCollection)}


def _is_row_optimizer_state(s) -> bool:
    return isinstance(s, dict) and "kind" in s and isinstance(s.get("rows"), dict)


def split_state(model: nn.Module, state: dict) -> tuple[dict[str, torch.Tensor], dict[str, int], dict]:
    """Cut a training state into (row tensors, their global row counts, the rest).

    Row tensors: each sharded collection's ``weight`` in ``state["model"]`` (and in
    ``state["best_model"]`` if present) and the row state of every sparse row-wise
    optimizer in ``state["optimizers"]``. The rest (dense weights, dense optimizer,
    data position, the row optimizers' scalars) is the same on every rank.
    """
    mods = sharded_modules(model)
    rows: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    rest = dict(state)
    for key in ("model", "best_model"):
        sd = state.get(key)
        if sd is None:
            continue
        sd = dict(sd)
        for prefix, m in mods.items():
            name = prefix + "weight"
            if name in sd:
                rows[f"{key}/{name}"] = sd.pop(name)
                counts[f"{key}/{name}"] = m.num_rows
        rest[key] = sd
    opts = []
    for i, s in enumerate(state.get("optimizers", [])):
        if _is_row_optimizer_state(s):
            s = dict(s)
            N = s.get("num_rows")
            for n, t in s.pop("rows").items():
                rows[f"optimizers/{i}/{n}"] = t
                counts[f"optimizers/{i}/{n}"] = N
            s["rows"] = None
        opts.append(s)
    if "optimizers" in state:
        rest["optimizers"] = opts
    return rows, counts, rest


def merge_state(rows: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of ``split_state`` (with ``rows`` as ``load_shard`` gives them for this rank)."""
    state = dict(rest)
    for key in ("model", "best_model"):
        if state.get(key) is not None:
            state[key] = dict(state[key])
    opts = [dict(s) if isinstance(s, dict) else s for s in state.get("optimizers", [])]
    for name, t in rows.items():
        head, _, tail = name.partition("/")
        if head in ("model", "best_model"):
            state[head][tail] = t
        elif head == "optimizers":
            i, _, n = tail.partition("/")
            if opts[int(i)].get("rows") is None:
                opts[int(i)]["rows"] = {}
            opts[int(i)]["rows"][n] = t
    if "optimizers" in state:
        state["optimizers"] = opts
    return state
