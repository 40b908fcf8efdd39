"""report.json -> report.md (laid out like the paper's Table 2) and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from train.metrics import jsonable

NAMES = {"base": "BASE", "aman": "AMAN", "oversampling": "OVERSAMPLING", "unbias": "UNBIAS",
         "unbias-ips": "UNBIAS-IPS", "division": "DIVISION", "esmm-ns": "ESMM-NS", "esmm": "ESMM",
         "escm2-ips": "ESCM²-IPS", "escm2-dr": "ESCM²-DR", "dcmt": "DCMT", "ctr": "CTR (independent)"}
# ctcvr_auc: every model's pCVR x the independent CTR network's pCTR (the paper's CTCVR
# task); own_ctcvr_auc: the model's own pCTR x pCVR (what a deployed ESMM serves)
COLUMNS = [("cvr_auc", "CVR AUC (clicked)"), ("ctcvr_auc", "CTCVR AUC (all)"),
           ("entire_cvr_auc", "CVR AUC (entire space)"), ("own_ctcvr_auc", "CTCVR AUC, own pCTR x pCVR")]


def _pm(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def _gain(s: dict | None, base: dict | None) -> str:
    if not s or not base:
        return "-"
    return f"{100 * (s['mean'] - base['mean']):+.2f}"


def table2(report: dict) -> str:
    """Markdown: per model mean ± std (AUC in %) and the gain over BASE in points."""
    summary = report["summary"]
    cols = [c for c in COLUMNS if any(c[0] in s for s in summary.values())]
    head = ("| Model | " + " | ".join(f"{title} | Gain" for _, title in cols)
            + " | pCVR calib. ratio (entire) | pCVR ECE (entire) |")
    sep = "|---|" + "---:|---:|" * len(cols) + "---:|---:|"
    rows = [head, sep]
    base = summary.get("base", {})
    for name in report["models"]:
        s = summary.get(name, {})
        cal = s.get("entire_cvr_calibration") or s.get("cvr_calibration")
        cal_txt = f"{cal['mean']:.2f} ± {cal['std']:.2f}" if cal and math.isfinite(cal["mean"]) else "-"
        e = s.get("entire_cvr_ece") or s.get("cvr_ece")
        ece_txt = f"{e['mean']:.4f} ± {e['std']:.4f}" if e and math.isfinite(e["mean"]) else "-"
        cells = " | ".join(f"{_pm(s.get(k))} | {_gain(s.get(k), base.get(k))}" for k, _ in cols)
        rows.append(f"| {NAMES.get(name, name)} | {cells} | {cal_txt} | {ece_txt} |")
    return "\n".join(rows)


def table1(report: dict) -> str:
    rows = ["| split | days | impressions | clicks | conversions | CTR | CVR (clicked) |", "|---|---|---:|---:|---:|---:|---:|"]
    for split, d in report.get("dataset", {}).items():
        imp, clk, cv = d.get("impressions", 0), d.get("clicks", 0), d.get("conversions", 0)
        days = d.get("days") or []
        span = f"{days[0]} .. {days[-1]}" if days else "-"
        rows.append(f"| {split} | {span} | {imp} | {clk} | {cv} | {clk / imp if imp else 0:.4f} | {cv / clk if clk else 0:.4f} |")
    return "\n".join(rows)


def markdown(report: dict) -> str:
    n = len(report["seeds"])
    lines = [
        "# ESMM experiment", "",
        f"Data: `{report['data']}`; {n} seed(s) {report['seeds']}; AUC in %, mean ± std over seeds; "
        "Gain = points over BASE. CTCVR as in the paper (section 4.2): every model's pCTCVR = its "
        "pCVR x the pCTR of one independently trained CTR network (BASE's structure), ESMM and ESMM-NS "
        "included; 'own pCTR x pCVR' is the model's own product (what a deployed ESMM serves)."
        + (" Entire space = all test impressions scored against the simulator's counterfactual "
           "`would_convert`; calibration = mean pCVR / observed rate there (1 is calibrated)."
           if report.get("entire_space") else ""),
        "", "## Data (Table 1)", "", table1(report), "", "## Results (Table 2)", "", table2(report), "",
    ]
    ctr = report["summary"].get("ctr", {}).get("ctr_auc")
    if ctr:
        lines += [f"Independent CTR network: CTR AUC {_pm(ctr)}.", ""]
    if report.get("checks"):
        lines += ["ESMM vs BASE (difference of means vs the larger std over seeds):", ""]
        for metric, c in report["checks"].items():
            verdict = "beats" if c["beats"] else "does NOT beat"
            lines.append(f"- {metric}: {100 * c['esmm_minus_base']:+.2f} points, spread {100 * c['spread']:.2f}: "
                         f"ESMM {verdict} BASE")
        lines.append("")
    for name, p in (report.get("picked") or {}).items():
        grid = ", ".join(f"{v}: {100 * a:.2f}" if a is not None and math.isfinite(a) else f"{v}: -"
                         for v, a in p["validation_cvr_auc"].items())
        lines.append(f"{NAMES.get(name, name)}: {p['knob']} = {p['picked']} picked by validation CVR AUC ({grid}).")
    if report.get("picked"):
        lines.append("")
    lines += [f"Elapsed {report.get('elapsed_s', 0):.0f} s. Plots: `auc.png`, `calibration.png`, "
              "`reliability-MODEL.png` (one per model).", ""]
    return "\n".join(lines)


def plot_auc(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, models = report["summary"], report["models"]
    cols = [c for c in COLUMNS if any(c[0] in summary.get(m, {}) for m in models)]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], cols):
        names = [m for m in models if key in summary.get(m, {})]
        means = [100 * summary[m][key]["mean"] for m in names]
        stds = [100 * summary[m][key]["std"] for m in names]
        colors = ["tab:red" if m == "esmm" else "tab:orange" if m == "esmm-ns" else "tab:gray" for m in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
        for i, m in enumerate(names):  # every seed's value on its bar
            vals = [100 * v for v in summary[m][key]["values"]]
            ax.plot([i] * len(vals), vals, "k.", ms=3)
        ax.set_xticks(range(len(names)), [NAMES.get(m, m) for m in names], rotation=45, ha="right", fontsize=8)
        lo = min(m - s for m, s in zip(means, stds)) if means else 50
        hi = max(m + s for m, s in zip(means, stds)) if means else 100
        ax.set_ylim(max(0, lo - 0.15 * (hi - lo + 1)), hi + 0.15 * (hi - lo + 1))
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("AUC (%)")
    fig.suptitle(f"mean ± std over {len(report['seeds'])} seed(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cvr_calibration", "pCVR vs conversion (clicked test)")]
    if report.get("entire_space"):
        panels.append(("entire_cvr_calibration", "pCVR vs would_convert (entire test space)"))
    panels.append(("ctcvr_calibration", "pCTCVR vs click & conversion (all test)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        top = 0.0
        for name in report["models"]:
            runs = report["per_seed"].get(name) or []
            curve = (runs[0].get(key) or {}).get("curve") if runs else None
            if not curve:
                continue
            x, y = [c["pred"] for c in curve], [c["observed"] for c in curve]
            top = max(top, max(x), max(y))
            ax.plot(x, y, "o-", ms=3, lw=1.2 if name != "esmm" else 2.2, label=NAMES.get(name, name))
        ax.plot([0, top or 1], [0, top or 1], "k--", lw=0.8)
        ax.set_xlabel("mean prediction (equal-count bins)")
        ax.set_ylabel("observed rate")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"reliability curves, seed {report['seeds'][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(report: dict, name: str, path: Path) -> None:
    """One model's reliability curves (first seed): pCVR on clicked rows, pCVR on the
    entire space (simulated data), pCTCVR; each panel titled with its ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = (report["per_seed"].get(name) or [{}])[0]
    panels = [(k, t) for k, t in (("cvr_calibration", "pCVR, clicked"),
                                  ("entire_cvr_calibration", "pCVR, entire space (would_convert)"),
                                  ("ctcvr_calibration", "pCTCVR (paper's)")) if (run.get(k) or {}).get("curve")]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        c = run[key]
        x, y = [b["pred"] for b in c["curve"]], [b["observed"] for b in c["curve"]]
        top = max(max(x), max(y)) or 1.0
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.plot(x, y, "o-", ms=3)
        ece = c.get("ece")
        ax.set_title(f"{title}\nECE {ece:.4f}, ratio {c['ratio']:.2f}" if ece is not None and c.get("ratio")
                     else title, fontsize=8)
        ax.set_xlabel("mean prediction (equal-count bins)", fontsize=8)
        ax.set_ylabel("observed rate", fontsize=8)
    fig.suptitle(f"{NAMES.get(name, name)}: reliability, seed {report['seeds'][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot_auc(report, out / "auc.png")
    plot_calibration(report, out / "calibration.png")
    for name in report["models"]:
        plot_reliability(report, name, out / f"reliability-{name}.png")
