"""Ali-CCP fields: the release's field table, the field spec, reject keys and pseudo-days.

A field's *side* (which raw file holds it) comes from the release: the 13 user fields
live in common_features, the other 10 in the skeleton. A spec's ``group`` is only the
embedding group written to the manifest; it never moves a field to the other file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from etl.errors import InputError

SPLITS = ("train", "test")

# name -> (side group, default kind). Kinds: single-valued profile / item / context
# fields are "single"; fields that can repeat in a row are "multi", and those whose float
# value carries information (behaviour counts, cross strengths) "weighted". 210's value
# is a constant 1.0 in every source read, so it is "multi".
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

# The raw release has no timestamps. Each split gets one pseudo-day and a constant ts at
# its midnight UTC: train (the earlier file, per the paper's time split) before test.
# A processed sample's "val" split comes from the raw test file too, so it shares test's day.
PSEUDO_DAYS = {"train": "1970-01-01", "test": "1970-01-02", "val": "1970-01-02"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # single | multi | weighted
    group: str  # embedding group: user | item | combination | context | any name
    min_count: int | None = None  # None: the job's --min-count
    hash_buckets: int | None = None  # ids 1 + hash mod B, no vocabulary

    @property
    def side(self) -> str:
        """The raw file the field is read from: where the release puts it; a field outside
        the table is read from common_features when its group is ``user``, else the skeleton."""
        known = FIELD_TABLE.get(self.name)
        return "common" if (known[0] if known else self.group) == "user" else "skeleton"

    def as_dict(self, min_count: int) -> dict:
        """The ``etl.features`` field dict (what ``etl.vocab`` takes)."""
        d = {"name": self.name, "kind": self.kind, "group": self.group}
        if self.hash_buckets:
            d["hash_buckets"] = int(self.hash_buckets)
        else:
            d["min_count"] = int(self.min_count or min_count)
        return d


def default_fields() -> list[FieldSpec]:
    return [FieldSpec(n, k, g) for n, (g, k) in FIELD_TABLE.items()]


def load_field_spec(path: str | os.PathLike) -> list[FieldSpec]:
    """The shared feature-spec loader (``etl.features.load_spec``) with Ali-CCP defaults.

    ``kind`` and ``group`` default from the release's table (a field outside it needs
    both). Names are strings: write ``{name: '101'}``. A field not in the spec is skipped
    (its entries are counted as ``unlisted``).
    """
    from etl.features import load_spec

    out = []
    for it in load_spec(str(path)):
        name = it["name"]
        g0, k0 = FIELD_TABLE.get(name, (None, None))
        kind, group = it.get("kind", k0), it.get("group", g0)
        if kind is None or group is None:
            raise InputError(f"{path}: field {name}: not an Ali-CCP field in the default table; "
                             f"give its 'kind' and 'group' (group user = read from common_features)")
        out.append(FieldSpec(name, kind, group, it.get("min_count"), it.get("hash_buckets")))
    return out


def check_min_count(min_count: int) -> None:
    if min_count < 1:
        raise InputError(f"--min-count must be >= 1, got {min_count}")
