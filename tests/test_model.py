"""ESMM's loss and product identity by hand, the baselines' training views, the data path."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from train.baselines import MODELS, NEEDS_CTR_MODEL, build_model
from train.data import arrow_to_batch, table_to_columns
from train.embedding import EmbeddingCollection, FieldConfig
from train.jagged import Batch, KeyedJagged, take_rows
from train.model import ESMM, EsmmConfig, esmm_loss, fused_esmm_mean_loss, log1mexp, weighted_mean
from train.shard import row_kernels

FIELDS = [FieldConfig("user", "single", 7), FieldConfig("hist", "multi", 11)]
SMALL = EsmmConfig(dim=4, hidden=(8, 4), embedding="plain")  # .weight is inspectable


def make_batch(click, conversion, seed=0) -> Batch:
    """Rows with one user id and 0..3 hist ids each."""
    g = torch.Generator().manual_seed(seed)
    B = len(click)
    users = torch.randint(0, 7, (B,), generator=g)
    lens = torch.randint(0, 4, (B,), generator=g)
    hist = torch.randint(0, 11, (int(lens.sum()),), generator=g)
    offsets = torch.cat([torch.arange(B + 1), B + torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lens]), 0)[1:]])
    kjt = KeyedJagged(["user", "hist"], torch.cat([users, hist]), offsets, torch.ones(B + hist.numel()), B)
    return Batch(kjt, torch.tensor(click, dtype=torch.float32), torch.tensor(conversion, dtype=torch.float32))


def bag_rows(kjt: KeyedJagged) -> list[tuple]:
    """Every row as a tuple of per-field id tuples (for comparing batches)."""
    B, out = kjt.batch_size, []
    for b in range(B):
        row = []
        for f in range(len(kjt.keys)):
            lo, hi = int(kjt.offsets[f * B + b]), int(kjt.offsets[f * B + b + 1])
            row.append(tuple(kjt.values[lo:hi].tolist()))
        out.append(tuple(row))
    return out


# ------------------------------------------------------------------ ESMM

def test_product_identity_and_loss_by_hand():
    torch.manual_seed(0)
    model = ESMM(FIELDS, SMALL)
    batch = make_batch([1, 0, 1, 0, 1], [1, 0, 0, 0, 1])
    p = model.predict(batch.features)
    assert torch.equal(p["p_ctcvr"], p["p_ctr"] * p["p_cvr"])
    out = model(batch.features)
    a, b = out["ctr"].double().detach().numpy(), out["cvr"].double().detach().numpy()
    y, z = batch.click.double().numpy(), batch.conversion.double().numpy()
    pctr, pcvr = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
    pctcvr = pctr * pcvr
    hand = np.mean(-(y * np.log(pctr) + (1 - y) * np.log(1 - pctr))
                   - (y * z * np.log(pctcvr) + (1 - y * z) * np.log(1 - pctcvr)))
    assert float(model.loss(batch).detach()) == pytest.approx(hand, rel=1e-5)
    np.testing.assert_allclose(p["p_ctcvr"].double().numpy(), pctcvr, rtol=1e-5)


def test_loss_is_exactly_ctr_plus_ctcvr_no_cvr_term():
    """dL/d(cvr logit) is the CTCVR term's alone: with a CVR loss it would differ on clicked z=0 rows."""
    a = torch.tensor([0.3, -1.0, 2.0, -0.5, 1.5], dtype=torch.float64)
    b = torch.tensor([-0.7, 0.4, 1.1, -2.0, 0.2], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 1, 0, 0, 1], dtype=torch.float64)
    z = torch.tensor([1, 0, 0, 0, 0], dtype=torch.float64)
    loss = esmm_loss(a, b, y, z) * 5  # sum over the batch
    loss.backward()
    pa_, pb = torch.sigmoid(a), torch.sigmoid(b.detach())
    # d/db of -[yz log(pa pb) + (1-yz) log(1 - pa pb)]
    expected = torch.where(y * z > 0, -(1 - pb), pa_ * pb * (1 - pb) / (1 - pa_ * pb))
    torch.testing.assert_close(b.grad, expected)
    # a CVR loss on the clicked rows would add (pb - z) there: not what we get
    with_cvr = expected + y * (pb - z)
    assert not torch.allclose(b.grad, with_cvr)


def test_loss_stable_at_extreme_logits():
    a = torch.tensor([-80.0, 80.0, -80.0, 80.0, 0.0], requires_grad=True)
    b = torch.tensor([-80.0, 80.0, 80.0, -80.0, 200.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    z = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    loss = esmm_loss(a, b, y, z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # log(1 - p) from log p, both ends
    x = torch.tensor([-1e-20, -1e-3, -0.5, -50.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))



@pytest.mark.skipif(row_kernels.switched_off(), reason="ESMM_ROW_KERNELS=off")
def test_fused_loss_and_gradient_equal_the_torch_ops():
    """ESMM.loss's fused kernel: the mean loss and both logits' gradients autograd gives
    through esmm_loss (float64 as the referee), at ordinary and extreme logits, every label
    pair, and log pCTCVR a hair below 0 (a = b = 30)."""
    g = torch.Generator().manual_seed(3)
    a = torch.cat([torch.randn(2000, generator=g) * 3, torch.tensor([-80.0, 80.0, -80.0, 80.0, 0.0, 30.0, 20.0])])
    b = torch.cat([torch.randn(2000, generator=g) * 3, torch.tensor([-80.0, 80.0, 80.0, -80.0, 200.0, 30.0, -20.0])])
    y = (torch.rand(a.numel(), generator=g) < 0.5).float()
    z = y * (torch.rand(a.numel(), generator=g) < 0.5).float()
    y[-7:], z[-7:] = torch.tensor([1.0, 0, 1, 1, 0, 0, 1]), torch.tensor([1.0, 0, 1, 0, 0, 0, 1])
    ref = [t.double().requires_grad_() for t in (a, b)]
    want = esmm_loss(ref[0], ref[1], y.double(), z.double())
    want.backward()
    got_in = [t.clone().requires_grad_() for t in (a, b)]
    got = fused_esmm_mean_loss(got_in[0], got_in[1], y, z)
    assert got is not None
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-6)
    n = a.numel()  # per-sample gradients (x n) of terms up to ~1 that cancel: float32's 1e-6 absolute
    for t, r in zip(got_in, ref):
        torch.testing.assert_close(t.grad.double() * n, r.grad * n, rtol=1e-5, atol=1e-6)
    # the torch ops in float32 agree as closely (what the kernel replaces)
    f32 = [t.clone().requires_grad_() for t in (a, b)]
    esmm_loss(f32[0], f32[1], y, z).backward()
    for t, r in zip(f32, got_in):
        torch.testing.assert_close(t.grad * n, r.grad * n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("embedding", ["plain", "sharded"])
def test_every_models_loss_is_the_mean_of_its_own_sample_losses(embedding):
    """model.loss = the weighted mean of that model's sample_losses, for every model: ESMM's
    fused loss must not stand in for the losses of its subclasses (ESCM², DCMT)."""
    cfg = EsmmConfig(dim=4, hidden=(8, 4), embedding=embedding)
    batch = make_batch([1, 0, 1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 1, 0, 0, 1])
    ctr = build_model("ctr", FIELDS, cfg)
    for name in MODELS:
        torch.manual_seed(1)
        m = build_model(name, FIELDS, cfg)
        if name in NEEDS_CTR_MODEL:
            m.set_ctr_model(ctr)
        view = m.train_view(batch, torch.Generator().manual_seed(0))
        want = weighted_mean(m.sample_losses(view), view.weight)
        torch.testing.assert_close(m.loss(view), want, rtol=1e-6, atol=1e-7, msg=name)


def test_shared_vs_not_shared_and_dense_apart():
    esmm, ns = build_model("esmm", FIELDS, SMALL), build_model("esmm-ns", FIELDS, SMALL)
    assert len(esmm.embedding_modules()) == 1 and len(ns.embedding_modules()) == 2
    for m in (esmm, ns, build_model("division", FIELDS, SMALL), build_model("base", FIELDS, SMALL)):
        emb = {id(p) for e in m.embedding_modules() for p in e.parameters()}
        dense = {id(p) for p in m.dense_parameters()}
        assert emb and dense and not emb & dense
        assert emb | dense == {id(p) for p in m.parameters()}
    # ESMM: both towers read the one dictionary -> both heads move its rows
    batch = make_batch([1, 1, 0], [1, 0, 0])
    out = esmm(batch.features)
    out["cvr"].sum().backward()
    assert esmm.embeddings[0].weight.grad is not None


@pytest.mark.parametrize("embedding", ["plain", "sharded"])
def test_every_model_trains_one_step(embedding):
    cfg = EsmmConfig(dim=4, hidden=(8, 4), embedding=embedding)
    batch = make_batch([1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 0])
    ctr = build_model("ctr", FIELDS, cfg)
    for name in MODELS:
        m = build_model(name, FIELDS, cfg)
        if name in NEEDS_CTR_MODEL:
            m.set_ctr_model(ctr)
        opts = m.make_optimizers()
        loss = m.loss(m.train_view(batch, torch.Generator().manual_seed(0)))
        loss.backward()
        for o in opts:
            o.step()
        assert torch.isfinite(loss), name
        assert set(m.predict(batch.features)) == set(m.outputs), name


# ------------------------------------------------------------------ baselines' views

def test_base_sees_only_clicked_rows():
    batch = make_batch([1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1])
    view = build_model("base", FIELDS, SMALL).train_view(batch)
    clicked = [0, 3, 5]
    assert view.size == 3 and view.click.tolist() == [1, 1, 1]
    assert view.conversion.tolist() == [1, 0, 1]
    rows = bag_rows(batch.features)
    assert bag_rows(view.features) == [rows[i] for i in clicked]


def test_aman_samples_unclicked_as_negatives_at_rate():
    n = 20000
    g = torch.Generator().manual_seed(1)
    click = (torch.rand(n, generator=g) < 0.1).float()
    conv = click * (torch.rand(n, generator=g) < 0.3).float()
    batch = make_batch(click.tolist(), conv.tolist())
    m = build_model("aman", FIELDS, EsmmConfig(dim=4, hidden=(4,), aman_rate=0.25))
    view = m.train_view(batch, torch.Generator().manual_seed(7))
    n_clicked, n_unclicked = int(click.sum()), n - int(click.sum())
    assert int(view.click.sum()) == n_clicked  # every clicked row is kept
    sampled = view.size - n_clicked
    sd = math.sqrt(n_unclicked * 0.25 * 0.75)
    assert abs(sampled - 0.25 * n_unclicked) < 4 * sd
    assert float(view.conversion[view.click == 0].sum()) == 0  # they come in as negatives
    assert int(view.conversion.sum()) == int(conv.sum())
    again = m.train_view(batch, torch.Generator().manual_seed(7))
    assert bag_rows(again.features) == bag_rows(view.features)  # a seeded draw


def test_oversampling_replicates_positives_k_times():
    batch = make_batch([1, 0, 1, 1, 0], [1, 0, 0, 1, 0])
    view = build_model("oversampling", FIELDS, EsmmConfig(dim=4, hidden=(4,), oversample_k=3)).train_view(batch)
    rows = bag_rows(batch.features)
    assert bag_rows(view.features) == [rows[0]] * 3 + [rows[2]] + [rows[3]] * 3
    assert view.conversion.tolist() == [1, 1, 1, 0, 1, 1, 1] and view.click.tolist() == [1] * 7


def test_unbias_ips_weights_clicked_rows_by_clipped_inverse_pctr():
    torch.manual_seed(3)
    ctr = build_model("ctr", FIELDS, SMALL)
    with torch.no_grad():  # a CTR model with spread-out predictions
        ctr.dense.towers[0].net[-1].bias.fill_(-2.0)
        ctr.embeddings[0].weight.normal_(0, 2.0)
    batch = make_batch([1, 0, 1, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0, 1, 0])
    m = build_model("unbias-ips", FIELDS, EsmmConfig(dim=4, hidden=(8, 4), unbias_clip=8.5, embedding="plain"))
    m.set_ctr_model(ctr)
    view = m.train_view(batch)
    clicked = torch.tensor([0, 2, 3, 4, 6, 7])
    p = ctr.predict(take_rows(batch.features, clicked))["p_ctr"]
    expected = torch.minimum(1 / p, torch.tensor(8.5))
    assert view.size == 6 and view.click.tolist() == [1] * 6
    torch.testing.assert_close(view.weight, expected)
    assert (1 / p > 8.5).any() and (1 / p < 8.5).any()  # both sides of the clip are exercised
    # the weights enter the loss: a weighted mean of per-sample BCE
    logit = m(view.features)["cvr"]
    per = torch.nn.functional.binary_cross_entropy_with_logits(logit, view.conversion, reduction="none")
    torch.testing.assert_close(m.loss(view), (per * expected).sum() / expected.sum())


def test_unbias_rejects_clicked_rows_with_pctr_as_the_probability():
    """The paper's UNBIAS: a clicked row is kept (weight 1) iff its draw u >= pCTR; u is a
    hash of the row's ids (same ids, same u, in any order), uniform over rows."""
    from train.baselines import row_uniform

    torch.manual_seed(3)
    ctr = build_model("ctr", FIELDS, SMALL)
    with torch.no_grad():
        ctr.dense.towers[0].net[-1].bias.fill_(-1.0)
        ctr.embeddings[0].weight.normal_(0, 2.0)
    n = 4000
    click = [1] * n
    batch = make_batch(click, [0] * n, seed=5)
    m = build_model("unbias", FIELDS, SMALL)
    m.set_ctr_model(ctr)
    view = m.train_view(batch)
    p = ctr.predict(batch.features)["p_ctr"]
    u = row_uniform(batch.features)
    assert view.size == n and torch.equal(view.weight, (u >= p).float())
    # u depends on the row's ids alone: reversed rows get reversed draws
    rev = torch.arange(n - 1, -1, -1)
    assert torch.equal(row_uniform(take_rows(batch.features, rev)), u[rev])
    # kept fraction = mean(1 - pCTR) (rows are distinct enough for u to be uniform)
    assert float(view.weight.mean()) == pytest.approx(float((1 - p).mean()), abs=0.03)
    assert 0.2 < float(p.mean()) < 0.8  # the test exercises real rejection


def test_division_two_networks_and_clamped_ratio():
    torch.manual_seed(0)
    m = build_model("division", FIELDS, EsmmConfig(dim=4, hidden=(8,), division_min_ctr=0.05, embedding="plain"))
    batch = make_batch([1, 0, 1, 0], [1, 0, 0, 0])
    with torch.no_grad():  # make pCTCVR > pCTR on some rows and pCTR tiny on others
        m.dense.towers[0].net[-1].bias.fill_(-3.0)
        m.dense.towers[1].net[-1].bias.fill_(-2.0)
    p = m.predict(batch.features)
    ratio = p["p_ctcvr"] / p["p_ctr"].clamp(min=0.05)
    torch.testing.assert_close(p["p_cvr"], ratio.clamp(0, 1))
    assert (p["p_cvr"] == 1).any() or (ratio <= 1).all()
    # the loss is BCE(y, CTR net) + BCE(y*z, CTCVR net), the nets share nothing
    out = m(batch.features)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    hand = bce(out["ctr"], batch.click) + bce(out["ctcvr"], batch.click * batch.conversion)
    torch.testing.assert_close(m.loss(batch), hand)
    e_ctr, e_ctcvr = m.embedding_modules()
    out["ctcvr"].sum().backward()
    assert e_ctr.weight.grad is None and e_ctcvr.weight.grad is not None


# ------------------------------------------------------------------ data path and pooling

def test_pooling_uses_all_300_values_of_a_field():
    n_vals = 300
    ids = np.arange(1, n_vals + 1) % 997
    w = np.linspace(0.1, 2.0, n_vals).astype(np.float32)
    table = pa.table({
        "click": pa.array([1, 0], pa.int8()), "conversion": pa.array([0, 0], pa.int8()),
        "item": pa.array([[3], [5]], pa.list_(pa.int64())),
        "hist": pa.array([ids.tolist(), [7]], pa.list_(pa.int64())),
        "hist__w": pa.array([w.tolist(), [0.5]], pa.list_(pa.float32())),
        "cates": pa.array([ids.tolist(), []], pa.list_(pa.int64())),
    })
    fields = [FieldConfig("item", "single", 10), FieldConfig("hist", "weighted", 997),
              FieldConfig("cates", "multi", 997, pooling="mean")]
    batch = arrow_to_batch(table, fields)
    assert batch.features.lengths().tolist() == [1, 1, n_vals, 1, n_vals, 0]
    emb = EmbeddingCollection(fields, dim=3)
    pooled = emb(batch.features)  # [2, 3, 3]
    rows = emb.weight.detach()
    base_hist, base_cates = 10, 10 + 997
    hand_sum = (rows[base_hist + torch.from_numpy(ids)] * torch.from_numpy(w).unsqueeze(1)).sum(0)
    hand_mean = rows[base_cates + torch.from_numpy(ids)].mean(0)
    torch.testing.assert_close(pooled[0, 1], hand_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[0, 2], hand_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[1, 2], torch.zeros(3))  # an empty bag pools to zeros


def test_arrow_to_batch_matches_rows_on_chunked_sliced_nullable_columns():
    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 50, rng.integers(0, 5)).tolist() for _ in range(40)]
    lists[5] = None  # a null list reads as an empty bag
    chunk1 = pa.array(lists[:25], pa.list_(pa.int64()))
    chunk2 = pa.array(lists[25:], pa.list_(pa.int64()))
    hist = pa.chunked_array([chunk1, chunk2])
    table = pa.table({"click": pa.array(rng.integers(0, 2, 40), pa.int8()),
                      "conversion": pa.array(np.zeros(40), pa.int8()),
                      "user": pa.array([[i % 9] for i in range(40)], pa.list_(pa.int64())),
                      "hist": hist}).slice(3, 30)  # a slice: offsets do not start at 0
    fields = [FieldConfig("user", "single", 9), FieldConfig("hist", "multi", 50)]
    batch = arrow_to_batch(table, fields)
    want = [((i % 9,), tuple(lists[i] or ())) for i in range(3, 33)]
    assert bag_rows(batch.features) == want
    cols = table_to_columns(table, fields)
    assert bag_rows(cols.slice(4, 9).features) == want[4:9]
    shuffled = cols.take(cols.permutation(seed=1, epoch=0))
    assert sorted(bag_rows(shuffled.slice(0, 30).features)) == sorted(want)


def test_out_of_range_id_is_an_input_error_naming_field_and_row():
    from train.errors import InputError

    table = pa.table({"click": pa.array([0, 1], pa.int8()), "conversion": pa.array([0, 0], pa.int8()),
                      "user": pa.array([[1], [9]], pa.list_(pa.int64()))})
    with pytest.raises(InputError, match=r"'user'.*id 9 at row 1"):
        arrow_to_batch(table, [FieldConfig("user", "single", 9)])


def test_output_bias_starts_at_each_heads_base_rate():
    click = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])
    conv = torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0])
    esmm = build_model("esmm", FIELDS, SMALL)
    pri = esmm.init_output_bias(click, conv)
    assert pri == pytest.approx({"ctr": 3 / 8, "cvr": 2 / 3, "ctcvr": 2 / 8})  # pCVR's prior is conditional on the click
    assert esmm.dense.towers[0].net[-1].bias.item() == pytest.approx(math.log(3 / 5))
    assert esmm.dense.towers[1].net[-1].bias.item() == pytest.approx(math.log(2 / 1))
    base = build_model("base", FIELDS, SMALL)
    view = base.train_view(Batch(make_batch([0] * 8, [0] * 8).features, click, conv))
    assert base.init_output_bias(view.click, view.conversion) == pytest.approx({"conversion": 2 / 3})
    div = build_model("division", FIELDS, SMALL)
    assert set(div.init_output_bias(click, conv)) >= {"ctr", "ctcvr"}
    assert div.dense.towers[1].net[-1].bias.item() == pytest.approx(math.log(2 / 6))
