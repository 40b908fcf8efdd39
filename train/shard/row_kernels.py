"""Fused CPU kernels for the embedding rows (sparse optimizer updates, the dedup and gather),
for ESMM's loss, a shuffled batch's gather and the towers' elementwise passes.

The torch-ops update of lazy Adam gathers the touched rows' m and v, their step counts
and their embedding rows, runs ~10 elementwise ops over them and scatters all three back:
on tables far larger than the cache each gather and scatter waits on memory row by row
(~2.1 ms at 15k of 0.68M rows here). ``lazy_adam`` and ``rowwise_adagrad`` read each
touched row once, update m, v, the step count and the row in registers, and prefetch the
rows a dozen indices ahead, so the memory waits overlap (~0.55 ms). Same formulas, same
float32 operations in the same order as ``train.shard.optim``'s torch path, up to the
rounding of ``lerp``. At world size 1 they also sum each row's gradient from the samples'
gradient rows (``GroupedGrads``) in the same pass, the sums an embedding_bag gives, bit
for bit, without writing them out. The row loop is written so that g++ vectorizes it
(``__restrict__`` pointers, ``-fno-math-errno`` so ``sqrt`` needs no errno path): the
same IEEE results, ~1.6x faster on cached rows. ``dedup_gather`` deduplicates an
all-single batch at world size 1 with a marker per row instead of a sort (the same groups
of positions), then copies the rows into sample order, sample by sample. Work is
handed to the threads in small blocks as they get free (``dynamic_for``): rows of a
4M-row table cost several times those of a cached one. ``esmm_loss`` is ESMM's mean loss
and its two logit gradients in one pass (``train.losses``). ``gather_batch`` builds a
shuffled batch (ids field-major and labels, prefetched; ``train.data``); ``bias_relu_`` and
``relu_grad_colsum_`` are the towers' elementwise passes, each one pass where torch takes
two or three; ``head_forward`` and ``head_backward`` a tower's output layer (and the ReLU
below it, backward) in one pass where torch takes four or five small calls;
``transpose_copy`` a transposing copy on every thread (``train.fused_towers``). All are
tested against the torch ops (tests/test_row_kernels.py, tests/test_shard_single.py,
tests/test_model.py, tests/test_train_fast_paths.py, tests/test_loop.py).

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja; ~25 s
once per machine, cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``;
``make venv`` builds it). Where it cannot be built or loaded, or with
``ESMM_ROW_KERNELS=off``, the optimizers use torch ops, and say so once on stderr. CUDA
tensors always take the torch ops.
"""
from __future__ import annotations

import os
import shutil
import sys

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

// rows [N, d] float, idx [n] int64 (unique), grad [n, d] float: all contiguous, on the CPU.
// Touched rows are random lines of tables far larger than the cache: fetch the rows of the
// index AHEAD positions on while this one is updated.
static constexpr int64_t AHEAD = 12;

// fn(lo, hi) over [0, n) in blocks of `block`, each thread taking the next block as it gets
// free (an atomic counter), not one fixed half each: the blocks' costs differ by up to ~10x
// (the rows of a small, cached table against those of a 4M-row one). Any thread count.
template <class Fn>
static void dynamic_for(int64_t n, int64_t block, const Fn& fn) {
  const int64_t nb = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nb, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < nb; k = next.fetch_add(1)) fn(k * block, std::min(n, (k + 1) * block));
  });
}

static void check(const torch::Tensor& rows, const torch::Tensor& idx) {
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == at::kFloat && rows.dim() == 2, "rows: contiguous float [N, d]");
  TORCH_CHECK(idx.is_contiguous() && idx.scalar_type() == at::kLong, "idx: contiguous int64");
}

template <int RW = 1>  // 1: the lines will be written, 0: only read
static inline void fetch(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, RW);
}

static inline void add_row(float* __restrict__ acc, const float* __restrict__ x, int64_t d) {
#pragma GCC ivdep
  for (int64_t j = 0; j < d; ++j) acc[j] += x[j];
}

// The gradient of each touched row: grad[i] ([n, d]), or, when order and starts are given
// (dedup_gather's groups), the sum of its samples' gradient rows at the positions
// order[starts[i]] .. (sample order): summed here in the pass that updates the row, from 0
// in the group's order, the sums embedding_bag(order, grad, starts) gives, without writing
// them. The samples' rows: grad [P, d] contiguous, or [B, F, d] with each sample's F rows
// side by side and samples `sample_stride` floats apart (the towers' input gradient as its
// padded matmul wrote it, train.fused_towers): position p is row p % F of sample p / F.
struct RowGrads {
  const float* G;
  const int64_t* Or = nullptr;
  const int64_t* St = nullptr;
  int64_t n, P, d, nf = 1, sample_stride;
  uint64_t inv_nf = 0;  // 2^64 / nf rounded up: p / nf as one multiply, exact for 32-bit p (Lemire et al. 2019)

  RowGrads(const torch::Tensor& grad, const torch::Tensor& order, const torch::Tensor& starts, int64_t n_rows,
           int64_t dim)
      : G(grad.data_ptr<float>()), n(n_rows), d(dim), sample_stride(dim) {
    TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.size(-1) == d && grad.stride(-1) == 1, "grad: float [.., d]");
    if (grad.dim() == 3) {
      TORCH_CHECK(order.numel() > 0 && grad.stride(1) == d && grad.stride(0) >= grad.size(1) * d
                  && grad.numel() < (int64_t(1) << 32), "grad [B, F, d]: each sample's F rows side by side");
      nf = grad.size(1);
      inv_nf = nf > 1 ? ~uint64_t(0) / uint64_t(nf) + 1 : 0;
      sample_stride = grad.stride(0);
      P = grad.size(0) * nf;
    } else {
      TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "grad: contiguous float [n, d]");
      P = grad.size(0);
    }
    if (order.numel() == 0) {
      TORCH_CHECK(P == n, "grad: one row per touched row");
      return;
    }
    TORCH_CHECK(order.is_contiguous() && order.scalar_type() == at::kLong && order.numel() == P
                && starts.is_contiguous() && starts.scalar_type() == at::kLong && starts.numel() == n,
                "order [P] and starts [n]: int64, the groups of grad's P rows");
    Or = order.data_ptr<int64_t>();
    St = starts.data_ptr<int64_t>();
  }

  inline const float* sample(int64_t p) const {  // position p's gradient row
    if (sample_stride == nf * d) return G + p * d;  // contiguous
    if (nf == 1) return G + p * sample_stride;
    const int64_t b = static_cast<int64_t>((static_cast<unsigned __int128>(inv_nf) * static_cast<uint64_t>(p)) >> 64);
    return G + b * sample_stride + (p - b * nf) * d;
  }

  inline const float* row(int64_t i, float* buf) const {
    if (Or == nullptr) return G + i * d;
    const int64_t end = i + 1 < n ? St[i + 1] : P;
    for (int64_t j = 0; j < d; ++j) buf[j] = 0.0f;
    for (int64_t k = St[i]; k < end; ++k) {
      if (k + 2 * AHEAD < P) fetch(sample(Or[k + 2 * AHEAD]), d * sizeof(float));  // the groups run through order in turn
      add_row(buf, sample(Or[k]), d);
    }
    return buf;
  }
};

// One row's Adam update. The pointers never alias (restrict) and sqrt sets no errno
// (-fno-math-errno), so g++ vectorizes the loop (4 lanes: the build targets generic
// x86-64) where it compiled to scalar sqrt and div before; each lane's float operations
// are the same.
static inline void adam_row(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                            const float* __restrict__ g, int64_t d, float w1, float fb2, float w2, float feps,
                            float s) {
#pragma GCC ivdep
  for (int64_t j = 0; j < d; ++j) {
    const float gj = g[j];
    const float mj = m[j] + w1 * (gj - m[j]);  // lerp(m, g, 1 - b1)
    const float vj = v[j] * fb2 + w2 * gj * gj;  // addcmul: v * b2 + (1 - b2) * g * g
    m[j] = mj;
    v[j] = vj;
    w[j] += (mj / (std::sqrt(vj) + feps)) * s;
  }
}

// Lazy Adam. mv [N, 2, d]: m and v side by side; step [N] int32; scale [S] float:
// -lr * sqrt(1 - b2^k) / (1 - b1^k) for k = 0..S-1 (row bias correction; the last entry
// serves every later k), or one entry (global bias correction).
void lazy_adam(torch::Tensor rows, torch::Tensor mv, torch::Tensor step, torch::Tensor idx, torch::Tensor grad,
               torch::Tensor order, torch::Tensor starts, torch::Tensor scale, double b1, double b2, double eps) {
  check(rows, idx);
  const RowGrads grads(grad, order, starts, idx.numel(), rows.size(1));
  const int64_t n = idx.numel(), d = rows.size(1), ns = scale.numel();
  TORCH_CHECK(mv.is_contiguous() && mv.numel() == 2 * rows.numel() && step.is_contiguous()
              && step.scalar_type() == at::kInt && step.numel() == rows.size(0) && ns > 0, "optimizer state");
  float* R = rows.data_ptr<float>();
  float* MV = mv.data_ptr<float>();
  int32_t* K = step.data_ptr<int32_t>();
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* T = scale.data_ptr<float>();
  // the weights as the torch ops take them: the double 1 - b rounded to float once
  const float w1 = static_cast<float>(1.0 - b1), fb2 = static_cast<float>(b2);
  const float w2 = static_cast<float>(1.0 - b2), feps = static_cast<float>(eps);
  dynamic_for(n, 512, [&](int64_t a, int64_t b) {
    std::vector<float> buf(d);
    for (int64_t i = a; i < b; ++i) {
      if (i + AHEAD < b) {
        const int64_t q = I[i + AHEAD];
        fetch(MV + q * 2 * d, 2 * d * sizeof(float));
        fetch(R + q * d, d * sizeof(float));
        __builtin_prefetch(K + q, 1);
      }
      const int64_t r = I[i];
      float* m = MV + r * 2 * d;
      float* v = m + d;
      float* w = R + r * d;
      const float* g = grads.row(i, buf.data());
      const int32_t k = ++K[r];
      const float s = ns == 1 ? T[0] : T[k < ns ? k : ns - 1];
      adam_row(w, m, v, g, d, w1, fb2, w2, feps, s);
    }
  });
}

// Deduplication of an all-single batch at world size 1, without a sort, and the gather of
// its rows. values [F, B] int64 (field-major, as the batch holds them), offset [F] int64
// (each field's first global id; field f's table is rows offset[f] .. offset[f+1] - 1, the
// last one's ends at N), marker [N] int32 all -1 (kept by the caller between calls; left all
// -1 again), rows [N, d] float. Returns (out, uniq, order, starts): out [B*F, d] the rows in
// sample order (row b*F + f is field f's row of sample b: index_select(rows, gids)); uniq
// [U] the distinct global ids, field by field in the order they first occur; order [B*F]
// the sample-order positions of every value grouped by its unique id, ascending within a
// group (what a stable sort by id gives, groups in another order); starts [U] where each
// group begins. Each field's values, groups and positions have a range of their own (its
// B values fill order[f*B .. (f+1)*B)), so the fields run on all threads (largest table
// first, each thread taking the next field) with nothing shared but the row counts of the
// fields before them, and each field's markers (a range of their own) stay in cache. The
// rows are gathered after the marking, sample by sample on all threads: each output row is
// written whole and in order (gathered field by field, each sample's 72 bytes of a field
// landed in lines that other fields' passes wrote too: ~0.15 ms more at Ali-CCP's sizes).
// An id outside its own field's rows is refused, naming the field and the batch row.
std::vector<torch::Tensor> dedup_gather(torch::Tensor values, torch::Tensor offset, torch::Tensor marker,
                                        torch::Tensor rows) {
  TORCH_CHECK(values.is_contiguous() && values.scalar_type() == at::kLong && values.dim() == 2, "values: int64 [F, B]");
  TORCH_CHECK(offset.is_contiguous() && offset.scalar_type() == at::kLong && offset.numel() == values.size(0), "offset: int64 [F]");
  TORCH_CHECK(marker.is_contiguous() && marker.scalar_type() == at::kInt, "marker: int32 [N]");
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == at::kFloat && rows.dim() == 2
              && rows.size(0) == marker.numel(), "rows: contiguous float [N, d]");
  const int64_t F = values.size(0), B = values.size(1), n = F * B, N = marker.numel(), d = rows.size(1);
  TORCH_CHECK(N <= INT32_MAX && B <= INT32_MAX, "marker: more rows than int32 counts");
  const int64_t* V = values.data_ptr<int64_t>();
  const int64_t* O = offset.data_ptr<int64_t>();
  int32_t* M = marker.data_ptr<int32_t>();
  const float* R = rows.data_ptr<float>();
  auto out = torch::empty({n, d}, rows.options());
  auto order = torch::empty({n}, values.options());
  auto inv = torch::empty({n}, marker.options());  // field-major: value (f, b)'s group within field f
  auto fuq = torch::empty({n}, values.options());  // field f's distinct ids at f*B .., then its counts' places
  auto cnt = torch::empty({n}, values.options());  // per field-local group: its count, then its next free place
  std::vector<int64_t> nu(F, 0), bad(F, -1);
  float* Out = out.data_ptr<float>();
  int64_t* Or = order.data_ptr<int64_t>();
  int32_t* Iv = inv.data_ptr<int32_t>();
  int64_t* Fu = fuq.data_ptr<int64_t>();
  int64_t* Ct = cnt.data_ptr<int64_t>();
  std::vector<int64_t> by_size(F);  // the fields, largest table first: threads take them in turn
  for (int64_t f = 0; f < F; ++f) by_size[f] = f;
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t x, int64_t y) {
    return (x + 1 < F ? O[x + 1] : N) - O[x] > (y + 1 < F ? O[y + 1] : N) - O[y];
  });
  dynamic_for(F, 1, [&](int64_t fa, int64_t fb) {
    for (int64_t k = fa; k < fb; ++k) {
      const int64_t f = by_size[k];
      const int64_t* v = V + f * B;
      const int64_t lo = O[f], size = (f + 1 < F ? O[f + 1] : N) - lo;
      bool ok = true;
      for (int64_t b = 0; b < B; ++b) ok &= (v[b] >= 0) & (v[b] < size);
      if (!ok) {  // marked nothing: the batch row is named after every field is back to -1
        for (int64_t b = 0; b < B; ++b)
          if (v[b] < 0 || v[b] >= size) { bad[f] = b; break; }
        continue;
      }
      int64_t* fu = Fu + f * B;
      int64_t* ct = Ct + f * B;
      int32_t* iv = Iv + f * B;
      int32_t U = 0;
      for (int64_t b = 0; b < B; ++b) {
        if (b + 2 * AHEAD < B) __builtin_prefetch(M + lo + v[b + 2 * AHEAD], 1);
        const int64_t g = lo + v[b];
        int32_t u = M[g];
        if (u < 0) {
          u = U++;
          M[g] = u;
          fu[u] = g;
          ct[u] = 0;
        }
        iv[b] = u;
        ++ct[u];
      }
      nu[f] = U;
    }
  });
  // the gather, sample by sample: each output row written whole and in order, the table
  // rows prefetched a few samples ahead (every field's id of a sample is known by now)
  const bool any_bad = std::any_of(bad.begin(), bad.end(), [](int64_t x) { return x >= 0; });
  if (!any_bad) at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b + 2 < b1)
        for (int64_t f = 0; f < F; ++f) fetch<0>(R + (O[f] + V[f * B + b + 2]) * d, d * sizeof(float));
      float* o = Out + b * F * d;
      for (int64_t f = 0; f < F; ++f) std::memcpy(o + f * d, R + (O[f] + V[f * B + b]) * d, d * sizeof(float));
    }
  });
  std::vector<int64_t> base(F + 1, 0);  // field f's groups are uniq[base[f] .. base[f+1])
  for (int64_t f = 0; f < F; ++f) base[f + 1] = base[f] + nu[f];
  auto uniq = torch::empty({base[F]}, values.options());
  auto starts = torch::empty({base[F]}, values.options());
  int64_t* Uq = uniq.data_ptr<int64_t>();
  int64_t* St = starts.data_ptr<int64_t>();
  dynamic_for(F, 1, [&](int64_t fa, int64_t fb) {
    for (int64_t k = fa; k < fb; ++k) {
      const int64_t f = by_size[k];
      const int64_t* fu = Fu + f * B;
      int64_t* ct = Ct + f * B;
      int64_t at = f * B;
      for (int64_t u = 0; u < nu[f]; ++u) {
        M[fu[u]] = -1;  // the marker is all -1 again
        Uq[base[f] + u] = fu[u];
        St[base[f] + u] = at;
        const int64_t c = ct[u];
        ct[u] = at;
        at += c;
      }
      if (bad[f] >= 0) continue;
      const int32_t* iv = Iv + f * B;
      for (int64_t b = 0; b < B; ++b) Or[ct[iv[b]]++] = b * F + f;  // ascending positions within a group
    }
  });
  for (int64_t f = 0; f < F; ++f)
    TORCH_CHECK(bad[f] < 0, "embedding id ", V[f * B + bad[f]], " of field ", f, " outside its table's ",
                (f + 1 < F ? O[f + 1] : N) - O[f], " rows (batch row ", bad[f], ")");
  return {out, uniq, order, starts};
}

// ESMM's mean loss over a batch and its gradient, in one pass: per sample
// BCE(y, sigmoid(a)) + BCE(y*z, exp(lp)), lp = log sigmoid(a) + log sigmoid(b), as
// train.losses computes it (log(1 - exp(lp)) by log1mexp, lp clamped below -FLT_MIN there).
// a, b, y, z: contiguous float [B]. Returns (mean loss [], d mean / da [B], d mean / db [B]):
// the gradients autograd gives through those ops, up to float rounding.
struct LogSigmoid {  // log sigmoid(x) and sigmoid(+-x) from one exp: e = exp(-|x|)
  float log_s, s, s_neg;
  explicit LogSigmoid(float x) {
    const float e = std::exp(-std::fabs(x)), inv = 1.0f / (1.0f + e);
    log_s = std::min(x, 0.0f) - std::log1p(e);  // -softplus(-x), no overflow
    s = x >= 0.0f ? inv : e * inv;
    s_neg = x >= 0.0f ? e * inv : inv;
  }
};

std::vector<torch::Tensor> esmm_loss(torch::Tensor a, torch::Tensor b, torch::Tensor y, torch::Tensor z) {
  for (const auto* t : {&a, &b, &y, &z})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->numel() == a.numel(),
                "esmm_loss: contiguous float [B] tensors");
  const int64_t n = a.numel();
  auto da = torch::empty_like(a), db = torch::empty_like(b);
  const float *A = a.data_ptr<float>(), *Bp = b.data_ptr<float>(), *Y = y.data_ptr<float>(), *Z = z.data_ptr<float>();
  float *DA = da.data_ptr<float>(), *DB = db.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(n), tiny = std::numeric_limits<float>::min();
  const float ln2 = static_cast<float>(std::log(2.0));
  const int64_t grain = 512;
  std::vector<double> part((n + grain - 1) / grain, 0.0);  // per block of grain samples: the same sums on any threads
  at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double total = 0.0;
      for (int64_t i = k * grain; i < std::min(n, (k + 1) * grain); ++i) {
        const float ai = A[i], yi = Y[i], t = yi * Z[i];
        const LogSigmoid la(ai), lb(Bp[i]);
        const float lp = la.log_s + lb.log_s;
        const float x = std::min(lp, -tiny);
        const float ex = std::exp(x);
        const float em = x > -ln2 ? std::expm1(x) : ex - 1.0f;  // exp(x) - 1 < 0
        const float l1mx = x > -ln2 ? std::log(-em) : std::log1p(-ex);  // log(1 - exp(x))
        total += static_cast<double>((1.0f - yi) * ai - la.log_s) + static_cast<double>(-(t * lp + (1.0f - t) * l1mx));
        // d/dlp of the CTCVR term: -t - (1 - t) * d log(1 - e^x)/dx, 0 where the clamp bites
        const float dlp = -t - (1.0f - t) * (lp <= -tiny ? ex / em : 0.0f);
        DA[i] = (la.s - yi + dlp * la.s_neg) * inv_n;
        DB[i] = dlp * lb.s_neg * inv_n;
      }
      part[k] = total;
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return {torch::tensor(static_cast<float>(total / static_cast<double>(n))), da, db};
}

// A shuffled batch: its ids field-major, out [F, B] = grid[rows].t() (grid [n, F] int64
// contiguous, rows [B] int64), and each of `cols` (float [n], the labels) at rows, in one
// pass; the grid rows (3-4 cache lines each, anywhere in a split far larger than the
// cache) and the labels prefetched AHEAD rows on. Returns [out, cols[0][rows], ...].
std::vector<torch::Tensor> gather_batch(torch::Tensor grid, torch::Tensor rows, std::vector<torch::Tensor> cols) {
  TORCH_CHECK(grid.is_contiguous() && grid.scalar_type() == at::kLong && grid.dim() == 2, "grid: contiguous int64 [n, F]");
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == at::kLong && rows.dim() == 1, "rows: contiguous int64 [B]");
  const int64_t n = grid.size(0), F = grid.size(1), B = rows.numel(), C = cols.size();
  for (const auto& c : cols)
    TORCH_CHECK(c.is_contiguous() && c.scalar_type() == at::kFloat && c.dim() == 1 && c.numel() == n, "cols: contiguous float [n]");
  const int64_t* G = grid.data_ptr<int64_t>();
  const int64_t* R = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) TORCH_CHECK(R[i] >= 0 && R[i] < n, "row ", R[i], " outside the grid's ", n, " rows");
  std::vector<torch::Tensor> out{torch::empty({F, B}, grid.options())};
  std::vector<const float*> src;
  std::vector<float*> dst;
  for (const auto& c : cols) {
    out.push_back(torch::empty({B}, c.options()));
    src.push_back(c.data_ptr<float>());
    dst.push_back(out.back().data_ptr<float>());
  }
  int64_t* O = out[0].data_ptr<int64_t>();
  at::parallel_for(0, B, 256, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      if (i + AHEAD < b) {
        const int64_t q = R[i + AHEAD];
        fetch<0>(G + q * F, F * sizeof(int64_t));
        for (int64_t c = 0; c < C; ++c) __builtin_prefetch(src[c] + q, 0);
      }
      const int64_t r = R[i];
      const int64_t* g = G + r * F;
      for (int64_t f = 0; f < F; ++f) O[f * B + i] = g[f];
      for (int64_t c = 0; c < C; ++c) dst[c][i] = src[c][r];
    }
  });
  return out;
}

// The towers' elementwise passes, fused (train.fused_towers). h [B, n] float, rows at any
// stride (a column block of a wider matrix), columns contiguous; b [n].
static void check_rows(const torch::Tensor& h, const char* what) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.stride(1) == 1 && h.stride(0) >= h.size(1),
              what, ": float [B, n], contiguous columns");
}

// h = relu(h + b) in place: the bias and the activation in one pass over a matmul's output
// (addmm would first copy the bias into every row, then the ReLU reads it all again).
void bias_relu_(torch::Tensor h, torch::Tensor b) {
  check_rows(h, "h");
  TORCH_CHECK(b.is_contiguous() && b.scalar_type() == at::kFloat && b.numel() == h.size(1), "b: float [n]");
  const int64_t B = h.size(0), n = h.size(1), ld = h.stride(0);
  float* H = h.data_ptr<float>();
  const float* __restrict__ bias = b.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* __restrict__ row = H + r * ld;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) row[j] = std::max(row[j] + bias[j], 0.0f);
    }
  });
}

// out[j] = sum over the nb blocks k of part[k * stride + j], j < count: per-block float sums
// added in block order in double, so the result does not depend on the thread count.
static void sum_blocks(const float* part, int64_t nb, int64_t stride, int64_t count, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    double s = 0.0;
    for (int64_t k = 0; k < nb; ++k) s += part[k * stride + j];
    out[j] = static_cast<float>(s);
  }
}

// ReLU's backward and the bias gradient in one pass: g = g * (h > 0) in place (g [B, n]
// contiguous, h the ReLU's output), returns the column sums of the new g ([n]). Rows are
// summed in blocks of 128 (float), the blocks' sums in order (double): the same result on
// any number of threads.
torch::Tensor relu_grad_colsum_(torch::Tensor g, torch::Tensor h) {
  check_rows(h, "h");
  TORCH_CHECK(g.is_contiguous() && g.scalar_type() == at::kFloat && g.sizes() == h.sizes(), "g: contiguous float, h's shape");
  const int64_t B = g.size(0), n = g.size(1), ld = h.stride(0), blk = 128, nb = (B + blk - 1) / blk;
  float* G = g.data_ptr<float>();
  const float* Hp = h.data_ptr<float>();
  std::vector<float> part(nb * n, 0.0f);
  at::parallel_for(0, nb, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* __restrict__ acc = part.data() + k * n;
      for (int64_t r = k * blk; r < std::min(B, (k + 1) * blk); ++r) {
        float* __restrict__ gr = G + r * n;
        const float* __restrict__ hr = Hp + r * ld;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const float x = hr[j] > 0.0f ? gr[j] : 0.0f;
          gr[j] = x;
          acc[j] += x;
        }
      }
    }
  });
  auto out = torch::empty({n}, g.options());
  sum_blocks(part.data(), nb, n, n, out.data_ptr<float>());
  return out;
}

// c ? p : +0.0f as a bit mask: g++ does not vectorize a select around a multiply
// (-ftrapping-math keeps the multiply conditional); the mask gives the same bits.
static inline float keep_if(bool c, float p) {
  uint32_t u;
  std::memcpy(&u, &p, sizeof u);
  u &= -static_cast<uint32_t>(c);
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// A tower's output layer (hidden size n -> 1), forward: out[b] = h[b] . w + bias (h [B, n]
// with contiguous columns, w [n], bias [1]; out [B, 1]). One pass over h where addmm, with
// a [B, n] x [n, 1] matmul, costs more in its call than in its arithmetic.
torch::Tensor head_forward(torch::Tensor h, torch::Tensor w, torch::Tensor bias) {
  check_rows(h, "h");
  const int64_t B = h.size(0), n = h.size(1), ld = h.stride(0);
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.numel() == n, "w: float [n]");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == 1, "bias: float [1]");
  auto out = torch::empty({B, 1}, h.options());
  const float* Hp = h.data_ptr<float>();
  const float* __restrict__ W = w.data_ptr<float>();
  const float b0 = bias.item<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict__ hr = Hp + r * ld;
      float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // 8 running sums: vectorized
      int64_t j = 0;
      for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; ++l) acc[l] += hr[j + l] * W[j + l];
      for (; j < n; ++j) acc[j % 8] += hr[j] * W[j];
      O[r] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + b0;
    }
  });
  return out;
}

// The same layer's backward and the ReLU's before it, in one pass over h (that ReLU's
// output): g [B] the output's gradient, w [n]. Returns (gin [B, n] = g[b] * w[j] * (h > 0),
// the gradient below; dw [n] = sum_b g[b] h[b]; db [1] = sum_b g[b]; db_in [n] = the column
// sums of gin, the bias gradient of the layer below). Sums in blocks of 128 rows (float),
// the blocks in order (double), as relu_grad_colsum_: the same result on any thread count.
std::vector<torch::Tensor> head_backward(torch::Tensor g, torch::Tensor h, torch::Tensor w) {
  check_rows(h, "h");
  const int64_t B = h.size(0), n = h.size(1), ld = h.stride(0), blk = 128, nb = (B + blk - 1) / blk;
  TORCH_CHECK(g.is_contiguous() && g.scalar_type() == at::kFloat && g.numel() == B, "g: contiguous float [B]");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.numel() == n, "w: float [n]");
  auto gin = torch::empty({B, n}, h.options());
  const float* Gp = g.data_ptr<float>();
  const float* Hp = h.data_ptr<float>();
  const float* __restrict__ W = w.data_ptr<float>();
  float* Gi = gin.data_ptr<float>();
  std::vector<float> part(nb * (2 * n + 1), 0.0f);  // per block: dw, db_in, db
  at::parallel_for(0, nb, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* __restrict__ dw = part.data() + k * (2 * n + 1);
      float* __restrict__ dbi = dw + n;
      float db = 0.0f;
      for (int64_t r = k * blk; r < std::min(B, (k + 1) * blk); ++r) {
        const float gr = Gp[r];
        const float* __restrict__ hr = Hp + r * ld;
        float* __restrict__ out = Gi + r * n;
        db += gr;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const float x = keep_if(hr[j] > 0.0f, gr * W[j]);
          out[j] = x;
          dbi[j] += x;
          dw[j] += gr * hr[j];
        }
      }
      dw[2 * n] = db;
    }
  });
  auto dw = torch::empty({n}, h.options()), dbi = torch::empty({n}, h.options()), db = torch::empty({1}, h.options());
  sum_blocks(part.data(), nb, 2 * n + 1, n, dw.data_ptr<float>());
  sum_blocks(part.data() + n, nb, 2 * n + 1, n, dbi.data_ptr<float>());
  sum_blocks(part.data() + 2 * n, nb, 2 * n + 1, 1, db.data_ptr<float>());
  return {gin, dw, db, dbi};
}

// out = src^T for a contiguous float [m, n] src: 32x32 tiles over the threads. torch's
// transposing copy runs on one thread (~0.13 ms of a step for the fused first layer's
// [414, 400] weight gradient, the other thread idle meanwhile).
torch::Tensor transpose_copy(torch::Tensor src) {
  TORCH_CHECK(src.is_contiguous() && src.scalar_type() == at::kFloat && src.dim() == 2, "src: contiguous float [m, n]");
  const int64_t m = src.size(0), n = src.size(1), T = 32, tm = (m + T - 1) / T, tn = (n + T - 1) / T;
  auto out = torch::empty({n, m}, src.options());
  const float* S = src.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, tm * tn, 8, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t i0 = (t / tn) * T, j0 = (t % tn) * T, i1 = std::min(m, i0 + T), j1 = std::min(n, j0 + T);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) O[j * m + i] = S[i * n + j];
    }
  });
  return out;
}

// Row-wise Adagrad. sum [N] float: s += mean(g^2); row -= lr * g / (sqrt(s) + eps).
void rowwise_adagrad(torch::Tensor rows, torch::Tensor sum, torch::Tensor idx, torch::Tensor grad,
                     torch::Tensor order, torch::Tensor starts, double lr, double eps) {
  check(rows, idx);
  const RowGrads grads(grad, order, starts, idx.numel(), rows.size(1));
  TORCH_CHECK(sum.is_contiguous() && sum.scalar_type() == at::kFloat && sum.numel() == rows.size(0), "optimizer state");
  const int64_t n = idx.numel(), d = rows.size(1);
  float* R = rows.data_ptr<float>();
  float* S = sum.data_ptr<float>();
  const int64_t* I = idx.data_ptr<int64_t>();
  const float neg_inv_lr = static_cast<float>(-1.0 / lr), feps = static_cast<float>(eps);
  dynamic_for(n, 512, [&](int64_t a, int64_t b) {
    std::vector<float> buf(d);
    for (int64_t i = a; i < b; ++i) {
      if (i + AHEAD < b) {
        const int64_t q = I[i + AHEAD];
        fetch(R + q * d, d * sizeof(float));
        __builtin_prefetch(S + q, 1);
      }
      const int64_t r = I[i];
      const float* g = grads.row(i, buf.data());
      float sq = 0.0f;
      for (int64_t j = 0; j < d; ++j) sq += g[j] * g[j];
      const float s = S[r] + sq / static_cast<float>(d);
      S[r] = s;
      const float denom = (std::sqrt(s) + feps) * neg_inv_lr;
      float* w = R + r * d;
      for (int64_t j = 0; j < d; ++j) w[j] += g[j] / denom;
    }
  });
}
"""

_NAME = "esmm_row_kernels"
_profiling = torch._C._autograd._profiler_enabled  # True under torch.profiler
_state: dict = {}


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the one pip installed beside this interpreter counts
    too (a venv's python runs without its bin/ on PATH)."""
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def switched_off() -> bool:
    """``ESMM_ROW_KERNELS`` is off (0, off, false, no): torch ops on purpose."""
    return os.environ.get("ESMM_ROW_KERNELS", "auto").lower() in ("0", "off", "false", "no")


def kernels():
    """The built extension (``lazy_adam``, ``rowwise_adagrad``, ``dedup_gather``, ``esmm_loss``,
    ``gather_batch``, ``bias_relu_``, ``relu_grad_colsum_``), or None:
    switched off, or not buildable here (said once on stderr)."""
    if "mod" in _state:
        return _state["mod"]
    mod, why = None, None
    if switched_off():
        why = "ESMM_ROW_KERNELS=off"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            _ninja_on_path()
            mod = load_inline(_NAME, cpp_sources=_SOURCE, functions=["lazy_adam", "rowwise_adagrad", "dedup_gather", "esmm_loss",
                                                             "bias_relu_", "relu_grad_colsum_", "gather_batch",
                                                             "head_forward", "head_backward", "transpose_copy"],
                              extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"], verbose=False)
        except Exception as e:  # noqa: BLE001  (no compiler, no ninja, read-only cache: torch ops instead)
            why = f"not built: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
    if mod is None and why != "ESMM_ROW_KERNELS=off":
        print(f"esmm: fused row kernels off ({why}); the embedding's dedup and sparse optimizers use torch ops",
              file=sys.stderr, flush=True)
    _state["mod"] = mod
    return mod


class _Named:
    """The extension's functions, each under a profiler label (``esmm_row_kernels::NAME``):
    pybind calls are not dispatcher ops, so torch.profiler would not see them otherwise."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):  # first use of a name only: the wrapper is kept as an attribute
        fn = getattr(self._mod, name)

        def call(*args):
            if not _profiling():  # the label costs ~5 us a call
                return fn(*args)
            with torch.profiler.record_function(f"{_NAME}::{name}"):
                return fn(*args)
        setattr(self, name, call)
        return call


def for_tensor(t: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The kernels when ``t`` (a table of rows) can use them: CPU, ``dtype``; else None."""
    if t.device.type != "cpu" or t.dtype != dtype:
        return None
    mod = kernels()
    if mod is None:
        return None
    if "named" not in _state:
        _state["named"] = _Named(mod)
    return _state["named"]


def build() -> None:
    """Build (or load) the kernels now and say which (``make venv``, the Ray image)."""
    print("esmm row kernels:", "built" if kernels() is not None else "not built")

