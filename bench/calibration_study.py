"""
Calibration study: at the full budget, does the calibrated pick beat its ladder neighbours and the
backend's fixed default? One run each (the pick once per seed, for the run-to-run spread), in a
scratch copy of the project so nothing here is edited. Prints one markdown section.

    AUTORESEARCH_CACHE=/tmp/bench autoresearch prepare --source ../shared/data/mixed-en --profile cpu
    AUTORESEARCH_CACHE=/tmp/bench python bench/calibration_study.py --backend mlx >> bench/calibration_study.md

Every run is kept in <cache>/calibration/study-runs.jsonl, keyed by what decides its result (hardware,
profile, budget, sizes, seed, and the hashes of train.py and prepare.py); a later study that needs the same run
reads it from there instead of training again (a failed run too: one that timed out would again), so a stopped
study resumes and a revised rule re-runs only what is new. --fresh ignores them. The run-to-run noise the
verdict uses is pooled over every configuration kept with several seeds on this machine.
"""

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from autoresearch import calibrate as cal  # noqa: E402
from autoresearch.hardware import hardware_tag  # noqa: E402
from autoresearch.hparams import read_constants, set_constants  # noqa: E402
from autoresearch.experiment import train_and_evaluate  # noqa: E402
from autoresearch.settings import Run  # noqa: E402


RUNS_FILE = "study-runs.jsonl"


def run_key(backend, constants, budget, seed, profile):
    source = (ROOT / "backends" / backend / "train.py").read_bytes()
    digest = hashlib.sha256(source + (ROOT / "prepare.py").read_bytes()).hexdigest()[:16]
    sizes = ",".join(f"{k}={constants[k]}" for k in sorted(constants))
    return f"{hardware_tag(backend)}|{profile.name}|{budget:g}s|{sizes}|seed={seed}|{digest}"


def load_runs(path):
    """key -> (summary, error) of every kept run, failures included (a run that timed out would again)."""
    if not path.exists():
        return {}
    return {r["key"]: (r.get("summary"), r.get("error")) for r in map(json.loads, path.read_text().splitlines())}


def pooled_spread(kept, key):
    """Run-to-run noise on this machine: the pooled standard deviation over every configuration kept with
    more than one seed, any backend, at this profile and budget. One pair of seeds alone is a poor estimate."""
    def machine(k):  # the hardware tag less its backend, the profile and the budget
        tag, profile, budget = k.split("|")[:3]
        return tag.split("-", 1)[1], profile, budget

    groups = {}
    for k, (summary, _) in kept.items():
        if summary and machine(k) == machine(key):
            groups.setdefault(k.split("|seed=")[0] + k.split("|")[-1], []).append(summary["val_bpb"])
    repeated = [v for v in groups.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in repeated)
    if not dof:
        return float("nan"), 0, 0
    var = sum(statistics.variance(v) * (len(v) - 1) for v in repeated) / dof
    return var**0.5, len(repeated), sum(map(len, repeated))


def run_variant(backend, constants, budget, seed, scratch):
    source = (ROOT / "backends" / backend / "train.py").read_text()
    (scratch / "backends" / backend / "train.py").write_text(set_constants(source, constants) if constants else source)
    result, ev, stop = train_and_evaluate(Run.resolve(scratch, backend, budget), seed)
    if result.timed_out:
        return None, f"timed out after {result.elapsed:.0f} s"
    if stop or ev.status != "ok":
        return None, result.tail(3) if stop else ev.reason
    return dict(result.summary, val_bpb=ev.val_bpb), None  # scored by the harness, as every experiment


def variants_for(pick, default, seeds, kinds, seq_len):
    """The pick (once per seed), its ladder neighbours (DEPTH one rung down and up; TOTAL_BATCH_SIZE halved
    and doubled) and the file's fixed default, each once at seed 42."""
    ladder = list(cal.DEPTH_LADDER)
    i = ladder.index(pick["DEPTH"])
    out = [("calibrated pick" + (f", seed {s}" if s != 42 else ""), pick, s) for s in seeds]
    if "depth" in kinds:
        out += [(f"neighbour: DEPTH {d}", dict(pick, DEPTH=d), 42) for d in (ladder[i - 1] if i else None, ladder[i + 1]) if d]
    if "batch" in kinds:
        for total in (pick["TOTAL_BATCH_SIZE"] // 2, pick["TOTAL_BATCH_SIZE"] * 2):
            if total >= pick["DEVICE_BATCH_SIZE"] * seq_len:
                out.append((f"neighbour: TOTAL_BATCH_SIZE {total}", dict(pick, TOTAL_BATCH_SIZE=total), 42))
    if default != pick:
        same = [i for i, (_, c, _) in enumerate(out) if c == default]
        if same:  # the default is already a neighbour: one run serves both rows
            label, c, s = out[same[0]]
            out[same[0]] = (label + " = fixed default of the file", c, s)
        else:
            out.append(("fixed default of the file", default, 42))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--budget", type=float, default=None, help="default: the profile's (300 s)")
    parser.add_argument("--seeds", type=int, default=3, help="runs of the pick, for the run-to-run spread")
    parser.add_argument("--neighbours", default="depth,batch", help="which ladder neighbours: depth, batch or both")
    parser.add_argument("--fresh", action="store_true", help="train every run, ignoring kept results")
    args = parser.parse_args()
    profile = prepare.load_profile()
    budget = args.budget or profile.time_budget
    lines = []
    calibration, cached = cal.calibrate(args.backend, root=ROOT, budget=budget, on_line=lines.append)
    pick = calibration.choice
    default = {k: v for k, v in read_constants((ROOT / "backends" / args.backend / "train.py").read_text()).items()
               if k in cal.KEYS}
    variants = variants_for(pick, default, [42 + i for i in range(args.seeds)], args.neighbours.split(","),
                            profile.seq_len)

    scratch = Path(tempfile.mkdtemp(prefix="calib-study-"))
    shutil.copy2(ROOT / "prepare.py", scratch / "prepare.py")
    (scratch / "backends" / args.backend).mkdir(parents=True)
    runs_path = prepare.cache_dir() / "calibration" / RUNS_FILE
    kept = {} if args.fresh else load_runs(runs_path)
    rows, reused = [], 0
    for label, constants, seed in variants:
        key = run_key(args.backend, dict(default, **constants), budget, seed, profile)
        if key in kept:
            summary, error = kept[key]
            reused += 1
        else:
            summary, error = run_variant(args.backend, constants, budget, seed, scratch)
            kept[key] = summary, error
            with open(runs_path, "a") as f:
                record = {"key": key, "summary": summary, "error": error, "at": time.strftime("%Y-%m-%dT%H:%M")}
                f.write(json.dumps(record) + "\n")
        rows.append((label, constants, seed, summary, error))
        print(f"{label}: {summary['val_bpb'] if summary else error}", file=sys.stderr, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    picks = [r[3]["val_bpb"] for r in rows[:args.seeds] if r[3]]
    spread = statistics.stdev(picks) if len(picks) >= 2 else float("nan")
    print(f"## {args.backend} on {hardware_tag(args.backend)}\n")
    print(f"Eval profile `{profile.name}`, budget {budget:g} s per run, {time.strftime('%Y-%m-%d')}. "
          f"Calibration ({'cached' if cached else f'measured in {calibration.seconds:g} s'}): "
          f"`{calibration.config()}` — {calibration.reason}\n")
    if lines:
        print("```\n" + "\n".join(lines) + "\n```\n")
    if reused:
        print(f"{reused} of the {len(rows)} runs were kept from an earlier study with the same key ({RUNS_FILE}).\n")
    print("| run | DEPTH | TOTAL_BATCH_SIZE | DEVICE_BATCH_SIZE | seed | val_bpb | steps | tokens/s | params (M) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, constants, seed, s, error in rows:
        c = dict(default, **constants)
        head = f"| {label} | {c['DEPTH']} | {c['TOTAL_BATCH_SIZE']} | {c['DEVICE_BATCH_SIZE']} | {seed} | "
        if s:
            print(head + f"{s['val_bpb']:.4f} | {s['num_steps']} | {s['tokens_per_sec']:.0f} | {s['num_params_M']:.2f} |")
        else:
            print(head + f"failed: {error.splitlines()[-1] if error else '?'} | | | |")
    if default == pick:
        print("\nThe file's fixed default is the pick itself.")
    ok = [(r[0], r[3]["val_bpb"]) for r in rows if r[3]]
    best_label, best = min(ok, key=lambda t: t[1])
    pick_mean = statistics.fmean(picks) if picks else float("nan")
    noise, configs, runs = pooled_spread(kept, run_key(args.backend, dict(default, **pick), budget, 42, profile))
    print(f"\nRun-to-run spread of the pick ({len(picks)} seeds, standard deviation): {spread:.4f}; pooled over the "
          f"{configs} configurations run with several seeds on this machine ({runs} runs, {RUNS_FILE}): {noise:.4f}. "
          f"Best run: {best_label} ({best:.4f}); the pick's mean {pick_mean:.4f} is {pick_mean - best:+.4f} from it, "
          f"{'within' if pick_mean - best <= 2 * noise else 'outside'} 2 x the pooled spread.")
    print(f"\nReproduce: `AUTORESEARCH_CACHE=<cpu-profile cache of ../shared/data/mixed-en> "
          f"python bench/calibration_study.py --backend {args.backend} --seeds {args.seeds} "
          f"--neighbours {args.neighbours}`\n")


if __name__ == "__main__":
    main()
