"""Row-wise sharded embedding: sharded == unsharded, on real gloo process groups.

One spawn of 2 gloo workers (module fixture ``two_workers``) runs every distributed
scenario and writes what it saw to files; the 1-worker references run in this process
(world size 1 is the same class with no process group). Tiny model: sharded embedding
+ a small dense head under DDP; each rank takes half of every global batch and the
loss is the mean over the global batch.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from train.embedding import EmbeddingCollection, FieldConfig
from train.jagged import KeyedJagged, take_rows
from train.shard import ShardedEmbeddingCollection, shard_group
from train.shard.checkpoint import load_shard, merge_state, plain_keys, save_shard, split_state, wrapped_keys
from train.shard.collection import init_rows

FIELDS = [
    FieldConfig("user", "single", 41),
    FieldConfig("hist", "multi", 23, "mean"),
    FieldConfig("shop", "weighted", 17),
    FieldConfig("ctx", "single", 3),  # tiny: every id repeats, on both ranks
]
DIM, B, STEPS = 4, 32, 20
OPTS = {
    "adam": {"sparse_optimizer": "adam", "sparse_lr": 0.05},
    "adagrad": {"sparse_optimizer": "adagrad", "sparse_lr": 0.1},
}


def make_kjt(n: int, g: torch.Generator) -> KeyedJagged:
    vals, lens, ws = [], [], []
    for f in FIELDS:
        L = torch.ones(n, dtype=torch.long) if f.kind == "single" else torch.randint(0, 6, (n,), generator=g)
        k = int(L.sum())
        lens.append(L)
        vals.append(torch.randint(0, f.vocab_size, (k,), generator=g))
        ws.append(torch.rand(k, generator=g) + 0.5 if f.kind == "weighted" else torch.ones(k))
    lens = torch.cat(lens)
    off = torch.zeros(lens.numel() + 1, dtype=torch.long)
    off[1:] = lens.cumsum(0)
    return KeyedJagged([f.name for f in FIELDS], torch.cat(vals), off, torch.cat(ws), n)


def global_batches(steps: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [(make_kjt(B, g), torch.randint(0, 2, (B,), generator=g).float()) for _ in range(steps)]


def part(kjt: KeyedJagged, y: torch.Tensor, rank: int, world: int):
    n = kjt.batch_size // world
    rows = torch.arange(rank * n, (rank + 1) * n)
    return take_rows(kjt, rows), y[rows]


class Tiny(nn.Module):
    def __init__(self, group=None, seed: int = 1):
        super().__init__()
        self.emb = ShardedEmbeddingCollection(FIELDS, DIM, init_std=0.1, group=group, seed=seed)
        torch.manual_seed(seed)
        self.head = nn.Sequential(nn.Linear(len(FIELDS) * DIM, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, kjt):
        return self.head(self.emb(kjt).flatten(1)).squeeze(-1)


def make_opts(model: Tiny, kind: str):
    head = model.head.module if isinstance(model.head, DDP) else model.head
    return [torch.optim.Adam(head.parameters(), lr=0.01), model.emb.make_optimizer(OPTS[kind])]


def train(model, opts, batches, rank=0, world=1, group=None):
    losses = []
    for kjt, y in batches:
        kjt, y = part(kjt, y, rank, world)
        loss = F.binary_cross_entropy_with_logits(model(kjt), y)  # mean over this rank's half
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        total = loss.detach() * y.numel()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / B)
    return losses


def state_of(model, opts, step):
    return {"model": plain_keys(model, model.state_dict()), "optimizers": [o.state_dict() for o in opts], "step": step}


def save_ckpt(directory, model, opts, rank, world, step):
    rows, counts, rest = split_state(model, state_of(model, opts, step))
    save_shard(directory, rank, world, rows, counts)
    if rank == 0:
        torch.save(rest, Path(directory) / "dense.pt")


def restore(directory, model, opts, rank, world):
    rows, _ = load_shard(directory, rank, world)
    state = merge_state(rows, torch.load(Path(directory) / "dense.pt", weights_only=False))
    model.load_state_dict(wrapped_keys(model, state["model"]))
    for o, s in zip(opts, state["optimizers"]):
        o.load_state_dict(s)
    return state


def full_rows(per_rank: list[torch.Tensor]) -> torch.Tensor:
    W = len(per_rank)
    out = torch.empty(sum(r.shape[0] for r in per_rank), per_rank[0].shape[1])
    for r, t in enumerate(per_rank):
        out[r::W] = t
    return out


# ---------------------------------------------------------------- the 2 gloo workers

def _worker(rank: int, world: int, port: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = Path(out)
    group = shard_group()
    batches = global_batches(STEPS)
    res: dict = {}
    for kind in OPTS:
        model = Tiny(group)
        model.head = DDP(model.head)
        opts = make_opts(model, kind)
        res[f"{kind}/losses"] = train(model, opts, batches, rank, world)
        res[f"{kind}/rows"] = model.emb.rows.clone()
        res[f"{kind}/head"] = {k: v.clone() for k, v in model.head.module.state_dict().items()}
        if kind == "adam":  # checkpoint after 20 steps, restore into fresh models, predict
            save_ckpt(out / "ckpt2", model, opts, rank, world, STEPS)
    # serving: which ids each owner served to whom
    model = Tiny(group)
    kjt, _ = part(*batches[0], rank, world)
    model.emb.serve_log = []
    with torch.no_grad():
        model(kjt)
    res["serve/log"] = model.emb.serve_log
    res["serve/asked"] = torch.unique(model.emb.global_ids(kjt))
    # the row gradients each owner holds after one backward (before any step)
    model = Tiny(group)
    model.head = DDP(model.head)
    kjt, y = part(*batches[0], rank, world)
    F.binary_cross_entropy_with_logits(model(kjt), y).backward()
    idx, grad = model.emb.take_grads()
    res["grad/gids"], res["grad/values"] = idx * world + rank, grad
    # restore the 2-worker checkpoint on 2 workers, and the 1-worker one written by the test
    eval_kjt, _ = part(make_kjt(B, torch.Generator().manual_seed(99)), torch.zeros(B), rank, world)
    more = global_batches(3, seed=11)
    for src in ("ckpt2", "ckpt1"):
        model = Tiny(group, seed=5)  # different init: only the restore can make them agree
        model.head = DDP(model.head)
        opts = make_opts(model, "adam")
        restore(out / src, model, opts, rank, world)
        model.eval()
        with torch.no_grad():
            res[f"{src}/pred"] = model(eval_kjt)
        model.train()
        train(model, opts, more, rank, world)
        res[f"{src}/rows_after"] = model.emb.rows.clone()
    torch.save(res, out / f"res-{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    # the 1-worker checkpoint the workers restore from (1 -> 2 re-sharding)
    model = Tiny()
    opts = make_opts(model, "adam")
    train(model, opts, global_batches(STEPS))
    save_ckpt(out / "ckpt1", model, opts, 0, 1, STEPS)
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out, [torch.load(out / f"res-{r}.pt", weights_only=False) for r in range(2)]


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", list(OPTS))
def test_two_workers_train_like_one(two_workers, kind):
    _, res = two_workers
    model = Tiny()
    opts = make_opts(model, kind)
    losses = train(model, opts, global_batches(STEPS))
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(res[0][f"{kind}/losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    assert res[0][f"{kind}/losses"] == res[1][f"{kind}/losses"]
    rows = full_rows([res[0][f"{kind}/rows"], res[1][f"{kind}/rows"]])
    moved = (rows - init_rows(model.emb.num_rows, DIM, 0, 1, 0.1, 1)).abs().sum(1) > 0
    assert moved.sum() > model.emb.num_rows // 2  # the comparison covers rows that were trained
    torch.testing.assert_close(rows, model.emb.rows, atol=1e-5, rtol=0)
    for k, v in model.head.state_dict().items():
        torch.testing.assert_close(res[0][f"{kind}/head"][k], v, atol=1e-5, rtol=0)


def test_every_id_served_once_by_its_owner(two_workers):
    _, res = two_workers
    W = 2
    for owner in range(W):
        log = res[owner]["serve/log"]
        assert len(log) == 1
        splits, gids = log[0]
        assert bool((gids % W == owner).all())  # an owner serves only its own rows
        for requester, seg in enumerate(torch.split(gids, splits)):
            asked = res[requester]["serve/asked"]
            want = asked[asked % W == owner]
            assert seg.numel() == torch.unique(seg).numel()  # once each
            assert torch.equal(torch.sort(seg).values, want)  # and all of them
    # the batch's ctx ids (vocab 3) appear on both ranks: each rank asks for them once
    assert sum(len(res[r]["serve/asked"]) for r in range(W)) > len(
        torch.unique(torch.cat([res[r]["serve/asked"] for r in range(W)])))


def test_row_gradients_reach_owners_summed_and_averaged(two_workers):
    _, res = two_workers
    model = Tiny()
    kjt, y = global_batches(1)[0]
    F.binary_cross_entropy_with_logits(model(kjt), y).backward()  # mean over the global batch
    idx, grad = model.emb.take_grads()
    want = torch.zeros(model.emb.num_rows, DIM).index_add_(0, idx, grad)
    got = torch.zeros(model.emb.num_rows, DIM)
    for r in range(2):
        gids = res[r]["grad/gids"]
        assert bool((gids % 2 == r).all()) and gids.numel() == torch.unique(gids).numel()
        got[gids] = res[r]["grad/values"]
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert int((want.abs().sum(1) > 0).sum()) == idx.numel()


@pytest.mark.parametrize("src", ["ckpt2", "ckpt1"])
def test_checkpoint_restores_across_world_sizes(two_workers, src):
    out, res = two_workers
    eval_kjt = make_kjt(B, torch.Generator().manual_seed(99))
    model = Tiny(seed=5)
    opts = make_opts(model, "adam")
    restore(out / src, model, opts, 0, 1)
    model.eval()
    with torch.no_grad():
        pred = model(eval_kjt)
    two = torch.cat([res[0][f"{src}/pred"], res[1][f"{src}/pred"]])
    torch.testing.assert_close(two, pred, atol=1e-6, rtol=0)
    # optimizer state was re-sharded too: 3 more steps agree
    model.train()
    train(model, opts, global_batches(3, seed=11))
    rows = full_rows([res[0][f"{src}/rows_after"], res[1][f"{src}/rows_after"]])
    torch.testing.assert_close(rows, model.emb.rows, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- one process

def test_world_one_matches_reference_and_sparse_adam():
    ref = EmbeddingCollection(FIELDS, DIM)
    sh = ShardedEmbeddingCollection(FIELDS, DIM)
    sh.load_state_dict(ref.state_dict())
    o_ref = ref.make_optimizer({"lr": 0.05})  # torch.optim.SparseAdam
    o_sh = sh.make_optimizer({"sparse_lr": 0.05, "sparse_bias_correction": "global"})
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        kjt, target = make_kjt(B, g), torch.randn(B, len(FIELDS), DIM, generator=g)
        outs = []
        for e, o in ((ref, o_ref), (sh, o_sh)):
            o.zero_grad()
            out = e(kjt)
            ((out - target) ** 2).sum().backward()
            o.step()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sh.rows, ref.weight.detach(), atol=1e-6, rtol=0)
    assert sh.state_dict().keys() == ref.state_dict().keys()


def test_rowwise_adagrad_and_lazy_adam_by_hand():
    fields = [FieldConfig("a", "multi", 5)]
    emb = ShardedEmbeddingCollection(fields, 2)
    w0 = emb.rows.clone()
    # one bag {1, 1, 3}: row 1 gets twice the gradient of row 3; rows 0, 2, 4 untouched
    kjt = KeyedJagged(["a"], torch.tensor([1, 1, 3]), torch.tensor([0, 3]), torch.ones(3), 1)
    gvec = torch.tensor([1.0, -2.0])
    opt = emb.make_optimizer({"sparse_optimizer": "adagrad", "sparse_lr": 0.1})
    for _ in range(2):
        opt.zero_grad()
        (emb(kjt)[0, 0] * gvec).sum().backward()
        opt.step()
    g1, g3 = 2 * gvec, gvec
    want = w0.clone()
    s1, s3 = 0.0, 0.0
    for _ in range(2):
        s1, s3 = s1 + float((g1**2).mean()), s3 + float((g3**2).mean())
        want[1] -= 0.1 * g1 / (s1**0.5 + 1e-8)
        want[3] -= 0.1 * g3 / (s3**0.5 + 1e-8)
    torch.testing.assert_close(emb.rows, want)
    assert torch.equal(emb.rows[[0, 2, 4]], w0[[0, 2, 4]])

    # lazy Adam, per-row bias correction: row 3 is touched at step 2 only, and its
    # first update is lr * sign(g) (as large as row 1's first), m/v of others stay 0
    emb = ShardedEmbeddingCollection(fields, 2)
    w0 = emb.rows.clone()
    opt = emb.make_optimizer({"sparse_optimizer": "adam", "sparse_lr": 0.01})
    for bag in ([1], [3]):
        kjt = KeyedJagged(["a"], torch.tensor(bag), torch.tensor([0, 1]), torch.ones(1), 1)
        opt.zero_grad()
        (emb(kjt)[0, 0] * gvec).sum().backward()
        opt.step()
    step = torch.tensor([0.01, -0.01])
    torch.testing.assert_close(emb.rows[1], w0[1] - step, atol=1e-7, rtol=0)
    torch.testing.assert_close(emb.rows[3], w0[3] - step, atol=1e-7, rtol=0)
    st = opt.state_dict()["rows"]
    assert st["row_step"].tolist() == [0, 1, 0, 1, 0]
    assert torch.equal(st["exp_avg"][[0, 2, 4]], torch.zeros(3, 2))


def test_init_and_reshard_do_not_depend_on_world(tmp_path):
    N, d = 70_000, 3  # more than one init chunk
    table = init_rows(N, d, 0, 1, 0.01, 4)
    for W in (2, 3):
        parts = [init_rows(N, d, r, W, 0.01, 4) for r in range(W)]
        assert torch.equal(full_rows(parts), table)
    # written by 3 ranks, read back by 2 and by 1
    state = torch.arange(N, dtype=torch.int32)
    for r in range(3):
        save_shard(tmp_path, r, 3, {"w": table[r::3], "s": state[r::3]}, {"w": N, "s": N}, {"step": 9})
    for W in (1, 2):
        got = [load_shard(tmp_path, r, W) for r in range(W)]
        assert torch.equal(full_rows([g[0]["w"] for g in got]), table)
        assert torch.equal(torch.cat([g[0]["s"] for g in got]).sort().values, state)
        assert got[0][1] == {"step": 9}


def test_bf16_towers_keep_fp32_outputs_and_keys():
    from train.device import bf16_towers

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(32, 16)
    want = dense(x)
    keys = list(dense.state_dict())
    bf16_towers(dense, "cpu")
    got = dense(x)
    assert got.dtype == torch.float32 and list(dense.state_dict()) == keys
    assert dense[0].weight.dtype == torch.float32  # parameters stay fp32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # bf16 matmuls: close, not equal
    assert not torch.equal(got, want)
    dense.eval()
    assert torch.equal(dense(x), want)  # eval mode runs fp32
