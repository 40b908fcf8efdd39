"""The loop: resume == uninterrupted, save/load == same predictions, early stopping, shuffling."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from shard_writer import write_data
from train.data import load_manifest, load_split, manifest_fields
from train.evaluate import predict
from train.baselines import build_model
from train.local import dataset_view, load_model, save_model, train_model
from train.loop import TrainConfig, fit, view_loss
from train.model import EsmmConfig

MODEL = EsmmConfig(dim=4, hidden=(16, 8), lr=3e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_data(tmp_path_factory.mktemp("loop"), n_train=1200, n_test=400, seed=3)
    m = load_manifest(root)
    fields = manifest_fields(m)
    return root, load_split(root, "train", fields, m), load_split(root, "test", fields, m)


def test_shuffle_is_a_seeded_permutation_per_epoch(data):
    _, train, _ = data
    ids = lambda bs: torch.cat([b.features.values[: b.size] for b in bs])  # noqa: E731  user ids, field 0
    e0 = ids(train.batches(100, shuffle=True, seed=1, epoch=0))
    assert torch.equal(e0, ids(train.batches(100, shuffle=True, seed=1, epoch=0)))
    assert not torch.equal(e0, ids(train.batches(100, shuffle=True, seed=1, epoch=1)))
    assert torch.equal(e0.sort().values, train.columns[0].values.sort().values)  # every row once
    # resuming at step 4 gives exactly the rest of the epoch
    rest = ids(train.batches(100, shuffle=True, seed=1, epoch=0, start_step=4))
    assert torch.equal(rest, e0[400:])


@pytest.mark.parametrize("name", ["esmm", "aman"])
def test_resume_from_mid_epoch_checkpoint_equals_uninterrupted(data, name):
    """A run "crashed" mid-epoch and resumed from its checkpoint ends bit-identical to the
    uninterrupted one (AMAN: its sampled negatives are redrawn identically too)."""
    _, train, test = data
    model_cfg = EsmmConfig(dim=4, hidden=(16, 8), lr=3e-3, aman_rate=0.9)
    cfg = TrainConfig(epochs=2, batch_size=128, seed=5, checkpoint_every=3, val_fraction=0.1, threads=1)
    saved = []
    rest, val = train.split_off(cfg.val_fraction)

    def run(start_state=None, stop_after=None):
        torch.manual_seed(cfg.seed)
        m = build_model(name, train.fields, model_cfg)
        views = {}

        def batches(epoch, start):
            views.setdefault(epoch, dataset_view(m, rest, cfg.seed, epoch))
            return views[epoch].batches(cfg.batch_size, True, cfg.seed, epoch, start)

        def cb(state):
            saved.append(copy.deepcopy(state))
            if stop_after and len(saved) == stop_after:
                raise KeyboardInterrupt  # the "crash"

        try:
            r = fit(m, batches, lambda mm: view_loss(mm, val.batches(512), cfg.seed), cfg,
                    checkpoint_cb=cb, start_state=start_state, progress=False, apply_view=False)
        except KeyboardInterrupt:
            return None, None
        return m, r

    m_full, r_full = run()
    n_ckpt = len(saved)
    saved.clear()
    assert run(stop_after=2)[0] is None  # crashed after its 2nd checkpoint
    state = saved[-1]
    assert state["epoch"] == 0 and state["step"] == 6  # mid epoch 0 (checkpoint_every=3)
    saved.clear()
    m_res, r_res = run(start_state=state)
    assert len(saved) == n_ckpt - 2
    assert r_res["steps"] == r_full["steps"] and r_res["best_epoch"] == r_full["best_epoch"]
    for k, v in predict(m_full, test).items():
        torch.testing.assert_close(torch.from_numpy(predict(m_res, test)[k]), torch.from_numpy(v), rtol=0, atol=0)
    assert [h["val_loss"] for h in r_res["history"]] == [h["val_loss"] for h in r_full["history"]]


def test_save_load_gives_identical_predictions(data, tmp_path):
    _, train, test = data
    cfg = TrainConfig(epochs=1, batch_size=256, threads=1)
    for name in ("esmm", "division", "base"):
        model, _ = train_model(name, train, MODEL, cfg)
        save_model(model, tmp_path / name, name, MODEL, cfg)
        loaded, conf = load_model(tmp_path / name)
        assert conf["model"] == name
        a, b = predict(model, test), predict(loaded, test)
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (name, k)


def test_early_stopping_stops_and_restores_best(data):
    _, train, _ = data
    rest, val = train.split_off(0.2)
    torch.manual_seed(0)
    m = build_model("esmm", train.fields, EsmmConfig(dim=4, hidden=(16,), lr=0.05))  # overfits fast
    losses = iter([0.9, 0.8, 0.85, 0.7])  # best at epoch 1, no improvement at epoch 2 -> stop
    snapshots = []

    def eval_fn(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses)

    r = fit(m, lambda e, s: rest.batches(256, True, 0, e, s), eval_fn,
            TrainConfig(epochs=4, patience=1, threads=1), progress=False)
    assert r["stopped_early"] and len(r["history"]) == 3 and r["best_epoch"] == 1
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshots[1][k])  # the weights of the best epoch
    assert math.isclose(r["best_val_loss"], 0.8)


def test_train_model_resume_from_checkpoint_file(data, tmp_path):
    _, train, test = data
    cfg = TrainConfig(epochs=2, batch_size=256, threads=1, patience=0)
    ckpt = str(tmp_path / "checkpoint.pt")
    a, ra = train_model("esmm", train, MODEL, cfg, checkpoint_path=ckpt)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    b, rb = train_model("esmm", train, MODEL, cfg, checkpoint_path=ckpt, resume=True)  # nothing left to do
    assert rb["steps"] == ra["steps"] and len(rb["history"]) == 2
    pa_, pb = predict(a, test), predict(b, test)
    for k in pa_:
        assert (pa_[k] == pb[k]).all()


def test_bf16_towers_train_in_bf16_and_predict_in_fp32(data):
    """tower_precision=bf16 runs the towers' matmuls in bf16 while training (weights, rows
    and losses stay fp32); predictions run fp32, so they equal those of the same weights in
    an fp32 model exactly: a loaded model scores as the trained one did."""
    _, train, test = data
    cfg = TrainConfig(epochs=1, batch_size=128, seed=2, val_fraction=0.0, threads=1)
    model, _ = train_model("esmm", train, EsmmConfig(dim=4, hidden=(16, 8), lr=3e-3, tower_precision="bf16"),
                           cfg, progress=False)
    seen = []
    first = next(m for m in model.dense.modules() if isinstance(m, torch.nn.Linear))
    h = first.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    model.train()
    model.loss(next(iter(train.batches(64))))  # a training step's forward
    assert seen and all(d == torch.bfloat16 for d in seen)
    seen.clear()
    p16 = predict(model, test)
    h.remove()
    assert seen and all(d == torch.float32 for d in seen)
    assert all(p.dtype == torch.float32 for p in model.dense.parameters())
    fp32 = build_model("esmm", train.fields, EsmmConfig(dim=4, hidden=(16, 8)))
    fp32.load_state_dict(model.state_dict())
    p32 = predict(fp32, test)
    for k in ("p_ctr", "p_cvr"):
        assert torch.equal(torch.as_tensor(p16[k]), torch.as_tensor(p32[k])), k
    with pytest.raises(Exception, match="tower_precision"):
        train_model("esmm", train, EsmmConfig(dim=4, hidden=(16, 8), tower_precision="fp8"), cfg, progress=False)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch-ops"])
def test_shuffled_batch_holds_the_rows_it_names(data, kernels, monkeypatch):
    """A shuffled batch of single-value fields (Columns.gather: ids and labels in one pass
    with the kernels) is take(rows).slice(...) of the split: every field's ids, both
    labels, row for row."""
    from train.shard import row_kernels

    if not kernels:
        monkeypatch.setitem(row_kernels._state, "mod", None)
    from train.data import Columns

    _, train, _ = data
    copy_ = train.take(torch.arange(len(train)))
    single = [i for i, c in enumerate(copy_.columns) if c.one_per_row()]  # the grid's fields
    assert len(single) >= 3
    cols = Columns([copy_.fields[i] for i in single], [copy_.columns[i] for i in single], copy_.click,
                   copy_.conversion)
    assert cols._single_grid() is not None
    rows = cols.permutation(5, 0)[:300]
    got, want = cols.gather(rows), cols.take(rows).slice(0, 300)
    assert torch.equal(got.features.values, want.features.values)
    assert torch.equal(got.features.offsets, want.features.offsets)
    assert torch.equal(got.click, want.click) and torch.equal(got.conversion, want.conversion)
    assert got.click.sum() > 0 and got.conversion.sum() > 0  # both labels carry positives here
