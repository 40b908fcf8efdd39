"""The training step's fast paths (issue 14) give what the plain definitions give:
lazy Adam's bias-correction table, shuffled batches gathered per batch, fused shared
towers, and the tower precision ``auto`` resolves to."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from train import device as dev
from train.data import Columns, FieldColumn
from train.embedding import FieldConfig
from train.errors import InputError
from train.jagged import KeyedJagged, take_bags
from train.model import ESMM, EsmmConfig
from train.shard import ShardedEmbeddingCollection


def test_row_bias_correction_table_equals_float64_pow():
    emb = ShardedEmbeddingCollection([FieldConfig("a", "single", 3)], 2)
    opt = emb.make_optimizer({"sparse_lr": 3e-3, "betas": (0.9, 0.999)})
    k = torch.cat([torch.arange(1, 50_000), torch.tensor([10**6, 2**31 - 1])]).to(torch.int32)
    kd = k.to(torch.float64)
    want = ((1.0 - torch.pow(0.999, kd)).sqrt_().div_(1.0 - torch.pow(0.9, kd)).mul_(-3e-3)).to(torch.float32)
    assert torch.equal(opt._row_scale(k), want)
    assert opt._scale.numel() < 50_000  # the table ends where both powers stop mattering


def _columns(n: int = 50) -> Columns:
    g = torch.Generator().manual_seed(0)
    fields = [FieldConfig("u", "single", 9), FieldConfig("hist", "multi", 7), FieldConfig("w", "weighted", 5)]
    single = FieldColumn(torch.randint(0, 9, (n,), generator=g), torch.arange(n + 1), None)
    lens = torch.randint(0, 4, (n,), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    multi = FieldColumn(torch.randint(0, 7, (int(off[-1]),), generator=g), off, None)
    wvals = torch.randint(0, 5, (int(off[-1]),), generator=g)
    weighted = FieldColumn(wvals, off.clone(), torch.rand(int(off[-1]), generator=g))
    click = (torch.rand(n, generator=g) < 0.5).float()
    return Columns(fields, [single, multi, weighted], click, click * (torch.rand(n, generator=g) < 0.5).float(),
                   weight=torch.rand(n, generator=g))


def test_shuffled_batches_equal_slices_of_the_permuted_split():
    cols = _columns()
    perm = cols.permutation(seed=3, epoch=1)
    # the definition: a permuted copy of the whole split, sliced
    moved = [FieldColumn(*take_bags(c.values, c.offsets, perm, c.weights)) for c in cols.columns]
    whole = Columns(cols.fields, moved, cols.click[perm], cols.conversion[perm], None, cols.weight[perm])
    want = list(whole.batches(16))
    got = list(cols.batches(16, shuffle=True, seed=3, epoch=1))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a.features.values, b.features.values)
        assert torch.equal(a.features.offsets, b.features.offsets)
        assert torch.equal(a.features.weights, b.features.weights)
        for k in ("click", "conversion", "weight"):
            assert torch.equal(getattr(a, k), getattr(b, k))
    assert list(cols.batches(16, shuffle=True, seed=3, epoch=1, start_step=2))[0].features.values.equal(
        got[2].features.values)


def test_unweighted_batches_carry_no_weights_and_single_fields_unit_offsets():
    cols = _columns()
    only = Columns(cols.fields[:1], cols.columns[:1], cols.click, cols.conversion)
    b = next(only.batches(16, shuffle=True, seed=1))
    assert b.features.weights is None
    assert torch.equal(b.features.offsets, torch.arange(17))
    assert torch.equal(b.features.values, cols.columns[0].values[cols.permutation(1, 0)[:16]])


def _esmm(hidden=(20, 7), activation="relu"):
    torch.manual_seed(0)
    fields = [FieldConfig(f"f{i}", "single", 30) for i in range(5)]
    return ESMM(fields, EsmmConfig(dim=6, hidden=hidden, activation=activation))


@pytest.mark.parametrize("hidden,activation,fn", [
    ((20, 7), "relu", "SharedReluTowersBackward"),  # the paper's shape: one autograd function
    ((20,), "relu", "SharedReluTowersBackward"),
    ((20, 7, 5), "relu", "SharedReluTowersBackward"),
    ((20, 7), "gelu", "AddmmBackward"),  # not all ReLU: the fused first layer through autograd
])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch-ops"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkl"])
def test_fused_towers_equal_separate_towers(hidden, activation, fn, kernels, onednn, monkeypatch):
    """With the fused kernels (bias + ReLU, ReLU backward + bias gradient: one pass each)
    and without them (ESMM_ROW_KERNELS=off, no compiler, CUDA); the fused first layer by
    oneDNN and by MKL (its input gradient 16-column aligned: 30 inputs here)."""
    from train import fused_towers
    from train.shard import row_kernels

    if not kernels:
        monkeypatch.setitem(row_kernels._state, "mod", None)
    if not onednn:
        monkeypatch.setitem(fused_towers._ONEDNN, "op", None)
    else:
        assert fused_towers._onednn(torch.zeros(1)) is not None  # this torch has it (CPU wheels do)
    m = _esmm(hidden, activation)
    fused = copy.deepcopy(m)
    assert dev.fuse_shared_towers(fused.dense)
    x = torch.randn(64, 30, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = m.dense(x, x), fused.dense(x2, x2)
    assert type(b[0].grad_fn.next_functions[0][0]).__name__.startswith(fn)  # under the squeeze
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    (a[0].sum() + 2 * a[1].sum()).backward()
    (b[0].sum() + 2 * b[1].sum()).backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(m.dense.named_parameters(), fused.dense.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=k)
    assert fused.dense.state_dict().keys() == m.dense.state_dict().keys()


def test_fused_towers_under_ddp_get_the_separate_towers_gradients():
    """DDP (what the Ray workers wrap the towers in) sees SharedReluTowers' gradients: its
    reducer hooks fire on every parameter and the averaged grads are the modules' (world 1)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from conftest import free_port

    m = _esmm()
    ref, fused = copy.deepcopy(m.dense), copy.deepcopy(m.dense)
    assert dev.fuse_shared_towers(fused)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = DDP(fused)
        x = torch.randn(64, 30)
        a = ddp(x, x)
        assert type(a[0].grad_fn.next_functions[0][0]).__name__ == "SharedReluTowersBackward"
        (a[0].sum() + 2 * a[1].sum()).backward()
        b = ref(x, x)
        (b[0].sum() + 2 * b[1].sum()).backward()
        for (k, p), q in zip(ref.named_parameters(), fused.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=k)
    finally:
        dist.destroy_process_group()


def test_fused_towers_leave_eval_hooks_and_unshared_inputs_to_the_modules():
    m = _esmm()
    dev.fuse_shared_towers(m.dense)
    seen = []
    h = m.dense.towers[1].net[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    x = torch.randn(8, 30)
    m.dense(x, x)  # training mode, but a hook: the modules run
    assert seen == [(8, 20)]
    h.remove()
    m.eval()
    calls = []
    h = m.dense.towers[0].net[0].register_forward_pre_hook(lambda mod, i: calls.append(1))
    m.dense(x, x)
    h.remove()
    m.train()
    m.dense(x, x.clone())  # two different inputs (ESMM-NS): no fusion, same answer as the modules
    assert calls == [1]
    assert not dev.fuse_shared_towers(ESMM([FieldConfig("a", "single", 3)],
                                           EsmmConfig(dim=2, hidden=(4,), dropout=0.1)).dense)


def test_tower_precision_auto_follows_the_hardware(monkeypatch):
    assert dev.resolve_tower_precision("fp32", "cuda")[0] == "fp32"
    assert dev.resolve_tower_precision("bf16", "cpu")[0] == "bf16"
    assert dev.resolve_tower_precision("auto", "cuda")[0] == "bf16"
    monkeypatch.setattr(dev, "cpu_bf16_flag", lambda: None)
    assert dev.resolve_tower_precision("auto", "cpu") == ("fp32", "auto: this CPU has no avx512_bf16 or AMX")
    monkeypatch.setattr(dev, "cpu_bf16_flag", lambda: "amx_bf16")
    assert dev.resolve_tower_precision(None, "cpu") == ("bf16", "auto: this CPU has amx_bf16")
    with pytest.raises(InputError, match="tower_precision must be auto, fp32 or bf16, got 'fp16'"):
        dev.resolve_tower_precision("fp16")


def _smaps_entry(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``addr`` (empty if none)."""
    block, hit = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            if hit:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            hit, block = lo <= addr < hi, [line]
        elif hit:
            block.append(line)
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block[1:])} if hit else {}


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_tables_and_optimizer_state_sit_in_huge_page_mappings():
    """The rows, lazy Adam's m, v and step counts and the dedup's markers are each a
    mapping advised MADV_HUGEPAGE (train/shard/table_memory.py), holding what torch's
    own allocation held (the N(0, 0.01) init, zeros, all -1)."""
    from train.shard.table_memory import MIN_BYTES

    fields = [FieldConfig("user", "single", 800_000), FieldConfig("item", "single", 300_000)]  # int32s: 4.4 MB
    emb = ShardedEmbeddingCollection(fields, 18, seed=3)
    opt = emb.make_optimizer({"sparse_optimizer": "adam"})
    kjt = KeyedJagged(["user", "item"], torch.tensor([5, 199_999, 7, 0]), torch.arange(5), None, 2)
    emb(kjt)  # builds the dedup's markers
    tables = {"rows": emb.rows, "m and v": opt.mv, "step": opt.row_state["row_step"], "marker": emb._marker}
    for name, t in tables.items():
        assert t.numel() * t.element_size() >= MIN_BYTES
        entry = _smaps_entry(t.data_ptr())
        assert "hg" in entry["VmFlags"].split() and entry["THPeligible"] == "1", f"{name}: {entry}"
    assert not opt.mv.any() and not opt.row_state["row_step"].any() and bool((emb._marker == -1).all())
    assert emb.rows.abs().max() < 0.1 and emb.rows.std() == pytest.approx(0.01, rel=0.05)  # N(0, init_std)


def test_lean_adam_steps_like_fused_adam_and_resumes(monkeypatch):
    """dense_adam's LeanAdam: bit for bit torch.optim.Adam(fused=True) over steps and across
    a state_dict round trip, its own kernel call from the second step on (Adam's step only
    makes the state), and Adam's step again for a parameter without a gradient."""
    from torch import nn

    from train.ctr_cvr_model import LeanAdam

    torch.manual_seed(0)
    ref_net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 2))
    net = copy.deepcopy(ref_net)
    ref = torch.optim.Adam(ref_net.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01, fused=True)
    lean = first = LeanAdam(net.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01, fused=True)
    adam_steps = []
    inner = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: adam_steps.append(self) or inner(self, closure))
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        x = torch.randn(16, 20, generator=g)
        for n, o in ((ref_net, ref), (net, lean)):
            o.zero_grad(set_to_none=True)
            n(x).square().mean().backward()
            o.step()
        if i == 2:  # resume the lean one from its state dict
            state = copy.deepcopy(lean.state_dict())
            lean = LeanAdam(net.parameters(), lr=1.0, fused=True)
            lean.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(ref_net.parameters(), net.parameters())), f"step {i}"
    assert [sum(o is x for o in adam_steps) for x in (first, lean, ref)] == [1, 0, 6]
    net[2].bias.grad = None  # a parameter without a gradient: Adam's own step, which skips it
    before = net[2].bias.detach().clone()
    lean.step()
    assert adam_steps[-1] is lean and torch.equal(net[2].bias, before)
