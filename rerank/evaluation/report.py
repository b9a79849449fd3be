"""Reports of an evaluation: a readable table for the terminal and an NDCG@10 bar chart (matplotlib)."""

from __future__ import annotations

import logging
from pathlib import Path

from indexing.errors import ConfigError, MissingDependencyError
from rerank.evaluation.harness import EvalReport

log = logging.getLogger(__name__)

COLUMNS = ("ndcg@10", "mrr@10", "recall@100", "judged@10")


def format_table(report: EvalReport) -> str:
    """A fixed-width table: one row per system (best NDCG@10 first), skipped systems with their reason."""
    head = f"{report.dataset} | mode {report.mode} | split {report.split} | {report.queries} queries | gain {report.gain}"
    name_w = max([len("system")] + [len(n) for n in list(report.systems) + list(report.skipped)])
    lines = [head, "", f"{'system':<{name_w}}  " + "  ".join(f"{c:>10}" for c in COLUMNS) + f"  {'seconds':>8}"]
    lines.append("-" * len(lines[-1]))
    rows = sorted(report.systems.values(), key=lambda r: (-r.metrics.get("ndcg@10", 0.0), r.name))
    for r in rows:
        cells = "  ".join(f"{r.metrics.get(c, float('nan')):>10.4f}" for c in COLUMNS)
        lines.append(f"{r.name:<{name_w}}  {cells}  {r.seconds:>8.1f}")
    for n, why in report.skipped.items():
        lines.append(f"{n:<{name_w}}  {'n/a':>10}  ({why})")
    for sub, meta in (report.info.get("subsets") or {}).items():
        lines.append("")
        lines.append(f"subset {sub!r} ({meta['queries']} queries matching /{meta['pattern']}/), NDCG@10:")
        for r in sorted(rows, key=lambda r: (-r.subsets.get(sub, {}).get("ndcg@10", 0.0), r.name)):
            if sub in r.subsets:
                lines.append(f"  {r.name:<{name_w}}  {r.subsets[sub]['ndcg@10']:>10.4f}")
    notes = [(r.name, r.note) for r in rows if r.note]
    if notes:
        lines.append("")
        lines.extend(f"note {n}: {t}" for n, t in notes)
    if report.mode == "rerank":
        lines.append("rerank mode: every system reorders the judged products of each query (judged@10 and recall@100 reflect the pool size)")
    return "\n".join(lines)


def plot_ndcg(report: EvalReport, path: str | Path) -> Path:
    """Horizontal bar chart of NDCG@10 per system (best on top), saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - installed with the project
        raise MissingDependencyError("--plot needs matplotlib: pip install matplotlib") from e
    if not report.systems:
        raise ConfigError("nothing to plot: no system produced results")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG file, got {out.name!r}")
    rows = sorted(report.systems.values(), key=lambda r: (r.metrics.get("ndcg@10", 0.0), r.name))
    names = [r.name for r in rows]
    vals = [r.metrics.get("ndcg@10", 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6), dpi=120)
    colours = ["#9e9e9e" if n == "random" else "#1f77b4" for n in names]
    if rows:
        colours[-1] = "#d62728"  # the best system
    bars = ax.barh(names, vals, color=colours)
    for b, v in zip(bars, vals):
        ax.text(b.get_width() + 0.005, b.get_y() + b.get_height() / 2, f"{v:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, min(1.0, max(vals) * 1.15 + 0.02))
    ax.set_xlabel("NDCG@10 (gain 2^g - 1)")
    ax.set_title(f"{report.dataset} — {report.mode} mode, {report.split} split, {report.queries} queries", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


__all__ = ["format_table", "plot_ndcg"]
