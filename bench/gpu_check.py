"""GPU check: sharded-embedding ESMM training for a fixed number of steps; samples/s and memory.

The production GPU path in one process: an NCCL process group of world size 1 (the
same code Ray Train runs per worker; the embedding's exchanges are skipped at world 1,
DDP's all-reduce goes through NCCL), bf16 autocast for the towers, fp32 embedding rows
with their lazy-Adam state on the GPU, pinned host batches copied non-blocking.
Batches are the synthetic Ali-CCP-shaped ones of bench/shard_data.py (23 fields); only
torch is needed (no Ray, no data files).

    python bench/gpu_check.py                                  # on a GPU machine
    python bench/gpu_check.py --batch-size 8192 --scale 10     # bigger batch, 8.7M-row table
    python bench/gpu_check.py --cpu --steps 5 --warmup 2       # smoke test anywhere (gloo, CPU)
    python bench/gpu_check.py --compare-cpu 20                 # + GPU fp32 steps against the same CPU steps

Prints one summary block and a JSON line (``GPU_CHECK {...}``) with the device name.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # robust timings when other processes share the cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from bench.shard_data import bench_batch, bench_fields  # noqa: E402
from train.device import prepare_towers, to_device  # noqa: E402
from train.jagged import Batch  # noqa: E402
from train.loop import train_step  # noqa: E402
from train.model import ESMM, EsmmConfig  # noqa: E402
from train.shard import ShardedEmbeddingCollection, shard_group  # noqa: E402


def make_batches(fields, args) -> list[Batch]:
    out = []
    for s in range(args.distinct_batches):
        kjt = bench_batch(fields, args.batch_size, s, seed=args.seed)
        g = torch.Generator().manual_seed(10_000 + s)
        click = (torch.rand(args.batch_size, generator=g) < 0.04).float()
        conv = click * (torch.rand(args.batch_size, generator=g) < 0.2).float()
        out.append(Batch(kjt, click, conv))
    return out


def profile_steps(step, n: int, use_cuda: bool) -> None:
    """Profile n steps: wall, host (CPU) and device time per step and the operators that
    take the most host time (a step whose wall is its host time is launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        if use_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    avgs = prof.key_averages()
    dev = sum(getattr(e, "self_device_time_total", 0) for e in avgs) / n / 1e3
    host = sum(e.self_cpu_time_total for e in avgs) / n / 1e3
    syncs = sum(e.count for e in avgs if "Synchronize" in e.key or "MemcpyAsync" in e.key) / n
    print(f"  profile, {n} steps: wall {wall / n * 1e3:.2f} ms/step (under the profiler), host ops {host:.2f} ms, "
          f"device kernels {dev:.2f} ms, {syncs:.1f} synchronizing calls and copies per step")
    print(avgs.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


def build_model(fields, args, device, group, precision: str):
    """The model as a Ray Train worker sets it up: seeded rows and towers on ``device``,
    fused towers, bf16 autocast when ``precision`` is bf16. Returns (model, precision)."""
    torch.manual_seed(args.seed)
    cfg = EsmmConfig(dim=args.dim, sparse_optimizer=args.optimizer, tower_precision=precision)
    model = ESMM(fields, cfg, embedding_factory=lambda fs, d: ShardedEmbeddingCollection(fs, d, group=group))
    model.to(device)
    return model, prepare_towers(model, precision, device.type, announce=False)


def compare_cpu(fields, args, device, host) -> dict:
    """``args.compare_cpu`` fp32 steps of one model from one seed on the same batches, on the
    CPU and on ``device``: the largest relative difference over every state-dict tensor
    (embedding rows, tower weights) and over the losses. Float rounding differs between the
    devices' kernels, and Adam divides by sqrt(v), so differences grow with the steps; a
    wrong gather, dedup or row update shows up as O(1)."""
    def run(dev):
        model, _ = build_model(fields, args, dev, None, "fp32")
        opts = model.make_optimizers()
        losses = [train_step(model, to_device(host[i % len(host)], dev), opts, None, apply_view=False)
                  for i in range(args.compare_cpu)]
        return losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}

    l_cpu, s_cpu = run(torch.device("cpu"))
    l_dev, s_dev = run(device)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    worst = max(s_cpu, key=lambda k: rel(s_dev[k], s_cpu[k]))
    return {"steps": args.compare_cpu, "tensors": len(s_cpu),
            "max_rel_state": rel(s_dev[worst], s_cpu[worst]), "worst_tensor": worst,
            "max_rel_loss": max(abs(a - b) / abs(b) for a, b in zip(l_dev, l_cpu)),
            "last_loss_cpu": l_cpu[-1], "last_loss_dev": l_dev[-1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="smoke test: CPU + gloo (no GPU needed)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=18)
    ap.add_argument("--scale", type=float, default=1.0, help="vocabulary multiplier (table size)")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adagrad"])
    ap.add_argument("--no-bf16", action="store_true", help="fp32 towers")
    ap.add_argument("--distinct-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="then profile STEPS steps (torch.profiler): host and device time per step, top operators")
    ap.add_argument("--compare-cpu", type=int, default=0, metavar="STEPS",
                    help="also run STEPS fp32 steps on the CPU and on the device and print the largest differences")
    args = ap.parse_args(argv)

    use_cuda = not args.cpu
    if use_cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the smoke test)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    name = torch.cuda.get_device_name(device) if use_cuda else "CPU"

    fields = bench_fields(args.scale)
    group = shard_group()  # None at world 1: the same code, no exchanges
    model, precision = build_model(fields, args, device, group, "fp32" if args.no_bf16 else "bf16")
    model.dense = DDP(model.dense, device_ids=[device.index] if use_cuda else None)
    opts = model.make_optimizers()
    emb = model.embeddings[0]
    host = make_batches(fields, args)

    def sync():
        if use_cuda:
            torch.cuda.synchronize(device)

    losses = []
    for i in range(args.warmup):
        losses.append(train_step(model, to_device(host[i % len(host)], device), opts, None, apply_view=False))
    sync()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        losses.append(train_step(model, to_device(host[i % len(host)], device), opts, None, apply_view=False))
    sync()
    sec = time.perf_counter() - t0
    emb_bytes = emb.memory_bytes() + opts[-1].memory_bytes()
    res = {
        "device": name, "backend": dist.get_backend(), "world": dist.get_world_size(),
        "bf16_towers": precision == "bf16", "batch_size": args.batch_size, "steps": args.steps,
        "rows": emb.num_rows, "dim": args.dim, "optimizer": args.optimizer,
        "samples_per_s": args.steps * args.batch_size / sec, "ms_per_step": sec / args.steps * 1e3,
        "embedding_bytes": emb_bytes, "first_loss": losses[0], "last_loss": losses[-1],
        "loss_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
    }
    if use_cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        res["reserved_gpu_bytes"] = torch.cuda.memory_reserved(device)
    print(f"gpu_check on {name} ({res['backend']}, world {res['world']}, bf16 towers {res['bf16_towers']}):")
    print(f"  {res['samples_per_s']:,.0f} samples/s ({res['ms_per_step']:.2f} ms/step, batch {args.batch_size}, "
          f"{args.steps} steps after {args.warmup} warm-up)")
    print(f"  embedding: {emb.num_rows:,} rows x {args.dim} fp32 + {args.optimizer} state = {emb_bytes / 2**20:.1f} MiB")
    if use_cuda:
        print(f"  GPU memory: peak allocated {res['peak_gpu_bytes'] / 2**20:.1f} MiB, "
              f"reserved {res['reserved_gpu_bytes'] / 2**20:.1f} MiB")
    print(f"  loss {losses[0]:.4f} -> {losses[-1]:.4f} (finite: {res['loss_finite']})")
    if args.profile:
        profile_steps(lambda i: train_step(model, to_device(host[i % len(host)], device), opts, None,
                                           apply_view=False), args.profile, use_cuda)
    if args.compare_cpu:
        res["compare_cpu"] = c = compare_cpu(fields, args, device, host)
        print(f"  {c['steps']} fp32 steps on {name} against the CPU: largest relative difference "
              f"{c['max_rel_state']:.2e} over {c['tensors']} tensors ({c['worst_tensor']}), "
              f"{c['max_rel_loss']:.2e} in the losses")
    print("GPU_CHECK " + json.dumps(res))
    dist.destroy_process_group()
    return 0 if res["loss_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
