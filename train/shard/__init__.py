"""Row-wise sharded embedding (parameter-server style over all-to-all).

- ``collection.py``: ``ShardedEmbeddingCollection`` (input_dist / lookup / output_dist)
- ``optim.py``: sparse row-wise optimizers living with the rows (row-wise Adagrad, lazy Adam)
- ``comm.py``: the shard's process group and its two all-to-alls
- ``checkpoint.py``: ``shard-rank={r}.pt`` files, re-sharded on load to any world size
"""
from train.shard.collection import ShardedEmbeddingCollection, ShardPlan, local_row_count, owned_gids
from train.shard.comm import shard_group
from train.shard.optim import LazyAdam, RowWiseAdagrad, RowWiseOptimizer, make_row_optimizer

__all__ = [
    "ShardedEmbeddingCollection", "ShardPlan", "local_row_count", "owned_gids", "shard_group",
    "LazyAdam", "RowWiseAdagrad", "RowWiseOptimizer", "make_row_optimizer",
]
