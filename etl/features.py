"""Feature spec: which impression columns become fields, their kind, vocabulary and group.

A spec is YAML::

    fields:
      - {name: user_id,   kind: single,   min_count: 1, group: user}
      - {name: item_id,   kind: single,   min_count: 2, group: item}
      - {name: hist_cate, kind: multi,    hash_buckets: 1000, group: user}
      - {name: hist_shop, kind: weighted, min_count: 1, group: user}

(``fields`` may also be a mapping ``name: {kind: ...}``). Per field: ``kind`` single |
multi | weighted (default: inferred from the column type), ``min_count`` (vocabulary
threshold counted on the train days, default 1) or ``hash_buckets`` (ids
``1 + hash mod B``, no vocabulary), ``group`` (embedding group, default below).

Without a spec: ``user_id``, ``item_id`` and every other impression column except
``impression_id``/``ts``/``dt``, kind inferred from the type: string/int/bool -> single,
array<string|int> -> multi, map<string,number> -> weighted; ``min_count`` 1. The default
group is ``user`` for ``user_id`` and columns named ``user*``/``u_*``/``hist*``, ``item``
for ``item_id`` and ``item*``/``i_*``/``cate*``/``shop*``/``brand*``, else ``context``.
"""
from __future__ import annotations

from pyspark.sql import types as T

from etl.errors import InputError

KINDS = ("single", "multi", "weighted")
KEYS = {"name", "kind", "min_count", "hash_buckets", "group"}
NOT_FEATURES = {"impression_id", "ts", "dt"}
RESERVED = {"sample_id", "ts", "click", "conversion", "dt"}
_USER = ("user", "u_", "hist")
_ITEM = ("item", "i_", "cate", "shop", "brand")


def default_group(name: str) -> str:
    low = name.lower()
    if low == "user_id" or low.startswith(_USER):
        return "user"
    if low == "item_id" or low.startswith(_ITEM):
        return "item"
    return "context"


def infer_kind(dtype: T.DataType) -> str | None:
    """Kind of a column type, None if the type cannot be a feature."""
    if isinstance(dtype, (T.StringType, T.IntegralType, T.BooleanType)):
        return "single"
    if isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, (T.StringType, T.IntegralType)):
        return "multi"
    if (isinstance(dtype, T.MapType) and isinstance(dtype.keyType, (T.StringType, T.IntegralType))
            and isinstance(dtype.valueType, (T.FractionalType, T.IntegralType, T.DecimalType))):
        return "weighted"
    return None


def _compatible(kind: str, dtype: T.DataType) -> bool:
    k = infer_kind(dtype)
    if k is None:
        return False
    if kind == "single":
        return k == "single"
    return k in ("multi", "weighted")  # an array as weighted gets weight 1.0; a map as multi uses its keys


def load_spec(path: str) -> list[dict]:
    """Parse and check a spec file (shape only; columns are checked by :func:`resolve_fields`)."""
    import yaml

    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise InputError(f"{path}: cannot read feature spec ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    fields = doc.get("fields") if isinstance(doc, dict) else doc
    if isinstance(fields, dict):
        fields = [{"name": k, **(v or {})} for k, v in fields.items()]
    if not isinstance(fields, list) or not fields:
        raise InputError(f"{path}: expected a non-empty 'fields' list")
    out, seen = [], set()
    for i, f in enumerate(fields):
        where = f"{path}: fields[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise InputError(f"{where}: each field needs a 'name'")
        where = f"{path}: field {f['name']!r}"
        unknown = set(f) - KEYS
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(KEYS)})")
        if f["name"] in seen:
            raise InputError(f"{where}: listed twice")
        seen.add(f["name"])
        if "kind" in f and f["kind"] not in KINDS:
            raise InputError(f"{where}: kind {f['kind']!r} is not one of {', '.join(KINDS)}")
        if "min_count" in f and "hash_buckets" in f:
            raise InputError(f"{where}: give min_count or hash_buckets, not both")
        for k in ("min_count", "hash_buckets"):
            if k in f and (not isinstance(f[k], int) or isinstance(f[k], bool) or f[k] < 1):
                raise InputError(f"{where}: {k} must be an integer >= 1")
        if "group" in f and not isinstance(f["group"], str):
            raise InputError(f"{where}: group must be a string")
        out.append(dict(f))
    return out


def resolve_fields(spec: list[dict] | None, schema: T.StructType, table: str = "impressions") -> list[dict]:
    """Field dicts ``{name, kind, group, min_count | hash_buckets}`` checked against ``schema``."""
    cols = {f.name: f.dataType for f in schema.fields}
    if spec is None:
        names = ["user_id", "item_id"] + [c for c in cols if c not in NOT_FEATURES | {"user_id", "item_id"}]
        spec = [{"name": n} for n in names if n in cols]
    out = []
    for f in spec:
        name = f["name"]
        if name not in cols:
            raise InputError(f"feature {name!r}: no such column in {table} (columns: {', '.join(cols)})")
        if name in RESERVED or name.endswith("__w"):
            raise InputError(f"feature {name!r}: the name is reserved for the shard columns; rename the column")
        dtype = cols[name]
        kind = f.get("kind") or infer_kind(dtype)
        if kind is None or not _compatible(kind, dtype):
            raise InputError(f"{table} column {name!r} has type {dtype.simpleString()}, which cannot be a "
                             f"{kind or 'feature'} (string/int -> single, array<string> -> multi, "
                             f"map<string,float> -> weighted); give a feature spec that leaves it out")
        g = {"name": name, "kind": kind, "group": f.get("group") or default_group(name)}
        if f.get("hash_buckets"):
            g["hash_buckets"] = int(f["hash_buckets"])
        else:
            g["min_count"] = int(f.get("min_count") or 1)
        out.append(g)
    return out
