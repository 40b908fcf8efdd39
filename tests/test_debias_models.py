"""ESCM²-IPS, ESCM²-DR and DCMT: each loss against numbers computed by hand (numpy, from
the same logits), the propensity carrying no gradient, and the models training a step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.dcmt import dcmt_terms
from train.escm2 import escm2_dr_terms, escm2_ips_terms

A = [0.3, -1.0, 2.0, -4.0, 1.5, -6.0]  # CTR logits: pCTR from 0.0025 to 0.88
B = [-0.7, 0.4, 1.1, -2.0, 0.2, 0.9]  # CVR logits
C = [0.5, -0.3, -1.2, 0.8, 0.0, 1.7]  # third tower: imputation (DR) or counterfactual CVR (DCMT)
Y = [1, 1, 0, 1, 0, 0]
Z = [1, 0, 0, 0, 0, 0]


def sig(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def bce(t, p):
    t, p = np.asarray(t, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def t64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def esmm_by_hand():
    y, z = np.array(Y, float), np.array(Z, float)
    return bce(y, sig(A)) + bce(y * z, sig(A) * sig(B))


def test_escm2_ips_loss_by_hand():
    lam, clip = 0.7, 0.05
    got = escm2_ips_terms(t64(A), t64(B), t64(Y), t64(Z), lam, clip)
    p = np.maximum(sig(A), clip)  # rows 3 and 5 have pCTR < 0.05: clipped
    hand = esmm_by_hand() + lam * np.array(Y) * bce(Z, sig(B)) / p
    np.testing.assert_allclose(got.detach().numpy(), hand, rtol=1e-10)
    # row 3: clicked, pCTR = 0.018 -> weight 1/0.05 = 20, not 1/0.018
    assert hand[3] - esmm_by_hand()[3] == pytest.approx(lam * bce(0, sig(B[3])) * 20.0)


def test_escm2_ips_propensity_carries_no_gradient():
    a, b = t64(A, True), t64(B)
    escm2_ips_terms(a, b, t64(Y), t64(Z), 0.7, 0.05).sum().backward()
    a2 = t64(A, True)
    from train.escm2 import esmm_terms

    esmm_terms(a2, b, t64(Y), t64(Z)).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)  # the IPS term adds nothing to dL/dCTR


def test_escm2_dr_loss_by_hand():
    lam, clip = 0.5, 0.05
    got = escm2_dr_terms(t64(A), t64(B), t64(C), t64(Y), t64(Z), lam, clip)
    y = np.array(Y, float)
    p = np.maximum(sig(A), clip)
    e = bce(Z, sig(B))  # the observed error (used on clicked rows only)
    g = sig(C)  # imputed conversion probability
    e_hat = bce(g, sig(B))  # imputed error of every row
    dr = e_hat + y * (e - e_hat) / p
    imp = y * (e - e_hat) ** 2 / p
    hand = esmm_by_hand() + lam * (dr + imp)
    np.testing.assert_allclose(got.detach().numpy(), hand, rtol=1e-10)


def test_escm2_dr_gradients_go_where_the_docstring_says():
    a, b, c = t64(A, True), t64(B, True), t64(C, True)
    escm2_dr_terms(a, b, c, t64(Y), t64(Z), 0.5, 0.05).sum().backward()
    y = np.array(Y, float)
    p = np.maximum(sig(A), 0.05)
    e, g, pb = bce(Z, sig(B)), sig(C), sig(B)
    e_hat = bce(g, pb)
    # imputation tower: only the R_IMP term, d/dc of y (e - BCE(g, pb))^2 / p, with
    # d BCE(g, pb)/dc = g (1 - g) (log(1 - pb) - log pb)
    dbce_dc = g * (1 - g) * (np.log(1 - pb) - np.log(pb))
    np.testing.assert_allclose(c.grad.numpy(), 0.5 * y * 2 * (e - e_hat) * (-dbce_dc) / p, rtol=1e-8)
    # unclicked rows: the CVR tower learns from the imputed error alone, d/db BCE(g, pb) = pb - g
    ctcvr_grad = (sig(A) * pb * (1 - pb) / (1 - sig(A) * pb))  # y*z = 0 rows of ESMM's CTCVR term
    unclicked = y == 0
    np.testing.assert_allclose(b.grad.numpy()[unclicked], (ctcvr_grad + 0.5 * (pb - g))[unclicked], rtol=1e-8)


def test_dcmt_loss_by_hand():
    lam, clip = 0.3, 0.05
    got = dcmt_terms(t64(A), t64(B), t64(C), t64(Y), t64(Z), lam, clip)
    y, z = np.array(Y, float), np.array(Z, float)
    p = np.clip(sig(A), clip, 1 - clip)
    hand = (bce(y, sig(A)) + y * bce(z, sig(B)) / p + (1 - y) * bce(1 - z, sig(C)) / (1 - p)
            + lam * np.abs(1 - sig(B) - sig(C)))
    np.testing.assert_allclose(got.detach().numpy(), hand, rtol=1e-10)
    # row 5 is unclicked with pCTR 0.0025: its counterfactual weight is 1 / (1 - 0.05)
    assert p[5] == 0.05


@pytest.mark.parametrize("name", ["escm2-ips", "escm2-dr", "dcmt"])
def test_model_loss_is_the_weighted_mean_of_its_terms(name):
    from train.baselines import build_model
    from train.embedding import FieldConfig
    from train.jagged import Batch, KeyedJagged
    from train.model import EsmmConfig

    cfg = EsmmConfig(dim=4, hidden=(8,), embedding="plain", lambda_cvr=0.6, dcmt_lambda=0.4, propensity_clip=0.02)
    torch.manual_seed(0)
    m = build_model(name, [FieldConfig("u", "single", 9)], cfg)
    kjt = KeyedJagged(["u"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.arange(7), None, 6)
    batch = Batch(kjt, t64(Y).float(), t64(Z).float(), torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 1.0]))
    out = m(kjt)
    third = out.get("imp", out.get("cvr_cf"))
    if name == "escm2-ips":
        per = escm2_ips_terms(out["ctr"], out["cvr"], batch.click, batch.conversion, 0.6, 0.02)
    elif name == "escm2-dr":
        per = escm2_dr_terms(out["ctr"], out["cvr"], third, batch.click, batch.conversion, 0.6, 0.02)
    else:
        per = dcmt_terms(out["ctr"], out["cvr"], third, batch.click, batch.conversion, 0.4, 0.02)
    torch.testing.assert_close(m.loss(batch), (per * batch.weight).sum() / batch.weight.sum())
    loss = m.loss(batch)
    opts = m.make_optimizers()
    loss.backward()
    for o in opts:
        o.step()
    p = m.predict(kjt)
    assert set(p) == {"p_ctr", "p_cvr", "p_ctcvr"} and torch.equal(p["p_ctcvr"], p["p_ctr"] * p["p_cvr"])
