"""Embedding forward+backward+update time per step: our row-wise shard vs the alternatives.

Same global batches (23 Ali-CCP-shaped fields, bench/shard_data.py) for every variant:

- ``unsharded``: one ``nn.EmbeddingBag`` (sparse gradients) + ``torch.optim.SparseAdam``
  in one process with ``--threads`` threads: what a plain PyTorch model does;
- ``ours, world 1``: ``ShardedEmbeddingCollection`` with no process group (the
  production single-process path: fused lazy Adam on the unique rows);
- ``ours, W workers``: W gloo processes (``--threads / W`` threads each), each taking
  1/W of every global batch; ids travel to their owners and rows back by all-to-all;
- ``torchrec``: TorchRec's EmbeddingBagCollection under DistributedModelParallel,
  table-wise on gloo (TorchRec has no row-wise sharding on CPU), run by
  ``bench/shard_torchrec.py`` in its own venv (``bench/.venv-peers``) on the same
  batches; its fused CPU kernel needs dim % 4 == 0, hence ``--dim 20`` for that row.
  Skipped, with a note, when that venv or script is absent.

Memory: each worker's embedding bytes (rows + optimizer state living with them) against
the whole table's, and the workers' resident-memory growth when their shard was built.

    .venv/bin/python bench/shard.py                       # 2 workers, default shape
    .venv/bin/python bench/shard.py --dim 20               # + TorchRec (after bash bench/setup_peers.sh)
    .venv/bin/python bench/shard.py --scale 4 --steps 20  # a 4x larger table for the memory figures
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Spinning OpenMP threads collapse (5-50x slower) when other processes share the cores;
# passive waiting keeps the side-by-side ratios meaningful on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from bench.shard_data import bench_batch, bench_fields  # noqa: E402
from train.jagged import take_rows  # noqa: E402
from train.shard import ShardedEmbeddingCollection, shard_group  # noqa: E402

TORCHREC_PY = REPO / "bench" / ".venv-peers" / "bin" / "python"
TORCHREC_SCRIPT = REPO / "bench" / "shard_torchrec.py"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_batches(args) -> list:
    fields = bench_fields(args.scale)
    n = args.warmup + args.steps
    kjts = [bench_batch(fields, args.batch_size, s, seed=args.seed, multi_len=args.multi_len) for s in range(n)]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(args.batch_size, len(fields), args.dim, generator=g) for _ in range(n)]
    return fields, kjts, grads


def timed(step, n_warm: int, n: int, barrier=None) -> float:
    """Median seconds per call of step(i) over calls n_warm..n_warm+n-1."""
    for i in range(n_warm):
        step(i)
    times = []
    for i in range(n_warm, n_warm + n):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_unsharded(args, fields, kjts, grads) -> dict:
    """One nn.EmbeddingBag over the global id space + SparseAdam / sparse Adagrad (plain PyTorch)."""
    torch.set_num_threads(args.threads)
    rss0 = rss_bytes()
    ref = ShardedEmbeddingCollection(fields, args.dim)  # only for its field offsets / init
    bag = nn.EmbeddingBag(ref.num_rows, args.dim, mode="sum", sparse=True, include_last_offset=True)
    with torch.no_grad():
        bag.weight.copy_(ref.rows)
    del ref
    if args.optimizer == "adam":
        opt = torch.optim.SparseAdam(bag.parameters(), lr=1e-3)
    else:  # element-wise Adagrad on sparse gradients (torch has no row-wise one)
        opt = torch.optim.Adagrad(bag.parameters(), lr=1e-3)
    offs = torch.tensor([0] + [f.vocab_size for f in fields]).cumsum(0)[:-1]
    nF = len(fields)

    def step(i):
        kjt = kjts[i]
        fov = torch.repeat_interleave(torch.arange(nF).repeat_interleave(kjt.batch_size), kjt.lengths(),
                                      output_size=kjt.values.numel())
        pooled = bag(kjt.values + offs[fov], kjt.offsets, per_sample_weights=kjt.weights)
        opt.zero_grad()
        pooled.view(nF, kjt.batch_size, -1).transpose(0, 1).mul(grads[i]).sum().backward()
        opt.step()

    sec = timed(step, args.warmup, args.steps)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"ms_per_step": sec * 1e3, "emb_bytes": bag.weight.numel() * 4 + state, "rss_growth": rss_bytes() - rss0}


def run_ours_world1(args, fields, kjts, grads) -> dict:
    torch.set_num_threads(args.threads)
    rss0 = rss_bytes()
    emb = ShardedEmbeddingCollection(fields, args.dim)
    opt = emb.make_optimizer({"sparse_optimizer": args.optimizer, "sparse_lr": 1e-3})

    def step(i):
        opt.zero_grad()
        emb(kjts[i]).mul(grads[i]).sum().backward()
        opt.step()

    sec = timed(step, args.warmup, args.steps)
    return {"ms_per_step": sec * 1e3, "emb_bytes": emb.memory_bytes() + opt.memory_bytes(),
            "rss_growth": rss_bytes() - rss0}


def _worker(rank: int, world: int, port: int, args, out: str):
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fields, kjts, grads = make_batches(args)
    mine = torch.arange(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    parts = [take_rows(k, mine) for k in kjts]
    gparts = [g[mine] for g in grads]
    del kjts, grads
    rss0 = rss_bytes()
    emb = ShardedEmbeddingCollection(fields, args.dim, group=shard_group())
    opt = emb.make_optimizer({"sparse_optimizer": args.optimizer, "sparse_lr": 1e-3})
    rss1 = rss_bytes()

    def step(i):
        opt.zero_grad()
        emb(parts[i]).mul(gparts[i]).sum().backward()
        opt.step()

    sec = timed(step, args.warmup, args.steps, barrier=dist.barrier)
    t = torch.tensor([sec])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank's does
    res = {"rank": rank, "ms_per_step": float(t) * 1e3, "emb_bytes": emb.memory_bytes() + opt.memory_bytes(),
           "rss_growth": rss1 - rss0, "rows": emb.rows.shape[0]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def run_ours_sharded(args) -> dict:
    out = REPO / "bench" / "out" / "shard-workers"
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args.workers, port, args, str(out)), nprocs=args.workers, join=True,
                       start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.workers)]
    return {"ms_per_step": ranks[0]["ms_per_step"], "per_worker": ranks}


def run_torchrec(args) -> dict | None:
    """Hook: TorchRec's EmbeddingBagCollection under DistributedModelParallel (table-wise, gloo).

    bench/shard_torchrec.py (helper "bench") runs in bench/.venv-peers
    (``bash bench/setup_peers.sh``) on the same batches (``bench_batch(fields, B, step,
    seed)``, rank r taking rows [r*B/W, (r+1)*B/W)) and writes a JSON with
    ``ms_per_step_median`` and ``bytes_per_rank``. Its fused FBGEMM kernel needs
    dim % 4 == 0, so compare at ``--dim 20``.
    """
    if not (TORCHREC_PY.exists() and TORCHREC_SCRIPT.exists()):
        print(f"torchrec: skipped ({TORCHREC_PY.relative_to(REPO)} or {TORCHREC_SCRIPT.relative_to(REPO)} absent; "
              "bash bench/setup_peers.sh)")
        return None
    if args.dim % 4:
        print(f"torchrec: skipped (its CPU table-wise kernel needs dim % 4 == 0; run with --dim 20)")
        return None
    out = REPO / "bench" / "out" / "shard-torchrec.json"
    cmd = [str(TORCHREC_PY), str(TORCHREC_SCRIPT), "--world", str(args.workers), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch_size), "--seed", str(args.seed), "--json", str(out),
           "--optimizer", args.optimizer, "--scale", str(args.scale), "--dim", str(args.dim),
           "--threads", str(max(1, args.threads // args.workers))]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        print(f"torchrec: failed (rc {p.returncode}): {p.stderr.strip()[-800:]}")
        return None
    r = json.loads(out.read_text())
    return {"ms_per_step": r["ms_per_step_median"], "per_worker_bytes": r.get("bytes_per_rank"), "raw": r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=18)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="cores in all: one process gets all, W workers share them")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every vocabulary")
    ap.add_argument("--multi-len", type=int, default=3)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adagrad"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(REPO / "bench" / "out" / "shard.json"))
    args = ap.parse_args(argv)

    fields, kjts, grads = make_batches(args)
    nrows = sum(f.vocab_size for f in fields)
    print(f"shape: {len(fields)} fields, {nrows:,} rows x dim {args.dim}, batch {args.batch_size}, "
          f"{kjts[0].values.numel():,} ids/batch ({int(torch.unique(kjts[0].values).numel()):,} distinct local ids), "
          f"{args.threads} threads, optimizer {args.optimizer}")
    unsharded = f"unsharded nn.EmbeddingBag + {'SparseAdam' if args.optimizer == 'adam' else 'Adagrad'}"
    res = {unsharded: run_unsharded(args, fields, kjts, grads),
           "ours, world 1": run_ours_world1(args, fields, kjts, grads)}
    res[f"ours, {args.workers} workers (gloo)"] = run_ours_sharded(args)
    tr = run_torchrec(args)
    if tr is not None:
        res[f"torchrec DMP table-wise, {args.workers} workers (gloo)"] = tr
    base = res[unsharded]["ms_per_step"]
    print(f"\n{'variant':<48} {'ms/step':>9} {'vs unsharded':>13}")
    for name, r in res.items():
        print(f"{name:<48} {r['ms_per_step']:9.1f} {base / r['ms_per_step']:12.2f}x")
    total = res["ours, world 1"]["emb_bytes"]
    print(f"\nembedding memory (rows + optimizer state), whole table: {total / 2**20:.1f} MiB")
    for w in res[f"ours, {args.workers} workers (gloo)"]["per_worker"]:
        print(f"  worker {w['rank']}: {w['emb_bytes'] / 2**20:.1f} MiB = {w['emb_bytes'] / total:.3f} of the table "
              f"({w['rows']:,} rows; resident memory grew {w['rss_growth'] / 2**20:.1f} MiB building it)")
    print(f"  (1/W = {1 / args.workers:.3f}; world 1 resident growth {res['ours, world 1']['rss_growth'] / 2**20:.1f} MiB)")
    if tr is not None and tr.get("per_worker_bytes"):
        print("  torchrec table-wise per worker: " + ", ".join(f"{b / 2**20:.1f} MiB" for b in tr["per_worker_bytes"])
              + " (whole tables per rank: the split follows table sizes, not 1/W)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
