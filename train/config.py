"""Layered configuration: dataclass defaults, then a config file, then ``--set key=value``.

Keys are flat: each names a field of EsmmConfig (model) or TrainConfig (loop). An
unknown key or a value that does not parse as the field's type is an InputError.
The resolved dict is saved with every model (``config.json``).
"""
from __future__ import annotations

import json
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Iterable

from train.errors import InputError
from train.loop import TrainConfig
from train.model import EsmmConfig

MODEL_KEYS = {f.name: f for f in dc_fields(EsmmConfig)}
TRAIN_KEYS = {f.name: f for f in dc_fields(TrainConfig)}


def _parse(key: str, value, default):
    """Coerce ``value`` (str from the command line, or JSON/YAML scalar) to default's type."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if isinstance(default, tuple):
            items = value.replace("(", "").replace(")", "").split(",") if isinstance(value, str) else list(value)
            t = type(default[0]) if default else float
            return tuple(t(str(x).strip()) for x in items if str(x).strip())
        if default is None:  # Optional[float] fields
            return None if value in (None, "None", "none", "") else float(value)
        if isinstance(default, int):
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        return type(default)(value)
    except (TypeError, ValueError):
        raise InputError(f"config key {key!r}: cannot parse {value!r} as {type(default).__name__}") from None


def load_file(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise InputError(f"{path}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'} ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: config must be a mapping of key: value")
    # a saved config.json nests {"model_cfg": {...}, "train_cfg": {...}}: accept it too
    flat = {}
    for k, v in d.items():
        if k in ("model_cfg", "train_cfg") and isinstance(v, dict):
            flat.update(v)
        elif k not in ("model", "fields", "data"):
            flat[k] = v
    return flat


def parse_sets(sets: Iterable[str]) -> dict:
    out = {}
    for s in sets or ():
        if "=" not in s:
            raise InputError(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve(config_file: str | None = None, sets: Iterable[str] = (), **overrides) -> tuple[EsmmConfig, TrainConfig]:
    """(EsmmConfig, TrainConfig) from defaults < file < overrides (explicit flags) < --set."""
    layered = {**load_file(config_file), **{k: v for k, v in overrides.items() if v is not None},
               **parse_sets(sets)}
    m_defaults, t_defaults = EsmmConfig(), TrainConfig()
    m, t = {}, {}
    for k, v in layered.items():
        if k in MODEL_KEYS:
            m[k] = _parse(k, v, getattr(m_defaults, k))
        elif k in TRAIN_KEYS:
            t[k] = _parse(k, v, getattr(t_defaults, k))
        else:
            raise InputError(f"unknown config key {k!r} (known: {', '.join(sorted({**MODEL_KEYS, **TRAIN_KEYS}))})")
    return EsmmConfig.from_dict(m), TrainConfig.from_dict(t)
