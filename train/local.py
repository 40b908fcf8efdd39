"""Training on one process: a DATA dir in, a saved model (+ metrics.json) out.

Programmatic use (what ``esmm train`` does)::

    from train.local import train_on_data
    metrics = train_on_data("DATA", "MODEL", "esmm", epochs=1)

or, with the splits already in memory (what ``esmm experiment`` does)::

    from train.data import load_manifest, manifest_fields, load_split
    from train.local import train_model
    m = load_manifest("DATA"); fields = manifest_fields(m)
    train = load_split("DATA", "train", fields, m)
    model, result = train_model("esmm", train, EsmmConfig(), TrainConfig(epochs=1))

A MODEL dir holds ``model.pt`` (state dict), ``config.json`` (model name, fields and the
resolved configs) and ``metrics.json``; ``load_model(MODEL)`` rebuilds it. ``esmm train``
also makes MODEL a self-contained bundle (train/bundle.py: safetensors weights, the
vocabularies, the field spec, lineage), which ``--init-from`` and the Scorer read.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch

from train.baselines import NEEDS_CTR_MODEL, OWN_CTR, build_model
from train.config import resolve
from train.data import Columns, load_manifest, load_split, manifest_fields
from train.device import prepare_towers, to_device
from train.embedding import FieldConfig
from train.errors import InputError
from train.evaluate import predict, read_truth, score, truth_dir
from train.loop import TrainConfig, fit, view_loss
from train.metrics import jsonable
from train.model import EmbeddingFactory, EsmmConfig


def dataset_view(model, cols: Columns, seed: int, epoch: int, batch_size: int = 32768,
                 weigh_batches: Callable[[Columns], Iterable] | None = None) -> Columns:
    """``model.train_view`` applied to a whole split: the rows it trains on (and weights),
    drawn afresh per epoch (AMAN's sampled negatives), so batches keep their full size.
    ``weigh_batches(view)``: the batches to weigh the view in (a Ray rank's, in lockstep
    with the other ranks' lookups, blank rows after its own; those weights are dropped)."""
    g = torch.Generator().manual_seed((int(seed) * 7919 + int(epoch)) * 104729 + 17)
    rows = model.select_rows(cols.click, cols.conversion, g)
    view = cols if rows is None else cols.take(rows)
    if model.weighs_rows:
        device = next(model.parameters()).device  # a Ray worker's model may be on its GPU
        batches = weigh_batches(view) if weigh_batches else view.batches(batch_size)
        w = [model.row_weight(to_device(b, device).features).cpu() for b in batches]
        w = torch.cat(w)[:len(view)] if w else torch.zeros(0)
        view = Columns(view.fields, view.columns, view.click, view.conversion, view.sample_id, w)
    return view


def train_model(name: str, train: Columns, model_cfg: EsmmConfig | None = None,
                train_cfg: TrainConfig | None = None, val: Columns | None = None,
                ctr_model=None, embedding_factory: EmbeddingFactory | None = None,
                checkpoint_path: str | None = None, resume: bool = False, progress: bool | None = None,
                init_from: str | None = None):
    """Build model ``name`` and fit it on ``train`` (early stopping on ``val``).

    Args:
        name (str): a key of train.baselines.MODELS.
        train (Columns): training rows; when ``val`` is None, ``train_cfg.val_fraction``
            of them is held out for validation.
        ctr_model: the independent CTR model (UNBIAS's 1/pCTR weights).
        checkpoint_path (str | None): where to write the training state at every epoch end.
        resume (bool): continue from ``checkpoint_path`` when it exists.
        init_from (str | None): a model bundle to warm-start from (train/warm_start.py).

    Returns:
        (model, fit result dict).
    """
    model_cfg, train_cfg = model_cfg or EsmmConfig(), train_cfg or TrainConfig()
    if val is None and train_cfg.val_fraction > 0:
        train, val = train.split_off(train_cfg.val_fraction)
    torch.manual_seed(train_cfg.seed)
    model = build_model(name, train.fields, model_cfg, embedding_factory)
    prepare_towers(model, model_cfg.tower_precision, "cpu")  # auto | fp32 | bf16; fuses shared towers
    if name in NEEDS_CTR_MODEL:
        if ctr_model is None:  # standalone `esmm train --model unbias`: train its CTR network first
            ctr_model, _ = train_model("ctr", train, model_cfg, train_cfg, val, None, embedding_factory,
                                       progress=progress)
        model.set_ctr_model(ctr_model)
    warm = None
    if init_from:
        from train.warm_start import init_from as warm_start

        warm = warm_start(model, init_from)
    views: dict[int, Columns] = {}

    def train_batches(epoch: int, start_step: int):
        if epoch not in views:
            views.clear()
            views[epoch] = dataset_view(model, train, train_cfg.seed, epoch)
        return views[epoch].batches(train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                                    epoch=epoch, start_step=start_step)

    def steps(epoch: int = 0) -> int:
        return -(-len(views[epoch]) // train_cfg.batch_size) if epoch in views else None

    eval_fn = (lambda m: view_loss(m, val.batches(train_cfg.eval_batch_size), train_cfg.seed)) if val is not None and len(val) else None
    start_state, cb = None, None
    if checkpoint_path:
        if resume and os.path.exists(checkpoint_path):
            start_state = torch.load(checkpoint_path, weights_only=False)

        def cb(state: dict) -> None:
            tmp = f"{checkpoint_path}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, checkpoint_path)  # a crash leaves the previous checkpoint whole
    # the bar's total is known once epoch 0's view exists
    first = train_batches(start_state["epoch"] if start_state else 0, 0)
    if model_cfg.init_bias and start_state is None and warm is None:  # a warm start keeps its biases
        v = next(iter(views.values()))
        model.init_output_bias(v.click, v.conversion, v.weight)
    del first
    result = fit(model, train_batches, eval_fn, train_cfg, checkpoint_cb=cb, start_state=start_state,
                 progress=progress, steps_per_epoch=steps(start_state["epoch"] if start_state else 0),
                 apply_view=False)
    result.pop("optimizers", None)
    if warm is not None:
        result["init_from"] = warm
    model.eval()
    return model, result


# ---------------------------------------------------------------- saving

def save_model(model, out_dir: str | os.PathLike, name: str, model_cfg: EsmmConfig, train_cfg: TrainConfig,
               extra: dict | None = None) -> None:
    write_model_dir(out_dir, name, model.fields, model.state_dict(), model_cfg, train_cfg, extra)


def write_model_dir(out_dir: str | os.PathLike, name: str, fields: list[FieldConfig], state: dict,
                    model_cfg: EsmmConfig, train_cfg: TrainConfig, extra: dict | None = None) -> None:
    """MODEL/model.pt (``state``: the whole state dict, or a Ray run's dense weights only,
    its tables then being MODEL's bundle files) and MODEL/config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "model.pt")
    cfg = {"model": name, "fields": [asdict(f) for f in fields],
           "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(), **(extra or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_model(model_dir: str | os.PathLike, embedding_factory: EmbeddingFactory | None = None):
    """(model, config dict) from a MODEL dir written by save_model; the embedding tables
    of a Ray-trained MODEL are merged into one process from its bundle's shard files."""
    from train.bundle import is_bundle, is_table, merged_table, read_bundle

    d = Path(model_dir)
    if not (d / "config.json").is_file() or not (d / "model.pt").is_file():
        raise InputError(f"{d}: not a model dir (needs config.json and model.pt from `esmm train`)")
    cfg = json.loads((d / "config.json").read_text())
    fields = [FieldConfig(**f) for f in cfg["fields"]]
    model = build_model(cfg["model"], fields, EsmmConfig.from_dict(cfg["model_cfg"]), embedding_factory)
    state = torch.load(d / "model.pt", weights_only=True)
    missing = [k for k in model.state_dict() if is_table(k) and k not in state]
    if missing:
        if not is_bundle(d):
            raise InputError(f"{d}/model.pt: no embedding tables {missing} and no bundle beside it")
        b = read_bundle(d)
        state.update({k: merged_table(b, k) for k in missing})
    model.load_state_dict(state)
    model.eval()
    return model, cfg


def check_fields(model_fields: list[FieldConfig], data_fields: list[FieldConfig], where: str) -> None:
    """The data's fields are the model's, each vocabulary the same or grown from it (ids
    beyond the model's table then count as out of vocabulary: :func:`as_model_ids`)."""
    a = [(f.name, f.kind) for f in model_fields]
    b = [(f.name, f.kind) for f in data_fields]
    grown_ok = all(d.vocab_size >= m.vocab_size for m, d in zip(model_fields, data_fields))
    if a != b or not grown_ok:
        raise InputError(f"{where}: the data's fields (name, kind, vocab_size) differ from the model's: "
                         f"{[(f.name, f.kind, f.vocab_size) for f in data_fields]} vs "
                         f"{[(f.name, f.kind, f.vocab_size) for f in model_fields]}")


def as_model_ids(cols: Columns, model_fields: list[FieldConfig]) -> Columns:
    """``cols`` with every id beyond the model's table set to 0 (out of vocabulary): how
    yesterday's model reads today's shards, whose vocabularies grew after its own."""
    out = []
    for c, f in zip(cols.columns, model_fields):
        v = c.values
        if v.numel() and int(v.max()) >= f.vocab_size:
            v = torch.where(v < f.vocab_size, v, torch.zeros_like(v))
        out.append(type(c)(v, c.offsets, c.weights))
    return Columns(list(model_fields), out, cols.click, cols.conversion, cols.sample_id, cols.weight)


def load_split_for(model, data_dir: str, split: str, manifest: dict) -> Columns:
    """DATA's ``split`` as ``model`` reads it: the data's ids, new ones mapped to 0."""
    data_fields = manifest_fields(manifest, model.cfg.pooling)
    check_fields(model.fields, data_fields, f"{data_dir}/manifest.json")
    return as_model_ids(load_split(data_dir, split, data_fields, manifest), model.fields)


# ---------------------------------------------------------------- the `esmm train` / `esmm evaluate` bodies

def evaluate_dir(model, data_dir: str, split: str = "test", ctr_model=None, manifest: dict | None = None,
                 cols: Columns | None = None) -> dict:
    """metrics.json content for ``model`` on DATA's ``split`` (with entire-space truth if any)."""
    manifest = manifest or load_manifest(data_dir)
    cols = cols or load_split_for(model, data_dir, split, manifest)
    preds = predict(model, cols)
    ctr_preds = None
    if ctr_model is not None and not ("p_ctr" in preds and model.name in OWN_CTR):
        ctr_preds = predict(ctr_model, cols)["p_ctr"]
    return evaluate_preds(model.name, preds, cols, ctr_preds, manifest, data_dir, split)


def evaluate_preds(name: str, preds: dict, cols: Columns, ctr_preds, manifest: dict, data_dir: str,
                   split: str = "test") -> dict:
    """metrics.json content from model ``name``'s predictions ``preds`` of ``cols`` (and the
    independent CTR network's pCTR ``ctr_preds``, if any, for the CTCVR task)."""
    if "p_ctr" in preds and name in OWN_CTR:
        ctr_preds = None  # its own pCTR
    elif ctr_preds is None:
        ctr_preds = preds.get("p_ctr")
    t = truth_dir(manifest)
    truth = read_truth(t, cols.sample_id) if t and split == "test" and os.path.exists(t) else None
    m = score(preds, cols, ctr_preds, truth)
    m.update(model=name, split=split, data=str(data_dir))
    return m


def train_on_data(data_dir: str, out_dir: str, name: str, config_file: str | None = None,
                  sets: list[str] = (), progress: bool | None = None, ctr_model_dir: str | None = None,
                  resume: bool = False, embedding_factory: EmbeddingFactory | None = None,
                  init_from: str | None = None, **overrides) -> dict:
    """`esmm train`: fit ``name`` on DATA's train split, evaluate on test, write MODEL/
    (``init_from``: a bundle to warm-start from)."""
    model_cfg, train_cfg = resolve(config_file, sets, **overrides)
    manifest = load_manifest(data_dir)
    fields = manifest_fields(manifest, model_cfg.pooling)
    train = load_split(data_dir, "train", fields, manifest)
    ctr_model = load_model(ctr_model_dir)[0] if ctr_model_dir else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model, result = train_model(name, train, model_cfg, train_cfg, ctr_model=ctr_model,
                                embedding_factory=embedding_factory, progress=progress,
                                checkpoint_path=str(Path(out_dir) / "checkpoint.pt"), resume=resume,
                                init_from=init_from)
    save_model(model, out_dir, name, model_cfg, train_cfg,
               {"data": str(Path(data_dir).resolve()), **({"init_from": str(Path(init_from).resolve())} if init_from else {})})
    Path(out_dir, "checkpoint.pt").unlink(missing_ok=True)  # finished: the model is in model.pt
    if name in NEEDS_CTR_MODEL:
        ctr_model = model.ctr_model
    metrics = evaluate_dir(model, data_dir, "test", ctr_model, manifest)
    metrics["training"] = result
    (Path(out_dir) / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2) + "\n")
    return metrics
