"""Results analysis: per-hardware summaries of a ledger, the progress chart, the cross-hardware bench report.

Results compare only like with like: one series is one run branch on one hardware tag with one eval
profile and budget (Row.key()). Nothing here ranks series of different eval profiles or budgets
against each other; where a report shows several side by side it says so in a note.
"""

import math
import statistics
from pathlib import Path

from rich.table import Table

from .gate import load_noise
from .chart import MAX_PANELS, plot_progress
from .ledger import SCORED, TRANSFER, LedgerError, Series, labels, notes_rows, row_time, series_of
from .plain import markup, md_cell
from .plain import text as plain_text
from .sources import ReportError, load_series, load_source, merge
from .turns import load_turns, turn_summary

PLATEAU_K = 10
MIN_INTERVALS = 3  # experiments/hour and overhead need this many gaps between rows of a series


def comparability_notes(series):
    """What a reader must know before looking at several series side by side."""
    notes = []
    profiles = sorted({s.eval_profile for s in series})
    if len(profiles) > 1:
        notes.append(f"different eval profiles ({', '.join(profiles)}): val_bpb is measured differently under "
                     "each, so results of different profiles are not ranked against each other")
    budgets = sorted({s.budget for s in series})
    if len(budgets) > 1:
        notes.append(f"different training budgets ({', '.join(f'{b:g}s' for b in budgets)}): results of "
                     "different budgets are not ranked against each other")
    for hw in dict.fromkeys(s.hardware for s in series):
        same = [s for s in series if s.hardware == hw]
        if len(same) > 1:
            differ = [what for what, attr in (("run branches", "branch"), ("eval profiles", "eval_profile"),
                                              ("budgets", "budget"), ("sandboxes", "sandbox"))
                      if len({getattr(s, attr) for s in same}) > 1]
            notes.append(f"{hw} has {len(same)} series (different {' and '.join(differ)}): each has its own "
                         "baseline, and keep/discard compared results within one series only")
    return notes


def _r(value, digits=6):
    """A figure rounded for JSON; None where there is none, or where it is NaN or infinite (JSON has neither)."""
    return None if value is None or not math.isfinite(float(value)) else round(float(value), digits)


def finite(value):
    """value with every NaN or infinite float as None, for JSON (a ledger row's val_bpb may be NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def throughput(row):
    """Training tokens per second of a row, or None where the ledger lacks the numbers."""
    if row is None or row.tokens <= 0 or row.training_seconds <= 0:
        return None
    return round(row.tokens / row.training_seconds, 1)


def summarize(s, plateau_k=PLATEAU_K, root=None):
    """One series as a JSON-ready dict with fixed keys (see `autoresearch results --json`)."""
    base, best, trials = s.baseline, s.best, s.trials
    counts = {status: sum(r.status == status for r in trials) for status in ("keep", "discard", "crash")}
    counts = {"experiments": len(trials), **counts, "verify": sum(r.status == "verify" for r in s.rows)}
    kept, prev = [], base
    for r in s.kept:
        kept.append({"commit": r.commit, "description": r.description, "val_bpb": _r(r.val_bpb),
                     "delta": _r(r.val_bpb - prev.val_bpb) if prev is not None else None,
                     "holdout_bpb": _holdout(r)})
        prev = r
    experiments = s.experiments
    keeps = [i for i, r in enumerate(experiments) if r.status == "keep"]
    since = len(experiments) - 1 - keeps[-1] if keeps else len(experiments)
    improvement = None
    if base is not None and best is not None:
        gain = base.val_bpb - best.val_bpb
        improvement = {"abs": _r(gain), "pct": _r(100 * gain / base.val_bpb, 4) if base.val_bpb else None}
    noise = agent = None
    if root is not None:
        turns = load_turns(root, s.branch)
        agent = turn_summary(turns) if turns else None

        stored = load_noise(root, s.hardware, s.eval_profile, s.budget)
        if stored and stored.get("spread") is not None:
            noise = {"spread": _r(stored["spread"]), "runs": len(stored.get("samples", [])),
                     "commit": stored.get("commit")}
            if improvement and stored["spread"] > 0:
                noise["improvement_in_spreads"] = _r(improvement["abs"] / stored["spread"], 2)
    return {
        "hardware": s.hardware, "backend": s.backend, "eval_profile": s.eval_profile, "budget": s.budget,
        "branch": s.branch, "sandbox": s.sandbox, "config": s.config,
        "baseline": {"commit": base.commit, "val_bpb": _r(base.val_bpb), "holdout_bpb": _holdout(base)}
        if base else None,
        "best": {"commit": best.commit, "val_bpb": _r(best.val_bpb), "holdout_bpb": _holdout(best),
                 "description": best.description,
                 "memory_gb": best.memory_gb, "training_seconds": best.training_seconds, "tokens": best.tokens,
                 "tokens_per_sec": throughput(best), "num_params_M": best.num_params_M} if best else None,
        "improvement": improvement,
        "holdout": holdout_gap(base, best),
        "counts": counts,
        "keep_rate": _r(counts["keep"] / len(trials), 4) if trials else None,
        "kept": kept,
        "plateau": {"k": plateau_k, "since_last_keep": since, "plateau": since >= plateau_k},
        "noise": noise,
        "agent": agent,
    }


def _holdout(row):
    """A row's holdout val_bpb, None where none was scored (0.0 in the ledger)."""
    return _r(row.holdout_bpb) if row is not None and row.holdout_bpb > 0 else None


def holdout_gap(base, best):
    """The run's gain measured on the holdout beside the gain on the rows it was selected on: their difference is
    the selection bias, how much of the val_bpb gain is the luck of picking the best of many. None without a holdout
    on both rows (a cache prepared before there was one), or without a gain to check."""
    if base is None or best is None or best is base or _holdout(base) is None or _holdout(best) is None:
        return None
    val_gain, holdout_gain = base.val_bpb - best.val_bpb, base.holdout_bpb - best.holdout_bpb
    if not math.isfinite(val_gain):
        return None
    return {"baseline": _holdout(base), "best": _holdout(best), "val_gain": _r(val_gain),
            "holdout_gain": _r(holdout_gain), "selection_bias": _r(val_gain - holdout_gain)}


def results_summary(rows, plateau_k=PLATEAU_K, root=None, ledger=None):
    """`autoresearch results --json`: {ledger, plateau_k, groups: [one per series], notes}."""
    series = series_of(rows)
    return {"ledger": str(ledger) if ledger is not None else None, "plateau_k": plateau_k,
            "groups": [summarize(s, plateau_k, root) for s in series], "notes": comparability_notes(series)}


# ---------------------------------------------------------------------------------------------
# Text output (rich)


def _fmt(value, spec=".6f", none="-"):
    return none if value is None else format(value, spec)


def print_results(summary, console):
    for g in summary["groups"]:
        console.print(f"[bold]{markup(g['hardware'])}[/bold]  {markup(g['backend'])} · profile "
                      f"{markup(g['eval_profile'])} · budget {g['budget']:g}s · {markup(g['branch'])} · sandbox "
                      f"{markup(g['sandbox'])}",
                      highlight=False, soft_wrap=True)
        grid = Table(show_header=False, box=None, padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        base, best, imp, c = g["baseline"], g["best"], g["improvement"], g["counts"]
        if g["config"] not in (None, "-"):
            grid.add_row("config", plain_text(g["config"]))
        grid.add_row("baseline", plain_text(f"{_fmt(base['val_bpb'])} ({base['commit']})") if base else "-")
        grid.add_row("best", plain_text(f"{best['val_bpb']:.6f} ({best['commit']}: {best['description']})")
                     if best else "-")
        if imp:
            grid.add_row("improvement", f"{_fmt(imp['abs'])} ({_fmt(imp['pct'], '.2f')}%)")
        h = g["holdout"]
        if h:
            grid.add_row("holdout", f"baseline {h['baseline']:.6f}, best {h['best']:.6f}: a gain of "
                         f"{h['holdout_gain']:+.6f} where val_bpb gained {h['val_gain']:+.6f}; selection bias "
                         f"{h['selection_bias']:+.6f} (rows no decision read)")
        rate = f", keep rate {g['keep_rate'] * 100:.1f}%" if g["keep_rate"] is not None else ""
        grid.add_row("experiments", f"{c['experiments']}: {c['keep']} keep, {c['discard']} discard, "
                     f"{c['crash']} crash{rate}" + (f" (+{c['verify']} verify)" if c["verify"] else ""))
        p = g["plateau"]
        grid.add_row("plateau", (f"yes: no keep in the last {p['since_last_keep']} experiments (K={p['k']})"
                                 if p["plateau"] else f"no ({p['since_last_keep']} since the last keep, K={p['k']})"))
        if best:
            tps = best["tokens_per_sec"]
            grid.add_row("best's run", f"{_fmt(tps, ',.0f', 'n/a')} tokens/s, {best['memory_gb']:.1f} GB, "
                         f"{best['num_params_M']:g}M params, {best['training_seconds']:g}s training")
        n = g["noise"]
        if n:
            extra = f", improvement = {n['improvement_in_spreads']:g} x spread" if "improvement_in_spreads" in n else ""
            grid.add_row("noise floor", f"spread {n['spread']:.6f} over {n['runs']} seeds{extra}")
        if g["agent"]:
            grid.add_row("agent turns", agent_line(g["agent"]))
        console.print(grid)
        if g["kept"]:
            table = Table(title="kept changes", title_justify="left")
            for col, kw in (("#", {"justify": "right"}), ("commit", {}), ("val_bpb", {"justify": "right"}),
                            ("delta", {"justify": "right"}), ("holdout", {"justify": "right"}), ("description", {})):
                table.add_column(col, **kw)
            for i, k in enumerate(g["kept"], 1):
                table.add_row(str(i), plain_text(k["commit"]), f"{k['val_bpb']:.6f}", _fmt(k["delta"], "+.6f"),
                              _fmt(k["holdout_bpb"]), plain_text(k["description"]))
            console.print(table)
        console.print()
    for note in summary["notes"]:
        console.print(plain_text(f"note: {note}"), highlight=False)


def agent_line(a):
    """The agent's turns in one line: how many, how many gave no experiment, its time, and what its CLI reported."""
    reported = [f"${a['cost_usd']:.4f}" if a["cost_usd"] is not None else "cost not reported"]
    if a["input_tokens"] is not None or a["output_tokens"] is not None:
        reported.append(f"{a['input_tokens'] or 0:,} tokens in, {a['output_tokens'] or 0:,} out")
    return (f"{a['turns']} ({a['no_experiment']} without an experiment), {a['seconds']:g}s of agent time, "
            + ", ".join(reported))


# ---------------------------------------------------------------------------------------------
# The bench report: per-hardware table and findings matrix


def pace(s):
    """(experiments per hour, overhead seconds per experiment) or Nones: the median wall time between
    consecutive rows, and the median of that beyond each row's training_seconds. Medians, so that a pause
    between two sessions of a run does not count as work; at least three intervals, else Nones."""
    rows = s.experiments
    times = [row_time(r) for r in rows]
    if len(rows) < MIN_INTERVALS + 1 or any(t is None for t in times):
        return None, None
    walls = [b - a for a, b in zip(times, times[1:])]
    wall = statistics.median(walls)
    if wall <= 0:
        return None, None
    overhead = statistics.median(w - r.training_seconds for w, r in zip(walls, rows[1:]))
    return round(3600 / wall, 1), round(overhead, 1)


def hardware_table(series):
    """One dict per series: what the per-hardware table of the report shows."""
    table = []
    for label, s in zip(labels(series), series):
        g = summarize(s)
        per_hour, overhead = pace(s)
        table.append({
            "label": label, "hardware": s.hardware, "backend": s.backend, "config": s.config,
            "eval_profile": s.eval_profile, "budget": s.budget, "branch": s.branch, "sandbox": s.sandbox,
            "baseline": g["baseline"]["val_bpb"] if g["baseline"] else None,
            "best": g["best"]["val_bpb"] if g["best"] else None,
            "improvement_pct": g["improvement"]["pct"] if g["improvement"] else None,
            "holdout": g["holdout"],
            "experiments": g["counts"]["experiments"], "keep": g["counts"]["keep"],
            "discard": g["counts"]["discard"], "crash": g["counts"]["crash"],
            "tokens_per_sec": g["best"]["tokens_per_sec"] if g["best"] else None,
            "experiments_per_hour": per_hour, "overhead_s": overhead,
        })
    return table


def _same_commit(a, b):
    return a.startswith(b) or b.startswith(a)


def findings_matrix(series):
    """Each kept change (its origin series' keeps after the baseline) against every series: a cell
    {status: kept|discarded|crashed|untested, ...}. A transferred experiment ("transfer <commit>: ...")
    fills the origin change's cell of the series it ran on."""
    names = labels(series)
    changes = []  # {commit, description, origin, cells}
    for label, s in zip(names, series):
        prev = s.baseline
        for r in s.kept:
            if not TRANSFER.match(r.description):
                changes.append({"commit": r.commit, "description": r.description, "origin": label,
                                "cells": {label: {"status": "kept", "commit": r.commit, "val_bpb": _r(r.val_bpb),
                                                  "delta": _r(r.val_bpb - prev.val_bpb) if prev else None}}})
            prev = r
    status_word = {"keep": "kept", "discard": "discarded"}  # crash, invalid, lost: not scored
    for label, s in zip(names, series):
        best = None
        for r in s.experiments:
            m = TRANSFER.match(r.description)
            if m:
                origin, description = m.groups()
                change = next((c for c in changes if _same_commit(c["commit"], origin)), None)
                if change is None:  # its origin is not among the sources: a row of its own
                    change = {"commit": origin, "description": description, "origin": None, "cells": {}}
                    changes.append(change)
                crashed = r.status not in SCORED or not math.isfinite(r.val_bpb)
                change["cells"][label] = {
                    "status": status_word.get(r.status, "crashed"), "commit": r.commit,
                    "val_bpb": None if crashed else _r(r.val_bpb),
                    "delta": None if crashed or best is None else _r(r.val_bpb - best)}
            if r.status == "keep" and math.isfinite(r.val_bpb):
                best = r.val_bpb if best is None else min(best, r.val_bpb)
    for c in changes:
        c["cells"] = {label: c["cells"].get(label, {"status": "untested"}) for label in names}
    return changes


def _cell(cell):
    if cell["status"] == "untested":
        return "untested"
    if cell["status"] == "crashed":
        return f"crashed ({md_cell(cell['commit'])})"
    delta = f" {cell['delta']:+.4f}" if cell.get("delta") is not None else ""
    word = "**kept**" if cell["status"] == "kept" else "discarded"
    return f"{word}{delta} ({md_cell(cell['commit'])})"


def render_markdown(sources, rows, series, table, matrix, notes, png_name="progress.png"):
    def num(v, spec):
        return "–" if v is None else format(v, spec)

    out = ["# autoresearch bench report", "",
           f"{len(rows)} rows from {len(sources)} source{'s' if len(sources) != 1 else ''}: "
           + ", ".join(md_cell(s) for s in sources) + ".", "",
           "val_bpb: validation bits per byte, lower is better. Each series is one run branch on one hardware "
           "tag with one eval profile and training budget; keep/discard only ever compared results within "
           "a series.", ""]
    if notes:
        out += ["> **Note:** " + "\n>\n> **Note:** ".join(md_cell(n) for n in notes), ""]
    out += ["## Per hardware", "",
            "| hardware | backend | config | profile | budget | sandbox | baseline | best | improvement | experiments "
            "(keep/discard/crash) | tokens/s (best) | experiments/hour | overhead s/experiment |",
            "|---|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for t in table:
        config = t["config"] if t["config"] not in ("", "-") else "–"
        out.append(
            f"| {md_cell(t['label'])} | {md_cell(t['backend'])} | {md_cell(config)} | {md_cell(t['eval_profile'])} | "
            f"{t['budget']:g}s | {md_cell(t['sandbox'])} | {num(t['baseline'], '.6f')} | {num(t['best'], '.6f')} | "
            f"{num(t['improvement_pct'], '.2f')}% | {t['experiments']} ({t['keep']}/{t['discard']}/{t['crash']}) | "
            f"{num(t['tokens_per_sec'], ',.0f')} | {num(t['experiments_per_hour'], '.1f')} | "
            f"{num(t['overhead_s'], '.1f')} |")
    out += ["", "Run branches: " + "; ".join(f"{md_cell(t['label'])} = {md_cell(t['branch'])}" for t in table) + ".",
            "", "Experiments exclude the baseline and verify re-runs. tokens/s is the best run's training tokens "
            "over its training seconds (– where the ledger records no tokens). "
            "Experiments/hour and overhead come from the wall time between consecutive rows (medians, so pauses "
            "between sessions do not count; – with fewer than four rows): overhead is the time per experiment "
            "beyond training (startup, evaluation, the agent's turn).", ""]
    checked = [t for t in table if t["holdout"]]
    if checked:
        out += ["## Holdout", "",
                "The best's gain over the baseline on the validation rows the loop selected it on, and on the "
                "holdout rows no decision ever read (prepare sets them aside from other validation documents). "
                "Their difference is the selection bias: how much of the gain is the luck of keeping the best of "
                "many noisy results.", "",
                "| hardware | baseline holdout | best holdout | val_bpb gain | holdout gain | selection bias |",
                "|---|---:|---:|---:|---:|---:|"]
        for t in checked:
            h = t["holdout"]
            out.append(f"| {md_cell(t['label'])} | {h['baseline']:.6f} | {h['best']:.6f} | {h['val_gain']:+.6f} | "
                       f"{h['holdout_gain']:+.6f} | {h['selection_bias']:+.6f} |")
        out.append("")
    out += ["## Findings", "",
            "Each kept change (rows) against each series (columns): kept / discarded / crashed / untested, "
            "with the val_bpb change against that series' best before it (its previous keep where the change "
            "originated). A change reaches another series with `autoresearch transfer`, whose experiments are "
            "described `transfer <origin commit>: ...`.", ""]
    names = [t["label"] for t in table]
    if matrix:
        out += ["| change | commit | " + " | ".join(md_cell(n) for n in names) + " |",
                "|---|---|" + "---|" * len(names)]
        for c in matrix:
            out.append(f"| {md_cell(c['description'])} | {md_cell(c['commit'])} | "
                       + " | ".join(_cell(c["cells"][n]) for n in names) + " |")
    else:
        out.append("No kept changes yet.")
    drawn = [t["label"] for t, s in zip(table, series) if s.experiments][:MAX_PANELS]
    out += ["", "## Progress", "", f"![progress]({png_name})", "",
            "Every experiment in order (0 = baseline): discards faint grey, keeps bold green and labelled, "
            "crashes as red x on the bottom edge, the running best as a step line; one panel per series.", ""]
    if len(drawn) < len(table):
        out += [f"The chart shows the first {len(drawn)} of the {len(table)} series ({MAX_PANELS} panels at most): "
                + ", ".join(md_cell(n) for n in drawn) + ".", ""]
    for label, s in zip(names, series):
        kept = s.kept
        if not kept:
            continue
        out += [f"### Kept on {md_cell(label)}", ""]
        prev = s.baseline
        for r in kept:
            delta = f"{r.val_bpb - prev.val_bpb:+.6f}" if prev else "–"
            held = f", holdout {r.holdout_bpb:.6f}" if r.holdout_bpb > 0 else ""
            out.append(f"1. {md_cell(r.commit)} {r.val_bpb:.6f} ({delta}{held}) {md_cell(r.description)}")
            prev = r
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def bench_report(sources, out, repo=None):
    """Read the sources (ledger files or run branches), merge, write out/report.md and out/progress.png.
    Returns {rows, series, table, matrix, notes, report, png}."""
    rows, series = load_series(sources, repo)
    table = hardware_table(series)
    matrix = findings_matrix(series)
    notes = comparability_notes(series)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_progress(series, out / "progress.png")
    report = out / "report.md"
    report.write_text(render_markdown([str(s) for s in sources], rows, series, table, matrix, notes))
    return {"rows": rows, "series": series, "table": table, "matrix": matrix, "notes": notes,
            "report": report, "png": png}


__all__ = ["LedgerError", "ReportError", "Series", "bench_report", "findings_matrix", "hardware_table", "load_series",
           "load_source", "merge", "notes_rows", "plot_progress", "results_summary", "series_of", "summarize"]
