"""Action 1 of an Ali-CCP run: the vocabulary and every counter in ONE collect.

The vocabulary (one aggregation over the train impressions and their common rows, ids
assigned in Spark, optionally merged into a previous vocabulary) and the counters (lines
per file, rows per status, impressions whose common row is missing) are small frames of
one shape, unioned and collected together: no separate count job per split or per
counter. The line counts come from the parsed files before any flagging, so
``read = kept + rejected`` is a check, not a definition.
"""
from __future__ import annotations

from collections import Counter

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.aliccp_encode import first_raw
from etl.aliccp_parse import Flagged
from etl.aliccp_spec import CONV_WITHOUT_CLICK, DUPLICATE, ITEM_FIELD, MALFORMED, USER_FIELD, FieldSpec

ROW = ("kind string, split string, status string, field string, value string, id bigint, n bigint, "
       "unlisted bigint, y bigint, z bigint, cwc bigint")
_COLS = [c.split()[0] for c in ROW.split(", ")]


def _rows(df: DataFrame, **cols) -> DataFrame:
    """``df`` in the ROW shape: given columns as named, the rest null."""
    types = dict(c.split() for c in ROW.split(", "))
    return df.select(*[(cols[c] if c in cols else F.lit(None)).cast(types[c]).alias(c) for c in _COLS])


def _lit(v):
    return F.lit(v)


def counter_rows(p: Flagged) -> DataFrame:
    """Small aggregates of one split: lines per file, rows per status, missing common rows."""
    s = _lit(p.split)
    one = F.count(F.lit(1))
    lsum = lambda c: F.sum(F.col(c).cast("long"))  # noqa: E731
    rows = _rows(p.skeleton_lines.agg(one.alias("n"), lsum("click").alias("y"), lsum("conversion").alias("z")),
                 kind=_lit("lines"), split=s, n=F.col("n"), y=F.col("y"), z=F.col("z"))
    rows = rows.unionByName(_rows(
        p.skeleton.groupBy("_status").agg(one.alias("n"), lsum("unlisted").alias("u"), lsum("click").alias("y"),
                                          lsum("conversion").alias("z"), lsum("_cwc").alias("c")),
        kind=_lit("sk"), split=s, status=F.col("_status"), n=F.col("n"), unlisted=F.col("u"), y=F.col("y"),
        z=F.col("z"), cwc=F.col("c")))
    if p.common is not None:
        rows = rows.unionByName(_rows(p.common_lines.agg(one.alias("n")), kind=_lit("clines"), split=s,
                                      n=F.col("n")))
        rows = rows.unionByName(_rows(
            p.common.groupBy("_status").agg(one.alias("n"), lsum("unlisted").alias("u")),
            kind=_lit("com"), split=s, status=F.col("_status"), n=F.col("n"), unlisted=F.col("u")))
        missing = p.impressions.select("cfi").join(p.commons.select("cfi"), "cfi", "left_anti")
        rows = rows.unionByName(_rows(missing.agg(one.alias("n")), kind=_lit("missing"), split=s, n=F.col("n")))
    # the manifest's users / items: distinct raw ids over the rows that will be written
    # (the user's from the common row when there is one), so the write needs no count job
    users = p.impressions if p.commons is None else p.commons.join(p.impressions.select("cfi").distinct(), "cfi")
    rows = rows.unionByName(_rows(users.agg(F.countDistinct(first_raw(users, USER_FIELD)).alias("n")),
                                  kind=_lit("users"), split=s, n=F.col("n")))
    rows = rows.unionByName(_rows(p.impressions.agg(F.countDistinct(first_raw(p.impressions, ITEM_FIELD)).alias("n")),
                                  kind=_lit("items"), split=s, n=F.col("n")))
    return rows


def vocab_and_counters(spark, flagged: dict[str, Flagged], fields: list[FieldSpec], min_count: int,
                       prev: dict | None = None):
    """Collect the vocabulary and the counters together.

    Returns ``(vocab, values, counters, parent)``: ``vocab`` a DataFrame (field, value, id,
    count) built from the collected rows (not recomputed), ``values`` ``{field: [value of
    id 1, ...]}`` for the encoder, ``counters`` per split (see :func:`split_counters`),
    ``parent`` ``{"parent", "new_ids", "vocab_sizes"}`` when ``prev`` (a previous
    vocabulary: ``{"parent": path, "vocab": DataFrame, "vocab_sizes": {...}}``) is given.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from etl.aliccp_encode import train_counts
    from etl.spark import arrow_frame
    from etl.vocab import VOCAB_SCHEMA, _values_of, assign_ids, extend_vocab

    vf = [f for f in fields if not f.hash_buckets]
    mins = {f.name: int(f.min_count or min_count) for f in vf}
    tr = flagged["train"]
    counts = train_counts(tr.impressions, tr.commons, fields)
    if prev is None:
        vocab = assign_ids(counts, mins).withColumn("new", F.lit(True))
    else:
        # the log ETL's rule: known values keep their ids, new ones follow the parent's
        # vocab_size - 1 (ids a bundle reserved are never reused)
        base = {k: int(v) - 1 for k, v in (prev.get("vocab_sizes") or {}).items() if k in mins}
        vocab = extend_vocab(prev["vocab"].where(F.col("field").isin(list(mins))), counts, mins, base=base,
                             flag_new=True)
    rows = _rows(vocab, kind=_lit("vocab"), field=F.col("field"), value=F.col("value"), id=F.col("id"),
                 n=F.col("count"), status=F.when(F.col("new"), F.lit("new")))
    for p in flagged.values():
        rows = rows.unionByName(counter_rows(p))
    got = rows.toArrow()
    is_voc = pc.fill_null(pc.equal(got.column("kind"), "vocab"), False)
    voc = got.filter(is_voc)
    voc = voc.take(pc.sort_indices(voc, sort_keys=[("field", "ascending"), ("id", "ascending")]))
    vt = pa.table({"field": voc.column("field"), "value": voc.column("value"), "id": voc.column("id"),
                   "count": voc.column("n")})
    values = _values_of(vt, [{"name": f.name} for f in vf])  # an id a parent left unused: None
    vocab_df = arrow_frame(spark, vt, VOCAB_SCHEMA)  # from the collected rows: no second count
    rest = got.filter(pc.invert(is_voc)).to_pandas()
    counters = {s: split_counters(rest, s, p.common is not None) for s, p in flagged.items()}
    parent = None
    if prev is not None:
        new = Counter(voc.filter(pc.fill_null(pc.equal(voc.column("status"), "new"), False)).column("field")
                      .to_pylist())
        parent = {"parent": prev["parent"], "vocab_sizes": prev.get("vocab_sizes", {}),
                  "new_ids": {f.name: new[f.name] for f in vf}}
    return vocab_df, values, counters, parent


def split_counters(got, split: str, has_common: bool) -> dict:
    """One split's counters from the collected rows (pandas)."""
    d = got[got["split"] == split]

    def val(kind, col="n", status="*"):
        r = d[d["kind"] == kind]
        if status != "*":
            r = r[r["status"].isna()] if status is None else r[r["status"] == status]
        return int(r[col].fillna(0).sum())

    out = {
        "read": val("lines"), "read_clicks": val("lines", "y"), "read_conversions": val("lines", "z"),
        "malformed": val("sk", status=MALFORMED), "duplicate": val("sk", status=DUPLICATE),
        # dropped rows are rejects; recoded ones are still among the kept rows
        "conversion_without_click": val("sk", status=CONV_WITHOUT_CLICK) + val("sk", "cwc", None),
        "kept": val("sk", status=None), "missing_common": val("missing"),
        "unlisted_entries": val("sk", "unlisted", None),
        "common_read": val("clines"), "common_kept": val("com", status=None),
        "common_malformed": val("com", status=MALFORMED), "common_duplicate": val("com", status=DUPLICATE),
        "common_unlisted_entries": val("com", "unlisted", None),
        "users": val("users"), "items": val("items"),
    }
    if not has_common:
        out["missing_common"] = 0
    return out
