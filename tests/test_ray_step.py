"""One training step on 2 gloo ranks (the Ray worker's step without Ray) against one process.

- uneven rank batches (5 rows and 2 rows) give the one-process step on all 7 rows:
  the same rows, row optimizer state and dense weights (train.ray_worker.GlobalMeanLoss);
- a rank that pads (train.ray_data.blank_row) changes nothing: the step equals the
  one-process step on the other rank's rows alone, every row and every optimizer
  state included (a blank row of id 0 used to move id 0's rows under lazy Adam);
- the loss the worker reports (LossTally, summed over ranks) is the one-process loss;
- a checkpoint carries each rank's RNG state: dropout resumes as it would have run.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.embedding import FieldConfig
from train.jagged import Batch, KeyedJagged, take_batch
from train.model import ESMM, EsmmConfig

FIELDS = [FieldConfig("user", "single", 9), FieldConfig("hist", "multi", 7)]
CFG = EsmmConfig(dim=3, hidden=(5,), init_bias=False)


def rows_batch() -> Batch:
    """7 rows; row b: user id b+1 (never 0), hist ids of varying length, some weights != 1."""
    users = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    hist_len = torch.tensor([2, 0, 1, 3, 1, 0, 2])
    hist = torch.tensor([1, 2, 3, 4, 5, 6, 2, 3, 1])
    offsets = torch.cat([torch.arange(8), 7 + torch.cumsum(hist_len, 0)])
    kjt = KeyedJagged(["user", "hist"], torch.cat([users, hist]), offsets, None, 7)
    return Batch(kjt, torch.tensor([1., 1., 0., 1., 0., 1., 1.]), torch.tensor([1., 0., 0., 0., 0., 1., 0.]),
                 torch.tensor([1., 2., 1., 1., .5, 1., 1.]))


def build(group):
    from train.shard import ShardedEmbeddingCollection

    torch.manual_seed(0)
    return ESMM(FIELDS, CFG, lambda fs, d: ShardedEmbeddingCollection(fs, d, init_std=0.3, group=group, seed=7))


def state_of(model, opts, rank: int, world: int) -> dict:
    """Full tables (rows and row optimizer state, gid order) and the dense state."""
    emb = model.embeddings[0]
    out = {"rows": emb.rows.clone()}
    for k, v in opts[1].row_state.items():
        out[k] = v.clone()
    out["step"] = torch.tensor(opts[1].step_count)
    dense = model.dense.module if hasattr(model.dense, "module") else model.dense
    for k, v in dense.state_dict().items():
        out["dense." + k] = v.clone()
    for i, s in enumerate(opts[0].state.values()):
        for k, v in s.items():
            out[f"adam.{i}.{k}"] = v.clone()
    if world > 1:  # gather every rank's rows into gid order
        for k in ("rows", "exp_avg", "exp_avg_sq", "row_step"):
            n = emb.num_rows
            full = torch.zeros((n,) + tuple(out[k].shape[1:]), dtype=out[k].dtype)
            full[rank::world] = out[k]
            dist.all_reduce(full)  # each gid is owned by one rank: the sum is the table
            out[k] = full
    return out


def one_step(model, batch, opts):
    loss = model.loss(batch)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return loss


def _worker(rank: int, port: int, case: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from train.ray_data import blank_row
    from train.ray_worker import GlobalMeanLoss, LossTally
    from train.shard import shard_group

    group = shard_group()
    model = build(group)
    model.dense = DDP(model.dense)
    tally = LossTally()
    model.loss_mean = GlobalMeanLoss(2, torch.device("cpu"), tally)
    opts = model.make_optimizers()
    full = rows_batch()
    if case == "uneven":
        mine = take_batch(full, torch.arange(0, 5) if rank == 0 else torch.arange(5, 7))
    else:  # rank 1 pads
        mine = full if rank == 0 else blank_row(FIELDS)
    model.train()
    one_step(model, mine, opts)
    sums = tally.global_sums(torch.device("cpu"), 2).tolist()
    again = tally.global_sums(torch.device("cpu"), 2).tolist()  # reading the sums (each checkpoint does) changes nothing
    st = state_of(model, opts, rank, 2)
    if rank == 0:
        torch.save({"state": st, "loss": float(sums[0] / sums[1]), "sums": sums, "again": again}, out)
    dist.destroy_process_group()


def run_two(case: str, tmp_path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"{case}.pt")
    mp.start_processes(_worker, args=(port, case, out), nprocs=2, start_method="spawn", join=True)
    return torch.load(out, weights_only=True)


def reference(batch: Batch) -> dict:
    model = build(None)
    opts = model.make_optimizers()
    model.train()
    with torch.no_grad():
        loss = float(model.loss(batch))
    one_step(model, batch, opts)
    return {"state": state_of(model, opts, 0, 1), "loss": loss}


def assert_same_state(got: dict, ref: dict):
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("case", ["uneven", "padded"])
def test_two_rank_step_is_the_one_process_step(case, tmp_path):
    got = run_two(case, tmp_path)
    ref = reference(rows_batch())  # padded: rank 0 holds all 7 rows, rank 1 a blank row
    assert_same_state(got["state"], ref["state"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["again"] == got["sums"]


def test_blank_row_touches_no_row():
    """The padding row has no ids: a step on it alone moves no row and no row state."""
    from train.ray_data import blank_row
    from train.ray_worker import GlobalMeanLoss

    b = blank_row(FIELDS)
    assert b.size == 1 and b.features.values.numel() == 0 and float(b.weight.sum()) == 0.0
    model = build(None)
    model.loss_mean = GlobalMeanLoss(1, torch.device("cpu"))
    opts = model.make_optimizers()
    before = state_of(model, opts, 0, 1)
    one_step(model, b, opts)
    after = state_of(model, opts, 0, 1)
    for k in before:  # rows, row state and the row optimizer's step count alike
        assert torch.equal(before[k], after[k]), k


def test_checkpoint_carries_the_rng_so_dropout_resumes_as_it_would_have_run(tmp_path):
    """A restarted worker starts with another global RNG state; restoring its checkpoint
    puts back the one it saved, so the dropout masks after the checkpoint are those the
    uninterrupted run drew (and the rows come back too)."""
    from train.shard import ShardedEmbeddingCollection
    from train.ray_worker import restore_state, write_checkpoint

    torch.manual_seed(0)
    model = ESMM(FIELDS, EsmmConfig(dim=3, hidden=(16,), dropout=0.5, init_bias=False),
                 lambda fs, d: ShardedEmbeddingCollection(fs, d, init_std=0.3, group=None, seed=7))
    model.train()
    kjt = rows_batch().features
    model(kjt)  # draws before the checkpoint
    write_checkpoint(tmp_path, model, {"model": model.state_dict(), "epoch": 0, "step": 3}, 0, 1, {})
    want = model(kjt)  # the uninterrupted run's next masks
    torch.manual_seed(1234)  # the restarted process
    state = restore_state(model, str(tmp_path), 0, 1)
    got = model(kjt)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not torch.equal(model(kjt)["ctr"], want["ctr"])  # dropout is live: masks differ per draw
    assert torch.equal(state["model"]["embeddings.0.weight"], model.embeddings[0].rows)
