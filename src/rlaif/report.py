"""The evaluation report: ``report.md`` with Elo tables, PNG plots and side-by-side transcripts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlaif.metrics import read_metrics
from rlaif.store import atomic_write_text, ensure_dir


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_elo(tables: dict[str, dict[str, Any]], out: Path) -> Path:
    """One panel per judged attribute: Elo by checkpoint with its 95 % interval."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.6), squeeze=False)
    for ax, (title, t) in zip(axes[0], tables.items(), strict=True):
        x = list(range(len(t["names"])))
        err = [
            [e - lo for e, lo in zip(t["elo"], t["low"], strict=True)],
            [hi - e for e, hi in zip(t["elo"], t["high"], strict=True)],
        ]
        ax.errorbar(x, t["elo"], yerr=err, fmt="o-", capsize=4)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, t["names"], rotation=20)
        ax.set_title(f"{title} Elo (95 % bootstrap)")
        ax.set_ylabel("Elo vs. first checkpoint")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(
    metrics: Mapping[str, Sequence[dict[str, Any]]], keys: Sequence[str], out: Path
) -> Path:
    """Training curves: one panel per key, one line per stage that logged it."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for stage, rows in metrics.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=stage)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_calibration(probs: Sequence[float], out: Path) -> Path:
    plt = _plt()
    from rlaif.feedback import calibration_bins

    rows = calibration_bins(probs, bins=5)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.plot([0.5, 1], [0.5, 1], "--", color="grey", lw=0.8, label="calibrated")
    ax.set_ylim(-0.05, 1.05)
    if rows:
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="feedback model")
    ax.set_xlabel("confidence (max P)")
    ax.set_ylabel("agreement with humans")
    ax.set_title("AI labeller calibration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def elo_markdown(title: str, t: dict[str, Any], extra: dict[str, dict[str, Any]]) -> list[str]:
    cols = list(next(iter(extra.values())).keys()) if extra else []
    lines = [f"### {title}", "", "| checkpoint | Elo | 95 % interval | comparisons |"]
    lines[-1] += "".join(f" {c} |" for c in cols)
    lines.append("|---|---:|---|---:|" + "---:|" * len(cols))
    for k, name in enumerate(t["names"]):
        row = f"| {name} | {_fmt(t['elo'][k])} | [{_fmt(t['low'][k])}, {_fmt(t['high'][k])}]"
        row += f" | {t['games'][k]} |"
        row += "".join(f" {_fmt(extra.get(name, {}).get(c), 3)} |" for c in cols)
        lines.append(row)
    return [*lines, ""]


def _quote(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return (text[:limit] + " …") if len(text) > limit else text


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write run_dir/report.md (+ plots/) from the evaluation ``results``; return its path."""
    run_dir = Path(run_dir)
    plots = ensure_dir(run_dir / "plots")
    md: list[str] = ["# rlaif evaluation report", ""]
    md += [
        f"Run directory: `{run_dir}`. Judge: `{results.get('judge', '?')}`. "
        f"Held-out prompts: {results.get('n_harmful', 0)} red-team, "
        f"{results.get('n_helpful', 0)} helpfulness (none used in training; ids in "
        "`eval/split.json`).",
        "",
        "Elo is relative to the first checkpoint; +100 Elo means winning about 64 % of "
        "comparisons against it. Each comparison is judged in both orders and averaged.",
        "",
    ]
    tables: dict[str, dict[str, Any]] = results.get("elo", {})
    per_model = results.get("per_model", {})
    for title, t in tables.items():
        md += elo_markdown(title.capitalize(), t, per_model if title == "harmlessness" else {})
    if tables:
        plot_elo(tables, plots / "elo.png")
        md += ["![Elo by checkpoint](plots/elo.png)", ""]
    if results.get("notes"):
        md += ["## How to read these numbers", "", *results["notes"], ""]
    md += _trust_section(results, plots)
    md += _training_section(run_dir, plots)
    md += _transcripts(results.get("transcripts", []))
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def _trust_section(results: dict[str, Any], plots: Path) -> list[str]:
    md = ["## How far to trust the judges", ""]
    lab = results.get("labeler")
    if lab:
        md += [
            f"Feedback model agreement with human harmlessness labels on {lab.get('n')} held-out "
            "hh-rlhf pairs:",
            "",
            "| measure | value |",
            "|---|---:|",
        ]
        md += [f"| {k} | {_fmt(v, 3)} |" for k, v in lab.items() if k not in ("n", "probs")]
        md.append("")
        if lab.get("probs"):
            plot_calibration(lab["probs"], plots / "calibration.png")
            md += ["![labeller calibration](plots/calibration.png)", ""]
    pm = results.get("pm_accuracy", {})
    if pm:
        md += [
            "Preference-model accuracy:",
            "",
            "| file | pairs | accuracy | ECE |",
            "|---|---:|---:|---:|",
        ]
        md += [
            f"| {name} | {r.get('n')} | {_fmt(r.get('accuracy'), 3)} | {_fmt(r.get('ece'), 3)} |"
            for name, r in pm.items()
        ]
        md.append("")
    if len(md) == 2:
        md += ["(no labeller or PM measurements were available for this run)", ""]
    return md


def _training_section(run_dir: Path, plots: Path) -> list[str]:
    md: list[str] = []
    logs = {
        s: read_metrics(run_dir / "metrics" / f"{s}.jsonl") for s in ("sft", "reward", "ppo", "dpo")
    }
    logs = {s: rows for s, rows in logs.items() if rows}
    if not logs:
        return md
    md += ["## Training curves", ""]
    if "ppo" in logs:
        keys = [k for k in ("reward", "kl", "beta", "entropy") if any(k in r for r in logs["ppo"])]
        if keys:
            plot_curves({"ppo": logs["ppo"]}, keys, plots / "ppo.png")
            md += ["![PPO reward and KL](plots/ppo.png)", ""]
    losses = {s: rows for s, rows in logs.items() if s != "ppo" and any("loss" in r for r in rows)}
    if losses:
        plot_curves(losses, ["loss"], plots / "losses.png")
        md += ["![training losses](plots/losses.png)", ""]
    return md


def _transcripts(items: Sequence[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    md = ["## Side by side", ""]
    for item in items:
        md += [f"**{item['kind']} prompt:** {_quote(item['prompt'], 400)}", ""]
        md += [f"- *{name}*: {_quote(text)}" for name, text in item["answers"].items()]
        md.append("")
    return md
