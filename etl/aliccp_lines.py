"""Ali-CCP text lines -> checked rows with one column per field, in Arrow kernels.

Spark runs higher-order functions (``transform``, ``filter``, ``forall``) interpreted:
with ~500 entries a common row and one ``filter`` pass per field, those lambdas were
nearly all of the converter's time. Here a batch of lines (``mapInArrow``) is split into
its columns once and its feature list into entries once; one anchored regex checks each
entry's shape (``field \\x02 id \\x03 value``, exactly one of each separator) and
extracts its parts; entries are then grouped by their field's index in the spec, so
every field's column is a slice of one sorted array. No Python object per entry.

The checks are the ones the Spark parse made, in the same order and with the same
messages (``bad``: null when the line is good):

- skeleton: 6 comma-separated columns (the last holds the feature list), a sample_id,
  click and conversion 0/1, a common index, an integer feature_num;
- common: 3 columns, a common index, an integer feature_num;
- PaddleRec: ``sample_id,click,conversion,field:feat,...``;
- every entry well formed: a field, an integer id (Spark's ``try_cast(bigint)``: blanks
  around it and a sign allowed; kept as its canonical decimal), a number that is not NaN
  (decimal or ``inf``/``infinity``, any case; Java's hex and ``f``/``d`` suffix forms
  are not accepted); feature_num equal to the entries;
- a ``single`` field of the spec has at most one entry (the first such field in spec
  order is named).

Entries of fields outside the spec are skipped and counted (``unlisted``). A line's text
is kept only when it can become a reject (bad, or click=0 with conversion=1).
"""
from __future__ import annotations

from etl.list_encode import _list_parts

_ENTRY = r"^(?P<field>[^\x02\x03]*)\x02(?P<id>[^\x02\x03]*)\x03(?P<value>[^\x02\x03]*)$"
_TOKEN = r"^(?P<field>[^:]*):(?P<id>[^:]*)$"
_BLANK = "".join(chr(c) for c in range(0x21))  # what Spark trims around a number
_INT = r"^[\x00-\x20]*[+-]?[0-9]+[\x00-\x20]*$"
_NUM = (r"^[\x00-\x20]*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[iI][nN][fF]([iI][nN][iI][tT][yY])?)"
        r"[\x00-\x20]*$")
BAD_ENTRY = "a feature entry is not field\\x02id\\x03value"
BAD_TOKEN = "a token is not field:integer"

SKELETON_COLUMNS = [("sample_id", "string"), ("click", "tinyint not null"), ("conversion", "tinyint not null"),
                    ("cfi", "string")]
COMMON_COLUMNS = [("cfi", "string")]
TAIL_COLUMNS = [("bad", "string"), ("unlisted", "int"), ("line", "string"), ("source", "string"), ("pos", "bigint")]


def field_columns(fields) -> list[tuple[str, str]]:
    """(name, Spark type) of each field's column: single ``string``, else ``array<string>``
    (+ ``<name>__w array<float>`` for weighted)."""
    out = []
    for f in fields:
        out.append((f.name, "string" if f.kind == "single" else "array<string>"))
        if f.kind == "weighted":
            out.append((f.name + "__w", "array<float>"))
    return out


def schema_of(head, fields) -> str:
    return ", ".join(f"`{n}` {t}" for n, t in head + TAIL_COLUMNS + field_columns(fields))


# --------------------------------------------------------------------------- kernels


def _np(arr):
    return arr.to_numpy(zero_copy_only=False)


def elements(lists, count: int):
    """(length of each list, [element j of each list, null where shorter, for j < count],
    the last element of each list)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    flat, off = _list_parts(lists)
    n, start = np.diff(off).astype(np.int64), off[:-1].astype(np.int64)
    cols = [pc.take(flat, pa.array(np.where(n > j, start + j, 0), mask=n <= j)) for j in range(count)]
    return n, cols, pc.take(flat, pa.array(np.maximum(start + n - 1, 0), mask=n == 0))


def split_columns(lines, ncols: int):
    """(number of columns per line, [column j, null where missing]): split at the first
    ``ncols - 1`` commas, the last column keeps the rest (and is the last part whatever the count)."""
    import pyarrow.compute as pc

    n, cols, last = elements(pc.split_pattern(lines, ",", max_splits=ncols - 1), ncols - 1)
    return n, cols + [last]


def _int_strings(s, bits: int = 64):
    """(canonical decimal string or null, int array) of Spark's ``try_cast`` to an integer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.fill_null(pc.match_substring_regex(s, _INT), False)
    clean = pc.if_else(ok, pc.utf8_trim(s, _BLANK + "+"), pa.scalar(None, pa.string()))
    typ = pa.int64() if bits == 64 else pa.int32()
    try:
        num = pc.cast(clean, typ)
    except pa.ArrowInvalid:  # out of range somewhere: that value only becomes null
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        vals = [None if v is None or not lo <= int(v) <= hi else int(v) for v in clean.to_pylist()]
        num = pa.array(vals, typ)
    return pc.cast(num, pa.string()), num


def _floats(s):
    """float32 of Spark's ``try_cast(float)``, null where not a number (NaN included)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.fill_null(pc.match_substring_regex(s, _NUM), False)
    return pc.cast(pc.if_else(ok, pc.utf8_trim(s, _BLANK), pa.scalar(None, pa.string())), pa.float32())


def entries(lists, pattern: str, weighted: bool = True):
    """Flat entries of ``lists`` (a list<string> array, one list per line).

    Returns ``(row, field, id, value, ok)``: the line of each entry, its parts (id as its
    canonical decimal) and whether it is well formed (numpy bool). Without ``weighted``
    the value is 1.0 (PaddleRec tokens carry none).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    flat, off = _list_parts(lists)  # a null list: no entry
    row = np.repeat(np.arange(len(lists)), np.diff(off))
    parts = pc.extract_regex(flat, pattern)
    field, ids = parts.field("field"), _int_strings(parts.field("id"))[0]
    if weighted:
        value = _floats(parts.field("value"))
    else:
        value = pa.array(np.ones(len(row), np.float32))
    ok = _np(pc.fill_null(pc.and_(pc.and_(pc.greater(pc.utf8_length(field), 0), ids.is_valid()),
                                  value.is_valid()), False)) & ~_np(pc.fill_null(pc.is_nan(value), False))
    return row, field, ids, value, ok


def widen(nrows: int, row, field, ids, value, fields):
    """Entries -> ``{column: array}`` for ``field_columns(fields)``, ``unlisted`` (int32)
    and ``single_bad`` (reason or None per row: a single field with more than one entry).

    Entries keep their file order within a field; a single field with no entry is null, a
    list field with none is an empty list.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [f.name for f in fields]
    code = _np(pc.fill_null(pc.index_in(field, value_set=pa.array(names, pa.string())), -1)).astype(np.int64)
    unlisted = np.bincount(row[code < 0], minlength=nrows).astype(np.int32)
    order = np.argsort(code, kind="stable")  # by field, file order within one
    edges = np.searchsorted(code[order], np.arange(len(names) + 1))
    out, single_bad = {}, np.full(nrows, None, dtype=object)
    for k, f in enumerate(fields):
        take = pa.array(order[edges[k]:edges[k + 1]])
        n = np.bincount(row[order[edges[k]:edges[k + 1]]], minlength=nrows)
        vals = pc.take(ids, take)
        if f.kind == "single":
            many = (n > 1) & np.equal(single_bad, None)
            single_bad[many] = [f"field {f.name} is single but has {c} entries" for c in n[many]]
            first = np.cumsum(n) - n
            out[f.name] = pc.take(vals, pa.array(np.minimum(first, max(len(vals) - 1, 0)), mask=n == 0))
            continue
        offsets = pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))
        out[f.name] = pa.ListArray.from_arrays(offsets, vals)
        if f.kind == "weighted":
            out[f.name + "__w"] = pa.ListArray.from_arrays(offsets, pc.take(value, take).cast(pa.float32()))
    return out, unlisted, single_bad


# --------------------------------------------------------------------------- one batch


def _first_bad(*checks):
    """Per row the first reason whose mask is true: ``checks`` = (mask, reason array or str)."""
    import numpy as np

    out = np.full(len(checks[0][0]), None, dtype=object)
    for mask, why in reversed(checks):
        mask = np.asarray(mask, dtype=bool)
        out[mask] = why[mask] if isinstance(why, np.ndarray) else why
    return out


def _messages(mask, make):
    """A reason per row where ``mask`` (``make(i)`` for row i), None elsewhere: only the
    rows that need a message get one."""
    import numpy as np

    out = np.full(len(mask), None, dtype=object)
    idx = np.flatnonzero(mask)
    out[idx] = [make(int(i)) for i in idx]
    return out


def _is_empty(col):
    import pyarrow.compute as pc

    return _np(pc.fill_null(pc.equal(pc.utf8_length(col), 0), False))


def _list_checks(num_s, fl, nrows: int):
    """(entries tuple, checks on feature_num and the list) of a ``feature_num, feature_list`` pair."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    num_txt, num = _int_strings(num_s, bits=32)
    fl = pc.if_else(pc.equal(fl, ""), pa.scalar(None, pa.string()), fl)  # "" is no entry at all
    ent = entries(pc.split_pattern(fl, "\x01"), _ENTRY)
    row, ok = ent[0], ent[4]
    n_ent = np.bincount(row, minlength=nrows)
    any_bad = np.bincount(row[~ok], minlength=nrows) > 0
    differ = _np(pc.fill_null(num, -1)).astype(np.int64) != n_ent
    size_msg = _messages(differ, lambda i: f"feature_num {num_txt[i].as_py()} but {n_ent[i]} entries")
    checks = [(~_np(num.is_valid()), "feature_num is not an integer"), (any_bad, BAD_ENTRY), (differ, size_msg)]
    return ent, checks


def _finish(head: dict, ent, checks, fields, batch, keep_line):
    """The output batch: ``head`` columns, bad, unlisted, line (kept where ``keep_line`` or
    bad), source, pos, then the field columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    nrows = batch.num_rows
    cols, unlisted, single_bad = widen(nrows, ent[0], ent[1], ent[2], ent[3], fields)
    bad = _first_bad(*checks, (np.not_equal(single_bad, None), single_bad))
    has_bad = np.not_equal(bad, None)
    line = pc.if_else(pa.array(has_bad | keep_line), batch.column("line"), pa.scalar(None, pa.string()))
    out = {**head, "bad": pa.array(bad.tolist(), pa.string()), "unlisted": pa.array(unlisted, pa.int32()),
           "line": line, "source": batch.column("source"), "pos": batch.column("pos"), **cols}
    return pa.RecordBatch.from_pydict(out)


def _label(col):
    """(tinyint 1 where "1" else 0, is it 0/1)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    one = _np(pc.fill_null(pc.equal(col, "1"), False))
    return pa.array(one.astype(np.int8)), one | _np(pc.fill_null(pc.equal(col, "0"), False))


def parse_skeleton_batch(batch, fields):
    """``line, source, pos`` of sample_skeleton lines -> SKELETON_COLUMNS + TAIL_COLUMNS + fields."""
    ncol, (sid, click_s, conv_s, cfi, num_s, fl) = split_columns(batch.column("line"), 6)
    ent, list_checks = _list_checks(num_s, fl, batch.num_rows)
    click, click_ok = _label(click_s)
    conv, conv_ok = _label(conv_s)
    checks = [(ncol != 6, _messages(ncol != 6, lambda i: f"expected 6 comma-separated columns, got {ncol[i]}")),
              (_is_empty(sid), "empty sample_id"), (~click_ok, "click is not 0/1"),
              (~conv_ok, "conversion is not 0/1"), (_is_empty(cfi), "empty common_feature_index")] + list_checks
    cwc = (click.to_numpy() == 0) & (conv.to_numpy() == 1)
    head = {"sample_id": sid, "click": click, "conversion": conv, "cfi": cfi}
    return _finish(head, ent, checks, fields, batch, cwc)


def parse_common_batch(batch, fields):
    """``line, source, pos`` of common_features lines -> COMMON_COLUMNS + TAIL_COLUMNS + fields."""
    import numpy as np

    ncol, (cfi, num_s, fl) = split_columns(batch.column("line"), 3)
    ent, list_checks = _list_checks(num_s, fl, batch.num_rows)
    checks = [(ncol != 3, _messages(ncol != 3, lambda i: f"expected 3 comma-separated columns, got {ncol[i]}")),
              (_is_empty(cfi), "empty common_feature_index")] + list_checks
    return _finish({"cfi": cfi}, ent, checks, fields, batch, np.zeros(batch.num_rows, bool))


def parse_paddlerec_batch(batch, fields):
    """PaddleRec lines ``sample_id,click,conversion,field:feat,...`` -> SKELETON_COLUMNS (cfi
    null) + TAIL_COLUMNS + fields; every token from the 4th column on is an entry."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = pc.split_pattern(batch.column("line"), ",")
    ncol, (sid, click_s, conv_s), _ = elements(parts, 3)
    ent = entries(pc.list_slice(parts, 3), _TOKEN, weighted=False)
    click, click_ok = _label(click_s)
    conv, conv_ok = _label(conv_s)
    any_bad = np.bincount(ent[0][~ent[4]], minlength=batch.num_rows) > 0
    checks = [(ncol < 3, "expected sample_id,click,conversion,field:feat,..."), (_is_empty(sid), "empty sample_id"),
              (~click_ok, "click is not 0/1"), (~conv_ok, "conversion is not 0/1"), (any_bad, BAD_TOKEN)]
    cwc = (click.to_numpy() == 0) & (conv.to_numpy() == 1)
    head = {"sample_id": sid, "click": click, "conversion": conv,
            "cfi": pa.nulls(batch.num_rows, pa.string())}
    return _finish(head, ent, checks, fields, batch, cwc)


# --------------------------------------------------------------------------- Spark

SLICE_BYTES = 32 << 20  # a batch of 10,000 common lines is ~110 MB; its parse holds a few times that


def slices(batch, max_bytes: int):
    """``batch`` cut into consecutive slices of at most ``max_bytes`` of line text (a longer
    line is a slice of its own), so a worker's memory does not grow with the batch."""
    import numpy as np
    import pyarrow.compute as pc

    ends = np.cumsum(_np(pc.fill_null(pc.binary_length(batch.column("line")), 0)).astype(np.int64))
    start = 0
    while start < batch.num_rows:
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + max_bytes, side="right")))
        yield batch.slice(start, stop - start)
        start = stop


def parse(lines, kind: str, fields):
    """``lines`` (line, source, pos) -> the parsed frame, one Arrow pass per batch.

    ``kind``: ``skeleton``, ``common`` or ``paddlerec``.
    """
    fn, head = {"skeleton": (parse_skeleton_batch, SKELETON_COLUMNS), "common": (parse_common_batch, COMMON_COLUMNS),
                "paddlerec": (parse_paddlerec_batch, SKELETON_COLUMNS)}[kind]
    fields = list(fields)

    def run(batches):
        for b in batches:
            for piece in slices(b, SLICE_BYTES):
                yield fn(piece, fields)

    return lines.select("line", "source", "pos").mapInArrow(run, schema_of(head, fields))
