"""Shared-input towers run as one: ESMM's CTR and CVR towers read the same embedding.

``fuse_shared_towers(model.dense)`` (called once by ``train.device.prepare_towers``) makes
a training-mode forward run both towers' first layers as one matmul, ``[B, in] @ [in,
sum(hidden)]``, and one ``[B, sum(hidden)] @ [sum(hidden), in]`` for the input's gradient
(larger, faster GEMMs than one per tower). Parameters, state-dict keys and eval-mode
forward are the module's own.

When every activation is a ReLU and no autocast is active (fp32 training, the default on
CPUs without bf16 matmuls), forward and backward are one autograd function,
``SharedReluTowers``: its backward is written out layer by layer, so the per-tower
gradients of the fused layer land in one [B, sum(hidden)] buffer (no split-backward
``cat``, no copies), and each ReLU's backward reads the saved activation. The gradients
equal the module path's up to float rounding (tests/test_train_fast_paths.py); the dense
fwd+bwd at batch 2048 went from ~13.1 to ~11 ms here. With the fused CPU kernels
(train/shard/row_kernels.py) each hidden layer's bias and ReLU are one pass over its
matmul's output, and each ReLU's backward gives the bias gradient before it in the same
pass (~0.15 ms a step less here); without them, torch ops. Under bf16 autocast the fused
forward runs through autograd as before.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

ACTS = (nn.ReLU, nn.GELU, nn.SiLU)
_relu_grad = torch.ops.aten.threshold_backward  # grad * (out > 0): ReLU's own backward kernel


def _fusable(towers) -> bool:
    """Towers that are MLPs (Linear, activation, ..., Linear) with the same input size and a
    parameter-free activation after their first layer (no dropout anywhere)."""
    nets = [getattr(t, "net", None) for t in towers]
    if len(nets) < 2 or not all(isinstance(n, nn.Sequential) and len(n) >= 3 for n in nets):
        return False
    first = [n[0] for n in nets]
    return (all(isinstance(f, nn.Linear) and f.bias is not None for f in first)
            and len({f.in_features for f in first}) == 1
            and all(type(n[1]) in ACTS and type(n[1]) is type(nets[0][1]) for n in nets)
            and not any(isinstance(m, nn.Dropout) for n in nets for m in n))


def _relu_mlp_linears(net: nn.Sequential) -> list[nn.Linear] | None:
    """The Linears of ``Linear, ReLU, Linear, ReLU, ..., Linear`` (biases on), else None."""
    mods = list(net)
    if len(mods) % 2 == 0 or not all(type(m) is nn.ReLU for m in mods[1::2]):
        return None
    lins = mods[0::2]
    if not all(isinstance(m, nn.Linear) and m.bias is not None for m in lins):
        return None
    return lins


def _col_sums(g: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """``g.sum(0)`` (a bias gradient) as ``g^T 1``: one BLAS gemv, ~10x faster than the sum
    over dim 0 of a [2048, 400] gradient on CPU here (0.27 -> 0.03 ms); float rounding only."""
    return torch.mv(g.t(), ones)


def _kernels(x: torch.Tensor):
    """The fused CPU kernels (train/shard/row_kernels.py) for ``x``'s device and dtype, or None."""
    from train.shard.row_kernels import for_tensor

    return for_tensor(x)


def _linear_relu(k, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(x w^T + b)``. With the kernels: the matmul, then bias and ReLU in one pass over
    its output (``addmm`` copies the bias into every row first, then the ReLU reads it all
    again); float rounding only."""
    if k is None:
        return torch.addmm(b, x, w.t()).relu_()
    h = torch.mm(x, w.t())
    k.bias_relu_(h, b)
    return h


def _head(k, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A tower's output layer, ``h w^T + b`` ([B, 1] for one output): with the kernels one
    pass over ``h`` (``addmm`` spends more on the call than on the [B, n] x [n, 1] product)."""
    if k is None or w.shape[0] != 1:
        return torch.addmm(b, h, w.t())
    return k.head_forward(h, w.reshape(-1), b)


def _relu_backward(k, g: torch.Tensor, h: torch.Tensor, ones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g * (h > 0), its column sums)``: a ReLU's backward (``h`` its output) and the
    gradient of the bias before it; with the kernels one pass, in place on ``g`` (a fresh
    matmul output)."""
    if k is None:
        g = _relu_grad(g, h, 0)
        return g, _col_sums(g, ones)
    return g, k.relu_grad_colsum_(g, h)


def _onednn(x: torch.Tensor):
    """oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU code
    calls) for the fused first layer, or None: not a CPU float32 input, torch built without
    oneDNN, or ``ESMM_ONEDNN=off``. At [2048, 414] x [414, 400] it runs ~8% faster than
    MKL's sgemm here (3.05 against 3.3 ms forward, bias and ReLU in the same call; the input
    gradient 3.07 against 3.3 with the 16-column alignment below), deterministic, float
    rounding apart from MKL. Its weight must be contiguous: a strided one took seconds."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or os.environ.get("ESMM_ONEDNN") == "off":
        return None
    if "op" not in _ONEDNN:
        try:
            _ONEDNN["op"] = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
        except (AttributeError, RuntimeError):
            _ONEDNN["op"] = None
    return _ONEDNN["op"]


_ONEDNN: dict = {}


def _first_weights(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The towers' first-layer weights stacked, ``[sum(hidden), in]``; on CPU with ``in``
    not a multiple of 16, in a buffer of that many columns rounded up to 16, the extra ones
    0. The input's gradient ``g1 @ w1`` then runs as a matmul of that width and its first
    ``in`` columns are kept: the same bits, ~10% faster in MKL here ([2048, 400] x [400,
    416] against x [400, 414]: 3.37 against 3.8 ms); the forward reads the first ``in``
    columns (a view: as fast as contiguous)."""
    n_in = ws[0].shape[1]
    width = -(-n_in // 16) * 16 if x.device.type == "cpu" else n_in
    if width == n_in:
        return torch.cat(ws)
    w = ws[0].new_empty(sum(w.shape[0] for w in ws), width)
    w[:, n_in:].zero_()
    torch.cat(ws, out=w[:, :n_in])
    return w


def _act(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``module(h)``; a ReLU in place on the fresh matmul output (one [B, hidden] tensor less)."""
    return torch.relu_(h) if type(module) is nn.ReLU else module(h)


def _weights(params, depth: int, which: int) -> list[list[torch.Tensor]]:
    """Tower t's layer l weight (``which`` 0) or bias (1) as ``[t][l]``, from the flat
    ``apply`` order: tower by tower, layer by layer, weight then bias."""
    return [list(params[2 * depth * t + which:2 * depth * (t + 1):2]) for t in range(len(params) // (2 * depth))]


class SharedReluTowers(torch.autograd.Function):
    """T towers of ``depth`` Linears with ReLUs between, on one input; first layers fused.

    ``apply(x, depth, *params)``, params tower by tower, layer by layer, weight then bias.
    Returns one [B, out] tensor per tower (the caller squeezes). Backward, per tower from
    the last layer down: dW = g^T h_in, db = sum(g), g_in = relu'(h_in) * (g W); the
    fused layer's g_in of every tower is written into its columns of one buffer."""

    @staticmethod
    def forward(ctx, x, depth: int, *params):
        T = len(params) // (2 * depth)
        W, b = _weights(params, depth, 0), _weights(params, depth, 1)
        k, dnnl = _kernels(x), _onednn(x)
        b1 = torch.cat([b[t][0] for t in range(T)])
        if dnnl is not None:
            x = x.contiguous()
            w1 = torch.cat([W[t][0] for t in range(T)])  # [sum(hidden), in]
            h1 = dnnl(x, w1, b1, "relu", [], "")
        else:
            w1 = _first_weights([W[t][0] for t in range(T)], x)  # [sum(hidden), in rounded up]
            h1 = _linear_relu(k, x, w1[:, :x.shape[1]], b1)
        cols, o = [], 0
        for t in range(T):
            cols.append((o, o + W[t][0].shape[0]))
            o += W[t][0].shape[0]
        hs, outs = [], []  # hs[t]: tower t's inputs of layers 1..depth-1
        for t in range(T):
            h = h1[:, cols[t][0]:cols[t][1]]
            ins = [h]
            for l in range(1, depth - 1):
                h = _linear_relu(k, h, W[t][l], b[t][l])
                ins.append(h)
            hs.append(ins)
            outs.append(_head(k, h, W[t][-1], b[t][-1]))
        ctx.depth, ctx.T, ctx.cols, ctx.dnnl = depth, T, cols, dnnl
        ctx.save_for_backward(x, w1, h1, *[h for ins in hs for h in ins[1:]], *params)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        depth, T, cols = ctx.depth, ctx.T, ctx.cols
        saved = ctx.saved_tensors
        x, w1, h1 = saved[:3]
        n_mid = T * (depth - 2)
        mids, params = saved[3:3 + n_mid], saved[3 + n_mid:]
        W = _weights(params, depth, 0)
        k = _kernels(x)
        g1 = torch.empty_like(h1)  # every tower's gradient at the fused layer's output
        ones = h1.new_ones(h1.shape[0])
        out: list[torch.Tensor | None] = [None] * len(params)
        for t in range(T):
            ins = [h1[:, cols[t][0]:cols[t][1]], *mids[t * (depth - 2):(t + 1) * (depth - 2)]]
            g = grads[t] if grads[t] is not None else torch.zeros(x.shape[0], W[t][-1].shape[0], dtype=x.dtype,
                                                                  device=x.device)
            top = depth - 1
            if k is not None and depth >= 3 and W[t][-1].shape[0] == 1:  # the output layer and the ReLU below it
                g, dw, db_out, db = k.head_backward(g.reshape(-1).contiguous(), ins[-1], W[t][-1].reshape(-1))
                out[2 * (t * depth + top)], out[2 * (t * depth + top) + 1] = dw.view(1, -1), db_out
                top -= 1
            else:
                db = _col_sums(g, ones)  # the output layer's bias gradient; the others come with their ReLU's backward
            for l in range(top, 0, -1):
                h_in, w = ins[l - 1], W[t][l]
                out[2 * (t * depth + l)] = g.t().mm(h_in)
                out[2 * (t * depth + l) + 1] = db
                if l == 1:  # into this tower's columns of the fused layer's gradient
                    torch.mm(g, w, out=g1[:, cols[t][0]:cols[t][1]])
                else:
                    g, db = _relu_backward(k, g.mm(w), h_in, ones)
        g1, db1 = _relu_backward(k, g1, h1, ones)
        # x^T g1, then transposed: the same sums as g1^T x, ~20% faster in MKL at [2048, 414]
        dw1t = x.t().mm(g1)
        dw1 = dw1t.t().contiguous() if k is None else k.transpose_copy(dw1t)  # the kernel: on every thread
        for t in range(T):
            out[2 * t * depth], out[2 * t * depth + 1] = dw1[cols[t][0]:cols[t][1]], db1[cols[t][0]:cols[t][1]]
        gx = None
        if ctx.needs_input_grad[0] and ctx.dnnl is not None:  # oneDNN: w1^T as a contiguous weight
            gx = ctx.dnnl(g1, torch.cat([W[t][0].t() for t in range(T)], 1), None, "none", [], "")
        elif ctx.needs_input_grad[0]:
            gx = g1.mm(w1)[:, :x.shape[1]]  # w1's zero columns: dropped
        return (gx, None, *out)


def fuse_shared_towers(dense: nn.Module) -> bool:
    """When every tower reads the same input, run the towers as described above. Only in
    training mode and without hooks on the towers; anything else takes the module's own
    forward. Returns whether the towers qualified."""
    towers = getattr(dense, "towers", None)
    if towers is None or not _fusable(list(towers)):
        return False
    inner = dense.forward
    firsts = [t.net[0] for t in towers]
    sizes = [f.out_features for f in firsts]
    linears = [_relu_mlp_linears(t.net) for t in towers]
    if all(linears) and len({len(ls) for ls in linears}) == 1:
        depth = len(linears[0])
        params = [p for ls in linears for lin in ls for p in (lin.weight, lin.bias)]
    else:
        depth, params = 0, []

    mods = list(dense.modules())  # fixed once fused; listed once (not walked each step)

    def hooked() -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in mods)

    @functools.wraps(inner)
    def forward(*xs):
        if not dense.training or len(xs) != len(firsts) or any(x is not xs[0] for x in xs) or hooked():
            return inner(*xs)
        x = xs[0]
        if depth and not torch.is_autocast_enabled(x.device.type):
            return tuple(o.squeeze(-1) for o in SharedReluTowers.apply(x, depth, *params))
        w = torch.cat([f.weight for f in firsts])  # [sum(hidden), in]
        b = torch.cat([f.bias for f in firsts])
        hs = _act(towers[0].net[1], torch.addmm(b, x, w.t())).split(sizes, dim=1)
        outs = []
        for t, h in zip(towers, hs):
            for layer in t.net[2:]:
                h = _act(layer, h) if not isinstance(layer, nn.Linear) else layer(h)
            outs.append(h.squeeze(-1))
        return tuple(outs)

    dense.forward = forward
    return True
