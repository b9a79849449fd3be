"""Reports of an evaluation: a readable table for the terminal and an NDCG@10 bar chart (matplotlib); with several
diversity lambdas (``fusionrank eval --diversity``) the trade-off table (:func:`format_tradeoff`, one row per lambda)
and its plot (:func:`plot_tradeoff`: NDCG@10 against intra-list diversity and distinct colours)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from indexing.errors import ConfigError, MissingDependencyError
from rerank.evaluation.harness import EvalReport
from rerank.evaluation.stats import ALPHA, STAT_METRICS

log = logging.getLogger(__name__)

COLUMNS = ("ndcg@10", "mrr@10", "recall@100", "judged@10")
#: short column names of the distinct@10 fields
DISTINCT_NAMES = {"article_type": "types@10", "colour": "colours@10", "brand": "brands@10"}


def _distinct_fields(report: EvalReport) -> list[str]:
    seen: list[str] = []
    for r in report.systems.values():
        for f in (r.diversity.get("distinct@10") or {}):
            if f not in seen:
                seen.append(f)
    return seen


def _div_cells(r, fields: list[str]) -> str:
    ild = r.diversity.get("ild@10")
    cells = [f"{ild:>10.4f}" if isinstance(ild, float) else f"{'n/a':>10}"]
    dist = r.diversity.get("distinct@10") or {}
    cells += [f"{dist[f]:>10.2f}" if f in dist else f"{'n/a':>10}" for f in fields]
    return "  ".join(cells)


def format_table(report: EvalReport) -> str:
    """A fixed-width table: one row per system (best NDCG@10 first), skipped systems with their reason."""
    head = f"{report.dataset} | mode {report.mode} | split {report.split} | {report.queries} queries | gain {report.gain}"
    if report.diversity is not None:
        head += f" | diversity {report.diversity}"
    name_w = max([len("system")] + [len(n) for n in list(report.systems) + list(report.skipped)])
    dfields = _distinct_fields(report)
    dcols = ["ild@10", *(DISTINCT_NAMES.get(f, f"{f}@10") for f in dfields)] if any(r.diversity for r in report.systems.values()) else []
    best = report.best_baseline
    heads = []
    for c in COLUMNS:
        heads.append(f"{c:>10}")
        if c in STAT_METRICS:
            heads.append(f"{'95% CI':>17}")
    vs_head = "".join(f"  {'Δ' + m.split('@')[0]:>8} {'p':>7} " for m in STAT_METRICS)
    lines = [head, "", f"{'system':<{name_w}}  " + "  ".join([*heads, *(f"{c:>10}" for c in dcols)]) + f"  {'seconds':>8}"
             + (vs_head if best else "")]
    lines.append("-" * len(lines[-1]))
    rows = sorted(report.systems.values(), key=lambda r: (-r.metrics.get("ndcg@10", 0.0), r.name))
    for r in rows:
        cells = []
        for c in COLUMNS:
            cells.append(f"{r.metrics.get(c, float('nan')):>10.4f}")
            if c in STAT_METRICS:
                cells.append(_ci_cell(r.ci95.get(c)))
        line = f"{r.name:<{name_w}}  " + "  ".join(cells)
        if dcols:
            line += "  " + _div_cells(r, dfields)
        line += f"  {r.seconds:>8.1f}"
        if best:
            line += _vs_cells(r)
        lines.append(line)
    for n, why in report.skipped.items():
        lines.append(f"{n:<{name_w}}  {'n/a':>10}  ({why})")
    lines.append("")
    lines.append("95% CI: bootstrap interval of the mean over queries; Δ / p: the mean per-query difference from the best baseline "
                 f"({best or 'none: no first-stage system ran'}) and the two-sided p of a paired randomization test, * = p < {ALPHA}")
    servings = [(r.name, r.serving) for r in rows if r.serving is not None]
    for n, sv in servings:
        lines.append(f"serving {n}: {describe_serving(sv)}")
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


def _ci_cell(ci) -> str:
    return f"{'n/a':>17}" if ci is None else f"{f'[{ci[0]:.4f}, {ci[1]:.4f}]':>17}"


def _vs_cells(r) -> str:
    vs = r.vs_best_baseline
    if vs is None:
        return ""
    if vs.get("is_best_baseline"):
        return "  (best baseline)"
    out = ""
    for m in STAT_METRICS:
        t = vs.get(m)
        if t is None:
            out += f"  {'n/a':>8} {'':>7} "
            continue
        p = "n/a" if t.p is None else (f"{t.p:.4f}" if t.p >= 1e-4 else "<1e-4")
        out += f"  {t.diff:>+8.4f} {p:>7}{'*' if t.significant else ' '}"
    return out


def describe_serving(serving) -> str:
    """One line on what a fusion artifact serves (``SystemResult.serving`` / the artifact's ``serving`` block)."""
    policy = serving.get("policy")
    verdict = serving.get("verdict") or {}
    why = verdict.get("summary") or serving.get("reason") or ""
    if policy == "safe_choice":
        return f"the safe choice ({serving.get('signal')}), not the model: {why}"
    return f"the trained model{': ' + why if why else ''}"


def _tradeoff_systems(report: EvalReport) -> list[str]:
    """Systems the diversity step re-ordered (those with a ``diversity`` entry at some lambda), in report order."""
    names: list[str] = []
    for r in report.by_diversity.values():
        for n, res in r.systems.items():
            if "diversity" in res.diversity and n not in names:
                names.append(n)
    return names


def format_tradeoff(report: EvalReport) -> str:
    """The diversity trade-off: per re-ordered system one row per lambda (NDCG@10, MRR@10, ild@10, distinct@10 per
    field, the mean lambda applied) and the change of each against the first lambda."""
    if not report.by_diversity:
        raise ConfigError("no diversity trade-off in this report: run with several --diversity lambdas")
    names = _tradeoff_systems(report)
    first = next(iter(report.by_diversity.values()))
    fields = _distinct_fields(first)
    cols = ["ndcg@10", "mrr@10", "ild@10", *(DISTINCT_NAMES.get(f, f"{f}@10") for f in fields), "mean λ"]
    lines = [f"diversity trade-off | {report.dataset} | mode {report.mode} | split {report.split} | {report.queries} queries", ""]
    if not names:
        lines.append("no system here is re-ordered by the diversity step (it applies to the fusion systems)")
        return "\n".join(lines)
    for n in names:
        lines.append(f"{n}:")
        lines.append(f"  {'λ':>6}  " + "  ".join(f"{c:>10}" for c in cols))
        base = None
        for lab, r in report.by_diversity.items():
            res = r.systems.get(n)
            if res is None:
                continue
            dist = res.diversity.get("distinct@10") or {}
            vals = [res.metrics.get("ndcg@10", float("nan")), res.metrics.get("mrr@10", float("nan")), res.diversity.get("ild@10", float("nan")),
                    *(dist.get(f, float("nan")) for f in fields)]
            lam = (res.diversity.get("diversity") or {}).get("lambda_mean", float("nan"))
            row = "  ".join(f"{v:>10.4f}" for v in vals) + f"  {lam:>10.3f}"
            if base is None:
                base = vals
                lines.append(f"  {lab:>6}  {row}")
            else:
                delta = ", ".join(f"{c} {v - b:+.4f}" + (f" ({(v / b - 1) * 100:+.0f}%)" if c not in ("ndcg@10", "mrr@10") and b else "")
                                  for c, v, b in zip(cols, vals, base))
                lines.append(f"  {lab:>6}  {row}   vs λ {next(iter(report.by_diversity))}: {delta}")
    return "\n".join(lines)


def plot_tradeoff(report: EvalReport, path: str | Path) -> Path:
    """NDCG@10 against ild@10 and against distinct colours@10 (types when the catalog has no colour), one line
    per re-ordered system, each point labelled with its lambda; saved as PNG."""
    plt = _pyplot()
    names = _tradeoff_systems(report)
    if not names:
        raise ConfigError("nothing to plot: no system was re-ordered by the diversity step (the fusion systems are)")
    out = _png(path)
    first = next(iter(report.by_diversity.values()))
    fields = _distinct_fields(first)
    dfield = "colour" if "colour" in fields else (fields[0] if fields else None)
    panels = [("ild@10", "intra-list diversity@10 (mean pairwise distance)")]
    if dfield is not None:
        panels.append((dfield, f"distinct {dfield} values in the top 10"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), dpi=120, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for n in names:
            xs, ys, labs = [], [], []
            for lab, r in report.by_diversity.items():
                res = r.systems.get(n)
                if res is None:
                    continue
                x = res.diversity.get("ild@10") if key == "ild@10" else (res.diversity.get("distinct@10") or {}).get(key)
                if x is None:
                    continue
                xs.append(x)
                ys.append(res.metrics.get("ndcg@10", 0.0))
                labs.append(lab)
            ax.plot(xs, ys, marker="o", label=n)
            for x, y, lab in zip(xs, ys, labs):
                ax.annotate(f"λ={lab}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report.dataset} — diversity trade-off, {report.mode} mode, {report.split} split, {report.queries} queries", fontsize=10)
    return _save(plt, fig, out)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - installed with the project
        raise MissingDependencyError("--plot needs matplotlib: pip install matplotlib") from e
    return plt


def _save(plt: Any, fig: Any, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def _png(path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG file, got {out.name!r}")
    return out


def plot_ndcg(report: EvalReport, path: str | Path) -> Path:
    """Horizontal bar chart of NDCG@10 per system (best on top), saved as PNG."""
    if not report.systems:
        raise ConfigError("nothing to plot: no system produced results")
    out = _png(path)
    plt = _pyplot()
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
    return _save(plt, fig, out)


__all__ = ["describe_serving", "format_table", "format_tradeoff", "plot_ndcg", "plot_tradeoff"]
