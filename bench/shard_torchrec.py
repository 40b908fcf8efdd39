"""TorchRec's EmbeddingBagCollection under DistributedModelParallel, table-wise, on gloo.

The peer bench/shard.py compares the project's row-wise sharded embedding against:
one ``EmbeddingBagConfig`` per field of bench/shard_data.py (23 Ali-CCP-shaped fields,
15 single- and 8 multi-valued, sum pooling), sharded table-wise over W processes
(TorchRec has no row-wise sharding on CPU), FBGEMM's fused CPU kernel with the
optimizer applied in backward. Step k feeds rank r rows [r*B/W, (r+1)*B/W) of the
same global batch ``shard_data.bench_batch(fields, B, k, seed)`` bench/shard.py uses,
then forward + backward (+ the fused update).

Runs in bench/.venv-peers (``bash bench/setup_peers.sh``):

    bench/.venv-peers/bin/python bench/shard_torchrec.py --world 2 --steps 50 --batch 2048
    bench/.venv-peers/bin/python bench/shard_torchrec.py --json out.json   # bench/shard.py reads this

Prints ms per step (rank 0's wall time; ranks step in lockstep through the all-to-alls)
and each rank's embedding bytes (weights + optimizer state).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DIM = 18  # the paper's; FBGEMM's fused kernel needs a multiple of 4, so "fused" runs at --dim 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    torch.set_num_threads(args["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pg = dist.group.WORLD
    from shard_data import bench_batch, bench_fields
    from train.jagged import take_rows

    dim, kernel = args["dim"], args["kernel"]
    fields = bench_fields(args["scale"])
    tables = [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=dim, num_embeddings=f.vocab_size,
                                 feature_names=[f.name], pooling=PoolingType.SUM) for f in fields]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    # FBGEMM's CPU kernel has no Adam ("Optimizer adam is not supported in CPU mode"):
    # adam runs as row-wise Adagrad, and the result says so
    opt = {"adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adam": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
           "sgd": EmbOptimType.EXACT_SGD}[args["optimizer"]]
    opt_name = "row-wise adagrad" + (" (asked adam: FBGEMM CPU has none)" if args["optimizer"] == "adam" else "") \
        if args["optimizer"] != "sgd" else "sgd"
    sharders = [EmbeddingBagCollectionSharder(fused_params={"optimizer": opt, "learning_rate": args["lr"]})]
    constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=[kernel])
                   for t in tables}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints=constraints)
    plan = planner.collective_plan(ebc, sharders, pg)
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders,
                                   env=ShardingEnv.from_process_group(pg))
    # bytes this rank holds: its tables' rows and their optimizer state
    weight_bytes = 0
    for t in dmp.state_dict().values():
        shards = t.local_shards() if hasattr(t, "local_shards") else []
        weight_bytes += sum(s.tensor.numel() * s.tensor.element_size() for s in shards)
    state_per_row = {"adagrad": 1, "adam": 1, "sgd": 0}[args["optimizer"]]
    opt_bytes = weight_bytes // dim * state_per_row

    names = [f.name for f in fields]
    per_rank = args["batch"] // world
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(per_rank, len(names) * dim, generator=g)  # a fixed non-trivial loss
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)

    def kjt_of(step):
        kj = take_rows(bench_batch(fields, args["batch"], step, args["seed"]), mine)
        return KeyedJaggedTensor.from_offsets_sync(keys=names, values=kj.values, offsets=kj.offsets)

    kjts = [kjt_of(k) for k in range(args["warmup"] + args["steps"])]
    times = []
    for i, kjt in enumerate(kjts):
        dist.barrier()
        t = time.perf_counter()
        pooled = dmp(kjt)
        values = pooled.wait().values() if hasattr(pooled, "wait") else pooled.values()
        loss = (values * proj).sum()
        loss.backward()  # the fused kernel updates the rows here
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t)
    mem = torch.tensor([weight_bytes + opt_bytes], dtype=torch.long)
    all_mem = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(all_mem, mem)
    if rank == 0:
        times.sort()
        res = {"name": "torchrec-tw", "world": world, "batch": args["batch"], "steps": args["steps"],
               "optimizer": opt_name, "ms_per_step_median": 1000 * times[len(times) // 2],
               "ms_per_step_mean": 1000 * sum(times) / len(times),
               "bytes_per_rank": [int(m) for m in all_mem],
               "total_rows": sum(f.vocab_size for f in fields), "dim": dim, "kernel": kernel, "scale": args["scale"],
               "what": f"torchrec EBC + DMP table_wise, {kernel} kernel, {opt_name}, dim {dim}, "
                       f"gloo, W={world}"}
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int = 2, steps: int = 50, batch: int = 2048, warmup: int = 5, seed: int = 0,
        optimizer: str = "adagrad", lr: float = 0.01, threads: int = 1, kernel: str = "fused",
        dim: int | None = None, scale: float = 1.0) -> dict:
    """Spawns ``world`` gloo processes and returns rank 0's figures.

    Args:
        kernel (str): "fused", FBGEMM's CPU kernel with the optimizer fused into backward, the
            only kernel TorchRec 1.9.2 offers table-wise on CPU ("dense" is data-parallel only).
        dim (int | None): embedding dim; the fused kernel needs a multiple of 4 (default 20).
        scale (float): multiplies every vocabulary (shard_data.bench_fields), for the memory figures.
    """
    dim = dim or 20
    import tempfile

    import torch.multiprocessing as mp

    args = dict(steps=steps, batch=batch, warmup=warmup, seed=seed, optimizer=optimizer, lr=lr, threads=threads,
                kernel=kernel, dim=dim, scale=scale)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2048, help="global batch, split evenly over ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=["adagrad", "adam", "sgd"], default="adagrad",
                    help="adagrad = FBGEMM EXACT_ROWWISE_ADAGRAD; adam runs as that too (no Adam on CPU)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (2 cores / 2 ranks)")
    ap.add_argument("--kernel", choices=["fused"], default="fused")
    ap.add_argument("--dim", type=int, default=20, help="a multiple of 4 (FBGEMM); the paper's 18 cannot run")
    ap.add_argument("--scale", type=float, default=1.0, help="vocabulary multiplier (memory figures)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    r = run(a.world, a.steps, a.batch, a.warmup, a.seed, a.optimizer, a.lr, a.threads, a.kernel, a.dim, a.scale)
    mb = ", ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
    print(f"{r['what']}: {r['ms_per_step_median']:.2f} ms/step median ({r['ms_per_step_mean']:.2f} mean) "
          f"over {r['steps']} steps of global batch {r['batch']}; embedding MiB per rank: {mb} "
          f"(all rows {r['total_rows'] * r['dim'] * 4 / 2**20:.1f} MiB of weights)")
    if a.json:
        Path(a.json).write_text(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
