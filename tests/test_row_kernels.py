"""The fused row kernels (train/shard/row_kernels.py) against the sparse optimizers' torch
ops: the same rows, moments, step counts and Adagrad sums after many steps, every bias
correction; and the switch that turns them off. The hand-computed optimizer tests in
test_shard.py run on whichever path is active (the kernels, where they build)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from train.embedding import FieldConfig
from train.shard import ShardedEmbeddingCollection
from train.shard import row_kernels
from train.shard.optim import make_row_optimizer

# ESMM_ROW_KERNELS=off (the torch-ops path, on purpose) skips the kernel comparisons; else
# the kernels must build here (g++ and ninja are present)
needs_kernels = pytest.mark.skipif(row_kernels.switched_off(), reason="ESMM_ROW_KERNELS=off")
N_ROWS, DIM = 5_000, 7  # 7: the kernels' inner loop has no SIMD-width multiple to lean on


def run(cfg: dict, fused: bool, monkeypatch) -> tuple[torch.Tensor, dict]:
    """12 optimizer steps on one table from one seed; each step touches ~600 unique rows,
    half of them rows that earlier steps touched (moments and counts carry over)."""
    if not fused:
        monkeypatch.setitem(row_kernels._state, "mod", None)
    emb = ShardedEmbeddingCollection([FieldConfig("f", "single", N_ROWS)], DIM, init_std=0.1, seed=1)
    opt = make_row_optimizer(emb, cfg)
    g = torch.Generator().manual_seed(2)
    hot = torch.randperm(N_ROWS, generator=g)[:400]
    for _ in range(12):
        idx = torch.cat([hot[torch.randperm(400, generator=g)[:300]], torch.randint(0, N_ROWS, (300,), generator=g)])
        idx = idx.unique()
        grad = torch.randn(idx.numel(), DIM, generator=g) * torch.rand(idx.numel(), 1, generator=g)
        emb.pending_grads.append((idx, grad, True))
        opt.step()
    monkeypatch.undo()
    return emb.rows.clone(), {k: v.clone() for k, v in opt.state_dict()["rows"].items()}


@needs_kernels
@pytest.mark.parametrize("cfg", [
    {"sparse_optimizer": "adam", "sparse_lr": 0.01},
    {"sparse_optimizer": "adam", "sparse_lr": 0.01, "sparse_bias_correction": "global", "betas": (0.8, 0.99)},
    {"sparse_optimizer": "adagrad", "sparse_lr": 0.1},
], ids=["adam-row", "adam-global", "adagrad"])
def test_fused_update_equals_torch_ops(cfg, monkeypatch):
    assert row_kernels.kernels() is not None, "the fused row kernels did not build here (g++ and ninja are present)"
    rows_k, state_k = run(cfg, True, monkeypatch)
    rows_t, state_t = run(cfg, False, monkeypatch)
    assert not torch.equal(rows_t, ShardedEmbeddingCollection([FieldConfig("f", "single", N_ROWS)], DIM, 0.1,
                                                              seed=1).rows)  # the steps moved rows
    # float rounding only: torch's lerp is one fused multiply-add (the kernel rounds twice)
    # and its mean sums in another order; a wrong row, count or scale differs by O(1)
    torch.testing.assert_close(rows_k, rows_t, rtol=0, atol=2e-7)
    assert state_k.keys() == state_t.keys()
    for name in state_t:
        if state_t[name].is_floating_point():
            torch.testing.assert_close(state_k[name], state_t[name], rtol=1e-5, atol=1e-7)
        else:  # per-row update counts: exactly
            assert torch.equal(state_k[name], state_t[name])


def test_off_switch_and_other_devices():
    out = subprocess.run([sys.executable, "-c",
                          "import torch; from train.shard import row_kernels as k; "
                          "print(k.kernels() is None, k.for_tensor(torch.zeros(2, 2)) is None)"],
                         env={**os.environ, "ESMM_ROW_KERNELS": "off"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    assert row_kernels.for_tensor(torch.zeros(2, 2, dtype=torch.float64)) is None  # float32 rows only


@needs_kernels
@pytest.mark.parametrize("n_fields", [3, 1])
@pytest.mark.parametrize("cfg", [{"sparse_optimizer": "adam", "sparse_lr": 0.01},
                                 {"sparse_optimizer": "adagrad", "sparse_lr": 0.1}], ids=["adam", "adagrad"])
def test_grouped_gradients_summed_in_the_kernel_as_embedding_bag_sums_them(cfg, n_fields):
    """World size 1 leaves the rows' gradients unsummed (GroupedGrads: every sample's row and
    the dedup's groups); the kernels sum each group in their pass. Bit for bit what the
    same kernels do with embedding_bag's sums, over steps that carry state over; the same
    with the samples' rows as a [B, F, dim] view whose samples lie further apart (the towers'
    padded input gradient), the gaps holding garbage that a wrong stride would read."""
    from train.shard.collection import dedup_field_major
    from train.shard.optim import GroupedGrads

    assert row_kernels.kernels() is not None
    out = []
    for mode in ("grouped", "strided", "summed"):
        emb = ShardedEmbeddingCollection([FieldConfig("f", "single", N_ROWS)], DIM, init_std=0.1, seed=1)
        opt = make_row_optimizer(emb, cfg)
        g = torch.Generator().manual_seed(4)
        for _ in range(6):
            ids = torch.randint(0, 900, (n_fields, 400), generator=g) \
                + torch.tensor([[0], [1500], [3000]])[:n_fields]  # [F, B]
            uniq, order, starts = dedup_field_major(ids)
            samples = torch.randn(ids.numel(), DIM, generator=g)
            if mode == "strided":
                wide = torch.full((400, n_fields * DIM + 5), float("nan"))
                wide[:, :n_fields * DIM] = samples.view(400, n_fields * DIM)
                samples = wide[:, :n_fields * DIM].view(400, n_fields, DIM)
            gg = GroupedGrads(samples, order, starts)
            emb.pending_grads.append((uniq, gg.sum() if mode == "summed" else gg, True))
            opt.step()
        out.append((emb.rows.clone(), opt.state_dict()["rows"]))
    (rows_s, state_s) = out[-1]
    for rows, state in out[:-1]:
        assert torch.equal(rows, rows_s)
        for name in state_s:
            assert torch.equal(state[name], state_s[name]), name


def test_grouped_gradients_sum_to_the_index_add_of_the_samples():
    """GroupedGrads.sum() (the torch ops' path) is each unique row's index_add_ of its samples."""
    from train.shard.collection import dedup_field_major
    from train.shard.optim import GroupedGrads

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (2, 300), generator=g) + torch.tensor([[0], [50]])
    uniq, order, starts = dedup_field_major(ids)
    samples = torch.randn(ids.numel(), DIM, generator=g)
    sample_ids = ids.t().reshape(-1)
    want = torch.zeros(100, DIM).index_add_(0, sample_ids, samples)[uniq]
    torch.testing.assert_close(GroupedGrads(samples, order, starts).sum(), want, rtol=1e-6, atol=1e-6)
    wide = torch.full((300, 2 * DIM + 3), float("nan"))  # samples further apart: [B, F, dim] view
    wide[:, :2 * DIM] = samples.view(300, 2 * DIM)
    strided = wide[:, :2 * DIM].view(300, 2, DIM)
    torch.testing.assert_close(GroupedGrads(strided, order, starts).sum(), want, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_tower_kernels_equal_the_torch_ops_on_any_thread_count():
    """bias_relu_ and relu_grad_colsum_ (train.fused_towers): the values of relu(h + b) and
    threshold_backward bit for bit, on a column block of a wider matrix (its other columns
    untouched); the bias gradient within float rounding of the float64 column sums, and the
    same bits on 1 and 2 threads (300 rows: two full blocks of 128 and a short one)."""
    k = row_kernels.for_tensor(torch.zeros(1))
    g = torch.Generator().manual_seed(6)
    wide, b = torch.randn(300, 50, generator=g), torch.randn(37, generator=g)
    h = wide[:, 5:42]
    want = torch.relu(h + b)
    before = wide.clone()
    k.bias_relu_(h, b)
    assert torch.equal(h, want) and (h == 0).any()
    assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, 42:], before[:, 42:])
    grad = torch.randn(300, 37, generator=g)
    want_g = torch.ops.aten.threshold_backward(grad, h, 0)
    sums = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            gg = grad.clone()
            sums.append(k.relu_grad_colsum_(gg, h))
            assert torch.equal(gg, want_g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sums[0], sums[1])
    torch.testing.assert_close(sums[0], want_g.double().sum(0).float(), rtol=1e-6, atol=1e-6)


@needs_kernels
def test_head_kernels_equal_the_torch_ops_on_any_thread_count():
    """head_forward and head_backward (a tower's output layer and the ReLU below it,
    train.fused_towers) against addmm, mm and threshold_backward, on a column block of a
    wider matrix: the input's gradient bit for bit, the sums within float rounding of
    float64 and the same bits on 1 and 2 threads (300 rows: two blocks of 128 and a short
    one); transpose_copy equals a transposing copy on a shape that is no tile multiple."""
    k = row_kernels.for_tensor(torch.zeros(1))
    g = torch.Generator().manual_seed(8)
    h = torch.randn(300, 50, generator=g)[:, 5:42].relu()
    w, b, grad = torch.randn(1, 37, generator=g), torch.randn(1, generator=g), torch.randn(300, 1, generator=g)
    torch.testing.assert_close(k.head_forward(h, w.reshape(-1), b), torch.addmm(b, h, w.t()), rtol=1e-6, atol=1e-6)
    want_gin = torch.ops.aten.threshold_backward(grad.mm(w), h, 0)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(k.head_backward(grad.reshape(-1), h, w.reshape(-1)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outs):
        assert torch.equal(one, two)
    gin, dw, db, db_in = outs[0]
    assert torch.equal(gin, want_gin) and (gin == 0).any()
    g64, h64 = grad.double(), h.double()
    torch.testing.assert_close(dw, (g64.t() @ h64).reshape(-1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, g64.sum(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db_in, want_gin.double().sum(0).float(), rtol=1e-5, atol=1e-6)
    y = torch.randn(70, 45, generator=g)
    assert torch.equal(k.transpose_copy(y), y.t().contiguous())


@needs_kernels
def test_batch_gathered_as_the_torch_ops_do():
    """gather_batch (a shuffled batch's ids and labels, train.data.Columns.gather) equals
    index_select(...).t() and the labels' index_select, repeats included, and refuses a row
    outside the grid by name."""
    k = row_kernels.for_tensor(torch.zeros(1, dtype=torch.int64), torch.int64)
    g = torch.Generator().manual_seed(7)
    grid = torch.randint(0, 10**9, (500, 23), generator=g)
    click, conv = torch.rand(500, generator=g), torch.rand(500, generator=g)
    rows = torch.randint(0, 500, (700,), generator=g)
    ids, c, z = k.gather_batch(grid, rows, [click, conv])
    assert torch.equal(ids, grid.index_select(0, rows).t())
    assert torch.equal(c, click[rows]) and torch.equal(z, conv[rows])
    with pytest.raises(RuntimeError, match="row 500 outside the grid's 500 rows"):
        k.gather_batch(grid, torch.tensor([3, 500]), [])
