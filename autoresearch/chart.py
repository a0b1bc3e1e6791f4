"""The progress chart: upstream's, one panel per series."""

import math
from pathlib import Path

from .ledger import SCORED, TRANSFER, labels
from .sources import ReportError

LABEL_CHARS = 48  # kept-point labels on the chart are shortened to this
MAX_PANELS = 12  # series drawn on the progress chart (a panel each); the report says which were left out


def _short(text, n=LABEL_CHARS):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def plot_progress(series, path, title=None, limit=MAX_PANELS):
    """Upstream's progress chart, one panel per series: every experiment in order (discards faint, keeps
    bold, crashes as x on the bottom edge), the running best as a step line, kept points labelled. Only the
    first `limit` series are drawn: a panel each, so hundreds of hardware tags would make a figure of gigabytes."""
    import matplotlib  # here, not at the top: pyplot's 0.7 s import would slow every command, the loop's included

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in series if s.experiments]
    if not series:
        raise ReportError("nothing to plot: no experiments")
    heads, series = labels(series)[:limit], series[:limit]
    fig, axes = plt.subplots(len(series), 1, figsize=(12, 4.6 * len(series)), squeeze=False)
    for ax, s, head in zip(axes[:, 0], series, heads):
        _panel(ax, s)
        _titles(ax, s, head)
    if title:
        fig.suptitle(title, fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)  # labels near an edge are never cut
    plt.close(fig)
    return path


def _panel(ax, s):
    """One series' experiments: discards, keeps and their labels, the running best, what was not scored."""
    import matplotlib.transforms as mtransforms  # loaded with pyplot by plot_progress
    rows = s.experiments
    xs = list(range(len(rows)))
    ok = [(x, r) for x, r in zip(xs, rows) if r.status in SCORED and math.isfinite(r.val_bpb)]
    kept = [(x, r) for x, r in ok if r.status == "keep"]
    values = [r.val_bpb for _, r in ok]
    base = (s.baseline.val_bpb if s.baseline and math.isfinite(s.baseline.val_bpb)  # a NaN baseline: no limits
            else (values[0] if values else 1.0))
    low = min(values) if values else base
    span = max(base - low, 0.02 * base, 1e-3)
    # everything in view but outliers (a diverged run would flatten the rest): those sit on the top edge
    top = min(max(values) if values else base, base + max(4 * span, 0.1 * abs(base)))
    bottom = low - 0.35 * span
    top += 0.12 * (top - bottom)  # headroom for the labels of the highest keeps
    ax.set_ylim(bottom, top)
    last = len(rows) - 1
    ax.set_xlim(-0.6, last + max(1.2, 0.2 * last))  # room on the right for the last keeps' labels
    edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)

    inside = [(x, r) for x, r in ok if r.status != "keep" and r.val_bpb <= top]
    above = [(x, r) for x, r in ok if r.status != "keep" and r.val_bpb > top]
    ax.scatter([x for x, _ in inside], [r.val_bpb for _, r in inside], s=26, color="#8c8c8c", alpha=0.55,
               linewidths=0, label="discarded", zorder=2)
    if above:
        ax.scatter([x for x, _ in above], [0.975] * len(above), s=26, marker="^", color="#9a9a9a",
                   alpha=0.6, linewidths=0, transform=edge, label="discarded, off the top", zorder=2)
    if kept:
        ax.scatter([x for x, _ in kept], [r.val_bpb for _, r in kept], s=52, color="#1a9850",
                   edgecolors="#0b3d20", linewidths=0.9, label="kept", zorder=4)
        # running best: a step from each keep that improved on the best so far to the last experiment
        best, steps_x, steps_y = math.inf, [], []
        for x, r in kept:
            if r.val_bpb < best:
                best = r.val_bpb
                steps_x.append(x)
                steps_y.append(best)
        steps_x.append(len(rows) - 1)
        steps_y.append(best)
        ax.step(steps_x, steps_y, where="post", color="#1a9850", linewidth=1.6, alpha=0.85,
                label="running best", zorder=3)
        for x, r in kept:
            m = TRANSFER.match(r.description)
            label = "baseline" if r is s.baseline else _short(f"from {m[1]}: {m[2]}" if m else r.description)
            ax.annotate(label, (x, r.val_bpb), xytext=(6, 6), textcoords="offset points", fontsize=7.5,
                        color="#145a32", rotation=25, rotation_mode="anchor", ha="left", va="bottom",
                        zorder=5, annotation_clip=False)
    crashes = [x for x, r in zip(xs, rows) if r.status not in SCORED or not math.isfinite(r.val_bpb)]
    if crashes:
        ax.scatter(crashes, [0.04] * len(crashes), marker="x", s=40, color="#d73027", linewidths=1.6,
                   transform=edge, label="not scored (crash, invalid, lost)", zorder=4, clip_on=False)


def _titles(ax, s, head):
    """The panel's title, what the series is and how it went, axes and legend."""
    rows = s.experiments
    xs = list(range(len(rows)))
    n_trials = len(s.trials)
    keeps = sum(r.status == "keep" for r in s.trials)
    sub = f"{s.backend} · {s.eval_profile} profile · budget {s.budget:g}s · {s.branch} · sandbox {s.sandbox}"
    stats = f"{n_trials} experiment{'s' if n_trials != 1 else ''} after the baseline, {keeps} kept"
    if s.baseline and s.best and s.baseline.val_bpb:
        gain = s.baseline.val_bpb - s.best.val_bpb
        stats += (f" · baseline {s.baseline.val_bpb:.4f} → best {s.best.val_bpb:.4f} "
                  f"({100 * gain / s.baseline.val_bpb:.2f}% lower)")
    ax.set_title(head, loc="left", fontsize=11, fontweight="bold", pad=32)
    ax.text(0, 1.015, f"{sub}\n{stats}", transform=ax.transAxes, fontsize=9, va="bottom", ha="left",
            linespacing=1.5, color="#333333")
    ax.set_xlabel("experiment # (0 = baseline)", fontsize=9)
    ax.set_ylabel("val_bpb (lower is better)", fontsize=9)
    ax.grid(True, alpha=0.25)
    if len(rows) <= 30:
        ax.set_xticks(xs)
    ax.tick_params(labelsize=8)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
