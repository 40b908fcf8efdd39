"""The all-single fast path of ShardedEmbeddingCollection (every bag one value of weight 1,
Ali-CCP's case): a plain gather in [B, F, dim] order must give what the general pooling path
gives (outputs bit for bit, row gradients up to summation order), and anything else must
take the general path."""
from __future__ import annotations

import torch

from train.embedding import FieldConfig
from train.jagged import KeyedJagged
from train.shard import ShardedEmbeddingCollection
from train.shard.collection import dedup_field_major

from test_row_kernels import needs_kernels

FIELDS = [FieldConfig("user", "single", 41), FieldConfig("item", "single", 7, "mean"),
          FieldConfig("ctx", "single", 3)]  # ctx: every id repeats many times
DIM, B = 5, 64


def single_kjt(g: torch.Generator, weights: bool = True) -> KeyedJagged:
    vals = torch.cat([torch.randint(0, f.vocab_size, (B,), generator=g) for f in FIELDS])
    off = torch.arange(len(FIELDS) * B + 1)
    return KeyedJagged([f.name for f in FIELDS], vals, off, torch.ones(vals.numel()) if weights else None, B)


def run(emb: ShardedEmbeddingCollection, kjt: KeyedJagged, general: bool):
    if general:
        emb.all_single = lambda kjt: False  # instance attribute: force the pooling path
    try:
        out = emb(kjt)
        g = torch.Generator().manual_seed(3)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        idx, grad = emb.take_grads()
        return out.detach(), idx, grad
    finally:
        emb.__dict__.pop("all_single", None)


def test_single_fast_path_equals_general_path():
    g = torch.Generator().manual_seed(0)
    emb = ShardedEmbeddingCollection(FIELDS, DIM, init_std=0.1, seed=5)
    for weights in (True, False):
        kjt = single_kjt(g, weights)
        assert emb.all_single(kjt)
        fast, general = run(emb, kjt, False), run(emb, kjt, True)
        assert fast[0].shape == (B, len(FIELDS), DIM) and fast[0].is_contiguous()
        assert torch.equal(fast[0], general[0])
        # the same rows (the fused dedup lists them field by field as they first occur, not ascending)
        by_id = fast[1].argsort()
        assert torch.equal(fast[1][by_id], general[1])
        torch.testing.assert_close(fast[2][by_id], general[2], rtol=1e-6, atol=1e-7)


def test_other_batches_take_the_general_path():
    g = torch.Generator().manual_seed(1)
    emb = ShardedEmbeddingCollection(FIELDS, DIM, seed=5)
    kjt = single_kjt(g)
    # weighted values
    w = kjt.weights.clone()
    w[3] = 0.5
    assert not emb.all_single(KeyedJagged(kjt.keys, kjt.values, kjt.offsets, w, B))
    # as many values as bags, but one bag empty and one bag of two
    off = kjt.offsets.clone()
    off[1] = 0  # bag 0 empty, bag 1 holds values 0 and 1
    assert not emb.all_single(KeyedJagged(kjt.keys, kjt.values, off, kjt.weights, B))
    # an empty batch
    e = KeyedJagged(kjt.keys, kjt.values[:0], torch.zeros(1, dtype=torch.long), kjt.weights[:0], 0)
    assert not emb.all_single(e)


def test_dedup_by_field_sorts_is_one_stable_sort_of_the_sample_order():
    g = torch.Generator().manual_seed(2)
    sizes = torch.tensor([f.vocab_size for f in FIELDS])
    offset = torch.cumsum(sizes, 0) - sizes
    for b in (1, 5, 64):
        grid = torch.stack([torch.randint(0, f.vocab_size, (b,), generator=g) for f in FIELDS]) + offset[:, None]
        gids = grid.t().reshape(-1)
        uniq, order, starts = dedup_field_major(grid.clone())
        ids, ref_order = gids.sort(stable=True)
        assert torch.equal(order, ref_order)  # the same permutation, ties in position order
        assert torch.equal(uniq, torch.unique(gids))
        counts = torch.unique_consecutive(ids, return_counts=True)[1]
        assert torch.equal(starts, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]]))


@needs_kernels
def test_fused_dedup_groups_like_the_stable_sort():
    """row_kernels.dedup_gather: the rows index_select gives in sample order, the same groups
    of positions as dedup_field_major (each ascending; the groups' order is free); the
    marker left all -1; a bad id refused, on every field (each field its own thread)."""
    from train.shard import row_kernels

    k = row_kernels.kernels()
    assert k is not None
    g = torch.Generator().manual_seed(4)
    sizes = torch.tensor([f.vocab_size for f in FIELDS])
    offset = torch.cumsum(sizes, 0) - sizes
    marker = torch.full((int(sizes.sum()),), -1, dtype=torch.int32)
    rows = torch.randn(int(sizes.sum()), 5, generator=g)
    for b in (1, 5, 64, 3000):
        vals = torch.stack([torch.randint(0, f.vocab_size, (b,), generator=g) for f in FIELDS])
        out, uniq, order, starts = k.dedup_gather(vals, offset, marker, rows)
        grid = vals + offset[:, None]
        gids = grid.t().reshape(-1)
        assert torch.equal(out, rows[gids])
        r_uniq, r_order, r_starts = dedup_field_major(grid.clone())
        ends = torch.cat([starts[1:], torch.tensor([gids.numel()])])
        r_ends = torch.cat([r_starts[1:], torch.tensor([gids.numel()])])
        want = {int(u): r_order[s:e].tolist() for u, s, e in zip(r_uniq, r_starts, r_ends)}
        got = {int(u): order[s:e].tolist() for u, s, e in zip(uniq, starts, ends)}
        assert got == want
        first_seen = [gid for f in range(len(FIELDS)) for gid in dict.fromkeys(grid[f].tolist())]
        assert uniq.tolist() == first_seen  # field by field, as each id first occurs
        assert bool((marker == -1).all())
    for f, bad in ((1, FIELDS[1].vocab_size + 10**6), (0, FIELDS[0].vocab_size), (1, -1)):  # the second: field 1's row
        wrong = vals.clone()
        wrong[f, 7] = bad
        try:
            k.dedup_gather(wrong, offset, marker, rows)
            raise AssertionError(f"id {bad} of field {f} was accepted")
        except RuntimeError as e:
            assert f"embedding id {bad} of field {f} outside its table" in str(e) and "(batch row 7)" in str(e)
        assert bool((marker == -1).all())
    wrong = vals.clone()
    wrong[2, 9], wrong[1, 3] = -5, FIELDS[1].vocab_size  # two fields wrong: the first one is named
    try:
        k.dedup_gather(wrong, offset, marker, rows)
        raise AssertionError("two bad ids were accepted")
    except RuntimeError as e:
        assert f"embedding id {FIELDS[1].vocab_size} of field 1 outside" in str(e) and "(batch row 3)" in str(e)
    assert bool((marker == -1).all())
