"""Ali-CCP (Tianchi dataId=408) raw format -> the shard contract, all in Spark.

Raw layout (see shared/data/aliccp/FORMAT.md)::

    sample_skeleton_{split}.csv   sample_id,click,conversion,common_feature_index,feature_num,feature_list
    common_features_{split}.csv   common_feature_index,feature_num,feature_list
    feature_list = entry (\\x01 entry)*,  entry = field \\x02 feature_id \\x03 value

Plan, chosen so that nothing per-row runs in Python and nothing big reaches the driver:

1. ``read_lines``: ``spark.read.text`` (gzip decoded by Hadoop), one row per line with
   its source file and a stable position.
2. ``parse_skeleton`` / ``parse_common``: ``split`` + ``transform``/``forall`` turn a
   line into ``entries: array<struct<field, id, value>>`` and a ``bad`` reason (null
   when the line is good). ``feature_num`` must equal the number of entries.
3. ``to_fields``: per configured field, ``filter`` the entries of that field into
   ``<field>`` (array<string> of raw feature ids, every one kept, file order) and, for
   weighted fields, ``<field>__w`` (array<float>). This runs on the common table
   BEFORE the join, i.e. on ~0.7M rows at full size, not on 42M.
4. ``join_common``: skeleton LEFT JOIN common on the index, a sort-merge (shuffle) join
   with the skeleton streamed and the common side buffered one row per key; never
   collected, never broadcast (``broadcast`` is disabled for it explicitly). A missing
   index keeps the impression with empty user fields (``aliccp.missing_common``).
5. labels: click=0 & conversion=1 is counted and dropped, or recoded to conversion=0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from etl.errors import InputError

SPLITS = ("train", "test")

# Ali-CCP fields: name -> (group, default kind). Kinds: single-valued profile / item /
# context fields are "single"; fields that can repeat in a row are "multi", and those
# whose float value carries information (behaviour counts, cross strengths) "weighted".
# 210's value is a constant 1.0 in every source read, so it is "multi".
FIELD_TABLE: dict[str, tuple[str, str]] = {
    "101": ("user", "single"),
    "121": ("user", "single"),
    "122": ("user", "single"),
    "124": ("user", "single"),
    "125": ("user", "single"),
    "126": ("user", "single"),
    "127": ("user", "single"),
    "128": ("user", "single"),
    "129": ("user", "single"),
    "109_14": ("user", "weighted"),
    "110_14": ("user", "weighted"),
    "127_14": ("user", "weighted"),
    "150_14": ("user", "weighted"),
    "205": ("item", "single"),
    "206": ("item", "single"),
    "207": ("item", "single"),
    "210": ("item", "multi"),
    "216": ("item", "single"),
    "508": ("combination", "weighted"),
    "509": ("combination", "weighted"),
    "702": ("combination", "weighted"),
    "853": ("combination", "weighted"),
    "301": ("context", "single"),
}
USER_FIELD, ITEM_FIELD = "101", "205"

# Reject / counter keys this converter adds next to the log ETL's eleven.
MALFORMED = "aliccp.malformed"
MISSING_COMMON = "aliccp.missing_common"
CONV_WITHOUT_CLICK = "aliccp.conversion_without_click"
DUPLICATE = "aliccp.duplicate"  # same sample_id / common index twice in one split: first line kept

SOH, STX, ETX = "\x01", "\x02", "\x03"

# The raw release has no timestamps. Each split gets one pseudo-day and a constant ts at
# its midnight UTC: train (the earlier file, per the paper's time split) before test.
# A processed sample's "val" split comes from the raw test file too, so it shares test's day.
PSEUDO_DAYS = {"train": "1970-01-01", "test": "1970-01-02", "val": "1970-01-02"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # single | multi | weighted
    group: str  # user | item | combination | context
    min_count: int | None = None  # None: the job's --min-count

    @property
    def side(self) -> str:
        """Which raw file the field lives in: user fields in common_features, the rest in the skeleton."""
        return "common" if self.group == "user" else "skeleton"


def default_fields() -> list[FieldSpec]:
    return [FieldSpec(n, k, g) for n, (g, k) in FIELD_TABLE.items()]


def load_field_spec(path: str | os.PathLike) -> list[FieldSpec]:
    """Read a YAML feature spec: ``fields: [{name, kind, group, min_count}]``.

    ``group`` defaults from the Ali-CCP table (unknown fields need it); ``kind`` too.
    A field not in the spec is skipped (its entries are counted as ``unlisted``).
    """
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise InputError(f"{p}: cannot read feature spec ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    items = doc.get("fields") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise InputError(f"{p}: expected a top-level 'fields:' list")
    out = []
    for i, it in enumerate(items):
        if isinstance(it, (str, int)):
            it = {"name": str(it)}
        if not isinstance(it, dict) or "name" not in it:
            raise InputError(f"{p}: fields[{i}] needs a 'name'")
        name = str(it["name"])
        g0, k0 = FIELD_TABLE.get(name, (None, None))
        kind, group = it.get("kind", k0), it.get("group", g0)
        if kind is None or group is None:
            raise InputError(f"{p}: field {name}: not an Ali-CCP field in the default table; "
                             f"give its 'kind' and 'group' (user = common_features side)")
        if kind not in ("single", "multi", "weighted"):
            raise InputError(f"{p}: field {name}: kind must be single, multi or weighted, got {kind!r}")
        mc = it.get("min_count")
        if mc is not None and (not isinstance(mc, int) or mc < 1):
            raise InputError(f"{p}: field {name}: min_count must be an integer >= 1")
        out.append(FieldSpec(name, kind, str(group), mc))
    if len({f.name for f in out}) != len(out):
        raise InputError(f"{p}: a field is listed twice")
    return out


# --------------------------------------------------------------------------- files


def find_raw_files(raw: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Locate ``sample_skeleton_{split}.csv[.gz]`` and ``common_features_{split}.csv[.gz]``.

    Returns ``{split: {"skeleton": path, "common": path}}``. Archives that were not
    unpacked, or a missing file, raise an InputError that says what to do.
    """
    root = Path(raw)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        raise InputError(f"{root}: an archive; unpack it first: mkdir -p DIR && tar -xzf {root} -C DIR "
                         f"(both sample_train.tar.gz and sample_test.tar.gz), then pass --raw DIR")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected the unpacked Ali-CCP files)")
    out: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        got = {}
        for kind, stem in (("skeleton", "sample_skeleton"), ("common", "common_features")):
            cands = [root / f"{stem}_{split}.csv", root / f"{stem}_{split}.csv.gz"]
            hit = [c for c in cands if c.is_file()]
            if not hit:
                tar = root / f"sample_{split}.tar.gz"
                if tar.is_file():
                    raise InputError(
                        f"{tar}: unpack the archive first: tar -xzf {tar} -C {root} "
                        f"(it holds {stem}_{split}.csv; .csv.gz copies are read as they are)"
                    )
                raise InputError(f"{root}: missing {stem}_{split}.csv (or .csv.gz)")
            out_path = hit[0]
            if out_path.stat().st_size == 0:
                raise InputError(f"{out_path}: empty file")
            got[kind] = str(out_path.resolve())
        out[split] = got
    return out


def read_lines(spark, path: str | list[str]):
    """One row per line: ``line``, ``source`` (its file) and ``pos`` (unique, stable within a run).

    ``pos`` (monotonically_increasing_id) orders lines as the files do; a gzip file is one
    partition, a plain file is split by Spark and the ids stay ordered across splits.
    """
    from pyspark.sql import functions as F

    paths = [path] if isinstance(path, str) else list(path)
    return (
        spark.read.text(paths)
        .select(F.regexp_replace("value", "\r$", "").alias("line"), F.input_file_name().alias("source"))
        .withColumn("pos", F.monotonically_increasing_id())
    )


# --------------------------------------------------------------------------- parsing


def _at(arr, i: int):
    """``arr[i]`` (1-based, negative from the end) or null: ANSI ``element_at`` would raise."""
    from pyspark.sql import functions as F

    return F.try_element_at(F.col(arr) if isinstance(arr, str) else arr, F.lit(i))


def _entries(feature_list):
    """Column expr: feature_list -> array<struct<field, id: string, value: float, ok: bool>>.

    One pass each, no per-entry splitting: the list is split once on all three
    separators into field/id/value triples, and its shape is checked by comparing the
    separators alone (non-separator characters removed) with ``(\\x02\\x03\\x01)*\\x02\\x03``
    built by ``repeat`` (a string equality, no backtracking regex on long lists).
    """
    from pyspark.sql import functions as F

    toks = F.when(feature_list == "", F.array().cast("array<string>")).otherwise(
        F.split(feature_list, "[\x01\x02\x03]"))
    third = lambda r: F.filter(toks, lambda x, i: i % 3 == r)  # noqa: E731
    zipped = F.arrays_zip(third(0).alias("field"), third(1).alias("id"), third(2).alias("value"))

    def one(e):
        idn = e["id"].try_cast("bigint")
        val = e["value"].try_cast("float")
        # nothing from outside the lambda in here: it would be evaluated once per entry
        ok = (F.length(e["field"]) > 0) & idn.isNotNull() & val.isNotNull() & ~F.isnan(val)
        return F.struct(e["field"].alias("field"), idn.cast("string").alias("id"), val.alias("value"),
                        F.coalesce(ok, F.lit(False)).alias("ok"))

    return F.transform(zipped, one)


def _shape_ok(feature_list):
    """The separators alone, in order, are (\\x02 \\x03 \\x01)* \\x02 \\x03 (or the list is empty)."""
    from pyspark.sql import functions as F

    seps = F.regexp_replace(feature_list, "[^\x01\x02\x03]", "")
    n = F.length(F.regexp_replace(seps, "[\x02\x03]", "")) + 1  # entries = SOH count + 1
    return (feature_list == "") | (seps == F.concat(F.repeat(F.lit(STX + ETX + SOH), n - 1), F.lit(STX + ETX)))


def _bad_list(num_col, entries_col, shape_ok):
    """Reason (string) the list part is malformed, or null."""
    from pyspark.sql import functions as F

    n = num_col.try_cast("int")
    return (
        F.when(n.isNull(), F.lit("feature_num is not an integer"))
        .when(~shape_ok | ~F.forall(entries_col, lambda e: e["ok"]), F.lit("a feature entry is not field\\x02id\\x03value"))
        .when(F.size(entries_col) != n, F.concat(
            F.lit("feature_num "), n.cast("string"), F.lit(" but "), F.size(entries_col).cast("string"),
            F.lit(" entries")))
    )


def parse_skeleton(lines):
    """Lines of sample_skeleton_*.csv -> sample_id, click, conversion, cfi, entries, bad, line, source, pos."""
    from pyspark.sql import functions as F

    p = F.split("line", ",", 6)
    df = lines.select(
        "line", "source", "pos", p.alias("p"),
    ).select(
        "line", "source", "pos",
        F.size("p").alias("ncols"),
        _at("p", 1).alias("sample_id"),
        _at("p", 2).alias("click_s"),
        _at("p", 3).alias("conv_s"),
        _at("p", 4).alias("cfi"),
        _at("p", 5).alias("num_s"),
        _at("p", -1).alias("fl"),
    ).withColumn("entries", _entries(F.col("fl")))
    bad = (
        F.when(F.col("ncols") != 6, F.concat(F.lit("expected 6 comma-separated columns, got "),
                                               F.col("ncols").cast("string")))
        .when(F.length("sample_id") == 0, F.lit("empty sample_id"))
        .when(~F.col("click_s").isin("0", "1"), F.lit("click is not 0/1"))
        .when(~F.col("conv_s").isin("0", "1"), F.lit("conversion is not 0/1"))
        .when(F.length("cfi") == 0, F.lit("empty common_feature_index"))
        .otherwise(_bad_list(F.col("num_s"), F.col("entries"), _shape_ok(F.col("fl"))))
    )
    return df.select(
        "sample_id",
        F.when(F.col("click_s") == "1", 1).otherwise(0).cast("tinyint").alias("click"),
        F.when(F.col("conv_s") == "1", 1).otherwise(0).cast("tinyint").alias("conversion"),
        "cfi", "entries", bad.alias("bad"), "line", "source", "pos",
    )


def parse_common(lines):
    """Lines of common_features_*.csv -> cfi, entries, bad, line, source, pos."""
    from pyspark.sql import functions as F

    p = F.split("line", ",", 3)
    df = lines.select("line", "source", "pos", p.alias("p")).select(
        "line", "source", "pos",
        F.size("p").alias("ncols"),
        _at("p", 1).alias("cfi"),
        _at("p", 2).alias("num_s"),
        _at("p", -1).alias("fl"),
    ).withColumn("entries", _entries(F.col("fl")))
    bad = (
        F.when(F.col("ncols") != 3, F.concat(F.lit("expected 3 comma-separated columns, got "),
                                               F.col("ncols").cast("string")))
        .when(F.length("cfi") == 0, F.lit("empty common_feature_index"))
        .otherwise(_bad_list(F.col("num_s"), F.col("entries"), _shape_ok(F.col("fl"))))
    )
    return df.select("cfi", "entries", bad.alias("bad"), "line", "source", "pos")




def check_fields(df, fields: list[FieldSpec]):
    """Keep only the entries of ``fields`` (file order) and flag spec violations.

    Adds ``unlisted`` (entries of fields not in the spec: skipped, like every public
    reader does, but counted). A ``single`` field with more than one entry makes the row
    malformed: the spec says one id, the data says more, and keeping one would truncate.
    """
    from pyspark.sql import functions as F

    names = [f.name for f in fields]
    listed = (lambda e: e["field"].isin(names)) if names else (lambda e: F.lit(False))
    bad = F.col("bad")
    for f in fields:
        if f.kind == "single":
            n = F.size(F.filter("entries", _field_is(f.name)))
            bad = F.coalesce(bad, F.when(n > 1, F.concat(
                F.lit(f"field {f.name} is single but has "), n.cast("string"), F.lit(" entries"))))
    return (df.withColumn("unlisted", F.size(F.filter("entries", lambda e: ~listed(e))))
              .withColumn("entries", F.filter("entries", listed))
              .withColumn("bad", bad))


def _field_is(name: str):
    # F.filter passes (element, index) to a 2-argument lambda, so bind the name by closure.
    from pyspark.sql import functions as F

    return lambda e: e["field"] == F.lit(name)


def _rejects(df, table: str, reason, why):
    from pyspark.sql import functions as F

    return df.select(
        F.lit(table).alias("table"),
        reason.alias("reason"),
        F.to_json(F.struct(F.col("line"), F.col("pos"))).alias("row"),
        F.col("source"),
        why.cast("string").alias("detail"),
    )


# --------------------------------------------------------------------------- one split


@dataclass
class Prepared:
    """One split after parsing, validation, dedupe and the label rule (lazy DataFrames).

    ``impressions``: pos, sample_id, click, conversion, cfi, entries (listed fields only).
    ``commons``: pos, cfi, entries (user fields only), one row per index.
    ``rejects``: table, reason, row (JSON: the raw line, why, position), source.
    """
    split: str
    impressions: object
    commons: object
    rejects: object
    parsed: object  # every skeleton line, for the read counters
    parsed_common: object


def prepare_split(spark, split: str, skeleton_path: str, common_path: str, fields: list[FieldSpec], *,
                  recode_conversion_without_click: bool = False, persist: bool = True) -> Prepared:
    """Parse and validate one split's two raw files; nothing is joined or encoded yet."""
    from pyspark.sql import functions as F

    sk_fields = [f for f in fields if f.side == "skeleton"]
    us_fields = [f for f in fields if f.side == "common"]
    sk = check_fields(parse_skeleton(read_lines(spark, skeleton_path)), sk_fields)
    com = check_fields(parse_common(read_lines(spark, common_path)), us_fields)
    com = com.withColumn("line", F.when(F.col("bad").isNotNull(), F.col("line")))
    return finish_split(split, sk, com, f"sample_skeleton_{split}", f"common_features_{split}",
                        recode_conversion_without_click=recode_conversion_without_click, persist=persist)


def finish_split(split: str, sk, com, sk_table: str, com_table: str | None, *,
                 recode_conversion_without_click: bool = False, persist: bool = True) -> Prepared:
    """Validated parse -> Prepared: rejects split off, duplicates and the label rule applied.

    ``sk``: sample_id, click, conversion, cfi (may be null without a common side),
    entries, bad, unlisted, line, source, pos. ``com``: cfi, entries, bad, unlisted,
    line, source, pos, or None (the processed formats are already joined).

    Every line gets a ``_status`` (null = kept, else its reject reason), so the rejects,
    the kept rows and all the counters come from one frame. Duplicates (same sample_id,
    or same common index, twice in one split) keep the first line and reject the others
    (``aliccp.duplicate``): a second copy would repeat an impression or fan the join out.
    """
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    cwc = (F.col("click") == 0) & (F.col("conversion") == 1)
    # Only rejected lines keep their text (a dropped click=0/conversion=1 row is one).
    sk = sk.withColumn("line", F.when(F.col("bad").isNotNull() | cwc, F.col("line")))
    if persist:  # the counters and both vocab passes read these instead of re-parsing the text
        sk = sk.persist(StorageLevel.MEMORY_AND_DISK)
        com = None if com is None else com.persist(StorageLevel.MEMORY_AND_DISK)

    # Only ids seen twice travel (a small aggregate); AQE broadcasts that tiny side back.
    ok = sk.where(F.col("bad").isNull())
    dup_ids = (ok.groupBy("sample_id").agg(F.count(F.lit(1)).alias("_n"), F.min("pos").alias("_first"))
               .where(F.col("_n") > 1).select("sample_id", "_first"))
    st = sk.join(dup_ids, "sample_id", "left")
    is_dup = F.col("_first").isNotNull() & (F.col("pos") != F.col("_first"))
    status = (F.when(F.col("bad").isNotNull(), F.lit(MALFORMED)).when(is_dup, F.lit(DUPLICATE))
              .when(cwc & F.lit(not recode_conversion_without_click), F.lit(CONV_WITHOUT_CLICK)))
    why = (F.when(F.col("bad").isNotNull(), F.col("bad"))
           .when(is_dup, F.concat(F.lit("sample_id "), F.col("sample_id"), F.lit(" seen before in this split")))
           .otherwise(F.lit("click=0 with conversion=1")))
    st = st.withColumn("_status", status).withColumn("_why", why).withColumn("_cwc", cwc)
    kept = st.where(F.col("_status").isNull())
    if recode_conversion_without_click:
        kept = kept.withColumn("conversion", F.when(cwc, F.lit(0)).otherwise(F.col("conversion")).cast("tinyint"))
    rejects = _rejects(st.where(F.col("_status").isNotNull()), sk_table, F.col("_status"), F.col("_why"))

    commons = cst = None
    if com is not None:
        w = Window.partitionBy("cfi").orderBy("pos")
        cst = com.withColumn("_rank", F.when(F.col("bad").isNull(), F.row_number().over(w)))
        cst = cst.withColumn("_status", F.when(F.col("bad").isNotNull(), F.lit(MALFORMED))
                             .when(F.col("_rank") > 1, F.lit(DUPLICATE)))
        cst = cst.withColumn("_why", F.coalesce(F.col("bad"), F.concat(
            F.lit("common_feature_index "), F.col("cfi"), F.lit(" seen before in this split"))))
        rejects = rejects.unionByName(_rejects(cst.where(F.col("_status").isNotNull()), com_table,
                                               F.col("_status"), F.col("_why")))
        commons = cst.where(F.col("_status").isNull()).select("pos", "cfi", "entries")
    return Prepared(
        split=split,
        impressions=kept.select("pos", "sample_id", "click", "conversion", "cfi", "entries", "_cwc"),
        commons=commons, rejects=rejects, parsed=st, parsed_common=cst,
    )


def split_counters(p: Prepared) -> dict:
    """The split's counters: one aggregate per file over the status-tagged lines, one for missing keys."""
    from pyspark.sql import functions as F

    def by_status(df):
        rows = df.groupBy("_status").agg(
            F.count(F.lit(1)).alias("n"),
            F.sum(F.col("unlisted").cast("long")).alias("unlisted"),
            *([F.sum(F.col("click").cast("long")).alias("y"), F.sum(F.col("conversion").cast("long")).alias("z"),
               F.sum(F.col("_cwc").cast("long")).alias("cwc")] if "click" in df.columns else []),
        ).collect()
        return {r["_status"]: r.asDict() for r in rows}

    sk = by_status(p.parsed)
    n = lambda d, k, c="n": int((d.get(k) or {}).get(c) or 0)  # noqa: E731
    out = {
        "read": sum(n(sk, k) for k in sk),
        "read_clicks": sum(n(sk, k, "y") for k in sk),
        "read_conversions": sum(n(sk, k, "z") for k in sk),
        "malformed": n(sk, MALFORMED), "duplicate": n(sk, DUPLICATE),
        # dropped rows are rejects; recoded ones are still among the kept rows
        "conversion_without_click": n(sk, CONV_WITHOUT_CLICK) + n(sk, None, "cwc"),
        "kept": n(sk, None), "missing_common": 0,
        "unlisted_entries": n(sk, None, "unlisted"),
        "common_read": 0, "common_malformed": 0, "common_duplicate": 0, "common_unlisted_entries": 0,
    }
    if p.parsed_common is not None:
        c = by_status(p.parsed_common)
        out.update({
            "common_read": sum(n(c, k) for k in c), "common_malformed": n(c, MALFORMED),
            "common_duplicate": n(c, DUPLICATE), "common_unlisted_entries": n(c, None, "unlisted"),
            "missing_common": p.impressions.select("cfi").join(p.commons.select("cfi"), "cfi", "left_anti").count(),
        })
    return out


# --------------------------------------------------------------------------- vocab + encode


def train_counts(impressions, commons=None):
    """``(field, value, count)`` over the TRAIN impressions, every occurrence counted.

    Impression-side entries are counted by exploding the impressions. A common row's
    entries count once per impression that references it: the common rows (0.7M at full
    size) are exploded and weighted by their impression count, instead of exploding the
    42M joined rows with hundreds of user entries each.
    """
    from pyspark.sql import functions as F

    from etl.vocab import count_values

    sk = count_values(impressions.select(F.explode("entries").alias("e"))
                      .select(F.col("e.field").alias("field"), F.col("e.id").alias("value")))
    if commons is None:
        return sk
    n_imp = impressions.groupBy("cfi").agg(F.count(F.lit(1)).alias("_n"))
    com = (commons.join(n_imp, "cfi").select(F.explode("entries").alias("e"), "_n")
           .groupBy(F.col("e.field").alias("field"), F.col("e.id").alias("value"))
           .agg(F.sum("_n").alias("count")))
    return sk.unionByName(com)


def encode(df, vocab, fields: list[FieldSpec], key: str = "pos"):
    """``entries`` -> per field ``<name>`` ids (list<bigint>) + ``<name>__w`` for weighted.

    The entries travel long (one row per entry, with its position in the list) through
    ``etl.vocab.encode_long``'s join, then are gathered back per row and put in list
    order again, so ids keep file order and every entry survives. A ``single`` field with
    no entry gets ``[0]`` (missing); multi/weighted fields get ``[]``.
    """
    from pyspark.sql import functions as F

    from etl.vocab import encode_long

    long = (df.select(key, F.posexplode("entries").alias("_i", "e"))
            .select(key, "_i", F.col("e.field").alias("field"), F.col("e.id").alias("value"),
                    F.col("e.value").alias("w")))
    enc = encode_long(long, vocab)
    gathered = enc.groupBy(key).agg(
        F.array_sort(F.collect_list(F.struct("_i", "field", "id", "w"))).alias("_ents"))
    base = df.drop("entries").join(gathered, key, "left")
    ents = F.coalesce(F.col("_ents"), F.array().cast(gathered.schema["_ents"].dataType))
    cols = [F.col(c) for c in base.columns if c != "_ents"]
    for f in fields:
        sel = F.filter(ents, _field_is(f.name))
        ids = F.transform(sel, lambda e: e["id"])
        if f.kind == "single":
            ids = F.when(F.size(ids) == 0, F.array(F.lit(0).cast("bigint"))).otherwise(ids)
        cols.append(ids.alias(f.name))
        if f.kind == "weighted":
            cols.append(F.transform(sel, lambda e: e["w"]).alias(f.name + "__w"))
    return base.select(*cols)


def _first_raw(entries_col, name: str):
    """The raw feature id of ``name``'s first entry (null if none): for distinct counts."""
    from pyspark.sql import functions as F

    return _at(F.transform(F.filter(entries_col, _field_is(name)), lambda e: e["id"]), 1)


def assemble(split: str, imp_enc, com_enc, fields: list[FieldSpec], prefixed: bool = False):
    """Encoded impressions (+ encoded common rows) -> the writer's split frame.

    ``_item_raw`` (impressions) and ``_user_raw`` (common rows, or impressions when there
    is no common side) carry the raw ids the manifest counts distinct users/items by.
    ``sample_id`` becomes ``<split>-<sample_id>`` unless ``prefixed`` (already unique).

    The common side joins by index with a forced sort-merge join: never broadcast,
    never collected; the skeleton streams and each key buffers its one common row.
    """
    from pyspark.sql import functions as F

    ts = F.lit(PSEUDO_DAYS[split]).cast("date").cast("timestamp")
    sid = F.col("sample_id") if prefixed else F.concat(F.lit(split + "-"), F.col("sample_id"))
    cols = [sid.alias("sample_id"), ts.alias("ts"),
            F.lit(PSEUDO_DAYS[split]).alias("dt"), "click", "conversion"]
    if com_enc is None:
        df = imp_enc
        for f in fields:
            cols += [f.name] + ([f.name + "__w"] if f.kind == "weighted" else [])
        return df.select(*cols, "_user_raw", "_item_raw")
    right = com_enc.withColumnRenamed("cfi", "_cfi").withColumnRenamed("_user_raw", "_user_raw_c")
    df = imp_enc.join(right.hint("shuffle_merge"), F.col("cfi") == F.col("_cfi"), "left")
    for f in fields:
        if f.side == "common":
            empty = "array(cast(0 as bigint))" if f.kind == "single" else "cast(array() as array<bigint>)"
            cols.append(F.coalesce(F.col(f.name), F.expr(empty)).alias(f.name))
            if f.kind == "weighted":
                cols.append(F.coalesce(F.col(f.name + "__w"), F.expr("cast(array() as array<float>)"))
                            .alias(f.name + "__w"))
        else:
            cols += [f.name] + ([f.name + "__w"] if f.kind == "weighted" else [])
    return df.select(*cols, F.col("_user_raw_c").alias("_user_raw"), F.col("_item_raw"))


# --------------------------------------------------------------------------- the whole run


@dataclass
class Converted:
    """Everything ``write_dataset`` needs, built lazily from one input format."""
    splits: dict  # split -> DataFrame in the writer's layout
    fields: list[dict]  # manifest fields: name, kind, vocab_size, group
    vocab: object
    rejects: object  # DataFrame (table, reason, row, source_file)
    read_counts: dict
    counters: dict  # split -> counters (see split_counters)
    inputs: dict
    recode: bool = False
    format: str = "raw"


def min_counts(fields: list[FieldSpec], min_count: int) -> dict[str, int]:
    return {f.name: int(f.min_count or min_count) for f in fields}


def convert_raw(spark, raw: str, fields: list[FieldSpec] | None = None, *, min_count: int = 1,
                recode_conversion_without_click: bool = False, features_path: str | None = None) -> Converted:
    """Raw Ali-CCP directory -> a ``Converted`` (train from the train files, test from the test files)."""
    check_min_count(min_count)
    fields = fields or default_fields()
    files = find_raw_files(raw)
    preps = {s: prepare_split(spark, s, files[s]["skeleton"], files[s]["common"], fields,
                              recode_conversion_without_click=recode_conversion_without_click)
             for s in SPLITS}
    inputs = {
        "kind": "aliccp", "format": "raw", "raw": str(Path(raw).resolve()), "truth": None,
        "files": {s: [files[s]["skeleton"], files[s]["common"]] for s in SPLITS},
        "features": str(Path(features_path).resolve()) if features_path else None, "min_count": min_count,
    }
    return convert_prepared(preps, fields, min_count=min_count, inputs=inputs, fmt="raw",
                            recode=recode_conversion_without_click, prefixed=False)


def check_min_count(min_count: int) -> None:
    if min_count < 1:
        raise InputError(f"--min-count must be >= 1, got {min_count}")


def convert_prepared(preps: dict, fields: list[FieldSpec], *, min_count: int, inputs: dict, fmt: str,
                     recode: bool, prefixed: bool) -> Converted:
    """Prepared splits (any input format) -> vocabulary on train, encoded split frames, counters."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from etl.vocab import assign_ids, vocab_sizes

    counters = {s: split_counters(p) for s, p in preps.items()}
    tr = preps["train"]
    if counters["train"]["kept"] == 0:
        raise InputError(f"{inputs['files']['train'][0]}: no usable impression in the train split "
                         f"(read {counters['train']['read']}, every line rejected)")
    vocab = assign_ids(train_counts(tr.impressions, tr.commons), min_counts(fields, min_count))
    vocab = vocab.persist(StorageLevel.MEMORY_AND_DISK)
    sizes = vocab_sizes(vocab, [f.name for f in fields])
    splits = {}
    for s, p in preps.items():
        imp = p.impressions.drop("_cwc").withColumn("_item_raw", _first_raw(F.col("entries"), ITEM_FIELD))
        if p.commons is None:
            imp = imp.withColumn("_user_raw", _first_raw(F.col("entries"), USER_FIELD))
            splits[s] = assemble(s, encode(imp, vocab, fields).drop("pos"), None, fields, prefixed)
            continue
        com = p.commons.withColumn("_user_raw", _first_raw(F.col("entries"), USER_FIELD))
        imp_enc = encode(imp, vocab, [f for f in fields if f.side == "skeleton"]).drop("pos")
        com_enc = encode(com, vocab, [f for f in fields if f.side == "common"]).drop("pos")
        splits[s] = assemble(s, imp_enc, com_enc, fields, prefixed)
    rejects = None
    for p in preps.values():
        r = p.rejects.withColumnRenamed("source", "source_file")
        rejects = r if rejects is None else rejects.unionByName(r)
    read = {
        "impressions": sum(c["read"] for c in counters.values()),
        "clicks": sum(c["read_clicks"] for c in counters.values()),
        "conversions": sum(c["read_conversions"] for c in counters.values()),
    }
    mfields = [{"name": f.name, "kind": f.kind, "vocab_size": int(sizes[f.name]), "group": f.group,
                "min_count": int(f.min_count or min_count)} for f in fields]
    return Converted(splits=splits, fields=mfields, vocab=vocab, rejects=rejects, read_counts=read,
                     counters=counters, inputs=inputs, recode=recode, format=fmt)


def manifest_extra(conv: Converted) -> dict:
    """The manifest's additions: the eleven log reject keys (zeros) plus the Ali-CCP reasons,
    and an ``aliccp`` section with every counter per split."""
    from etl.shards import REJECT_KEYS

    c = conv.counters
    tot = lambda k: int(sum(v.get(k, 0) for v in c.values()))  # noqa: E731
    cwc_rejected = 0 if conv.recode else tot("conversion_without_click")
    rejects = {k: 0 for k in REJECT_KEYS}
    rejects.update({
        MALFORMED: tot("malformed") + tot("common_malformed"),
        DUPLICATE: tot("duplicate") + tot("common_duplicate"),
        CONV_WITHOUT_CLICK: cwc_rejected,
    })
    return {
        "rejects": rejects,
        "aliccp": {
            "format": conv.format,
            "counts": {
                CONV_WITHOUT_CLICK: tot("conversion_without_click"),
                MALFORMED: tot("malformed") + tot("common_malformed"),
                MISSING_COMMON: tot("missing_common"),
                DUPLICATE: tot("duplicate") + tot("common_duplicate"),
            },
            "conversion_without_click": "recode" if conv.recode else "drop",
            "pseudo_days": {s: PSEUDO_DAYS[s] for s in conv.splits},
            "ts": "constant per split: 00:00 UTC of the split's pseudo-day (the release has no time)",
            "splits": c,
        },
    }


def write(spark, out: str, conv: Converted, *, shards: int = 4, created_by: str = "esmm aliccp") -> dict:
    """Write ``conv`` with the shared shard writer; conservation is checked before the commit.

    Per split: lines read = rows written + malformed + duplicate (+ click=0/conversion=1
    rows when they are dropped); a mismatch fails the job and leaves the old output.
    """
    from etl.shards import write_dataset

    def check(manifest):
        for s, c in conv.counters.items():
            written = manifest["splits"][s]["impressions"]
            dropped = 0 if conv.recode else c["conversion_without_click"]
            if written != c["kept"] or c["read"] != written + c["malformed"] + c["duplicate"] + dropped:
                raise AssertionError(
                    f"split {s}: read {c['read']} != written {written} + malformed {c['malformed']} "
                    f"+ duplicate {c['duplicate']} + dropped click=0/conversion=1 {dropped}")

    return write_dataset(
        spark, out, conv.splits, conv.fields, shards=shards, inputs=conv.inputs, rejects=conv.rejects,
        reject_counts={}, read_counts=conv.read_counts, created_by=created_by, vocab=conv.vocab,
        user_field="_user_raw", item_field="_item_raw", extra=manifest_extra(conv), check=check)
