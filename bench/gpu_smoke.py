"""The one device check of issue 25: on a CUDA GPU, the harness's own training and evaluation at a 60 s budget on
a gpu-profile cache of ../shared/data/mixed-en, what one evaluation costs (its seconds, the bytes it moves through
host memory, experiments per hour), the scorer's forward timed eager and compiled, two calibration rungs (DEPTH 6
and 8) and the rule's pick; everything in one JSON. --dry-run does the same on a CPU with a tiny
model, the smoke profile and a 2 s budget (CI runs it: tests/test_gpu_smoke.py).

Usage: bench/gpu_smoke.sh [--dry-run] [--out FILE]   (bench/gpu_smoke.md says what to do with the JSON)"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "mixed-en"
# forward: the validation rows the forward timing runs (None: all) and torch.compile's backend for it
FULL = {"profile": "gpu", "budget": 60.0, "depths": (6, 8), "constants": {}, "forward": (None, "inductor")}
TINY = {"profile": "smoke", "budget": 2.0, "depths": (1, 2), "forward": (16, "eager"),
        "constants": {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": 8, "TOTAL_BATCH_SIZE": 2048}}
SUMMARY_KEYS = ("attention", "compile_seconds", "recompiles", "graph_breaks", "tokens_per_sec", "mfu_percent",
                "peak_vram_mb", "training_seconds", "num_steps", "device")


def checkout(dest, constants):
    """The harness's files in a scratch folder: prepare.py and cuda/train.py with constants set, as an agent would."""
    from autoresearch.hparams import set_constants

    (dest / "backends" / "cuda").mkdir(parents=True)
    shutil.copy2(ROOT / "prepare.py", dest / "prepare.py")
    text = (ROOT / "backends" / "cuda" / "train.py").read_text()
    (dest / "backends" / "cuda" / "train.py").write_text(set_constants(text, constants) if constants else text)
    return dest


def gpu_facts():
    """GPU name and clocks from nvidia-smi (MHz), or {} without one."""
    query = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,compute_mode"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(query.split(","), (v.strip() for v in out[0].split(",")))) if out else {}


# The harness's scorer (autoresearch/scorer.py) on the checkpoint's exported graph, as the evaluator's scoring process
# runs it (node by node, eagerly), and the same graph under torch.compile: whether compiling the scorer would pay.
FORWARD = """
import json, sys, time
sys.path[:0] = [{harness!r}]
import numpy as np, torch, prepare
from autoresearch.scorer import TorchScorer
scorer = TorchScorer({checkpoint!r})
rows = prepare.get_val_rows()[:{rows}]
b = scorer.batch
out = {{}}
for mode in ("eager", "compiled"):
    forward = torch.compile(scorer.graph, dynamic=False, backend={backend!r}) if mode == "compiled" else scorer.graph
    start = time.time()
    with torch.inference_mode():
        for at in range(0, len(rows), b):
            chunk = np.resize(rows[at:at + b], (b, rows.shape[1]))  # one shape: one compiled graph
            scorer.nats(forward(torch.from_numpy(chunk[:, :-1].astype(np.int64)).to(scorer.graph.device)), chunk[:, 1:])
    out[mode] = round(time.time() - start, 2)
print(json.dumps(out))
"""


def forward_seconds(checkpoint, rows, backend):
    """Seconds for the harness's scorer to turn the validation rows into per-token nats with the exported graph,
    eager and compiled (compiling included), in a fresh process as the evaluator's would."""
    code = FORWARD.format(harness=str(ROOT), checkpoint=str(checkpoint), rows=rows, backend=backend)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["no output"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(config, out):
    import prepare
    from autoresearch import calibrate as cal
    from autoresearch.evaluate import evaluate
    from autoresearch.hparams import read_constants
    from autoresearch.runner import run_training

    started = time.time()
    from autoresearch import hardware, sandbox

    report = {"dry_run": config is TINY, "gpu": gpu_facts(), "python": sys.version.split()[0],
              "sandbox": sandbox.active().kind}
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    try:
        os.environ["AUTORESEARCH_CACHE"] = str(work / "cache")
        t0 = time.time()
        prepare.prepare(profile=config["profile"], sources=[str(DATA)])
        report["prepare_seconds"] = round(time.time() - t0, 1)
        root = checkout(work / "project", config["constants"])
        import torch

        report["torch"] = torch.__version__
        report["triton"] = _version("triton")
        report["kernels"] = _version("kernels")
        report["hardware_tag"] = hardware.hardware_tag("cuda")  # its attention path: what the sandboxed runs can load
        checkpoint = work / "checkpoint"
        env = dict(os.environ, AUTORESEARCH_CACHE=str(prepare.trainer_view()), AUTORESEARCH_CHECKPOINT=str(checkpoint))
        lines = []
        result = run_training("cuda", budget=config["budget"], root=root, env=env, on_line=lines.append)
        report["training"] = {k: (result.summary or {}).get(k) for k in SUMMARY_KEYS}
        report["training"]["returncode"] = result.returncode
        report["fa3_lines"] = [line for line in lines if line.startswith(("fa3:", "hub:"))]
        if result.ok:
            ev = evaluate("cuda", root, checkpoint, timeout=600)
            report["evaluation"] = {"status": ev.status, "val_bpb": ev.val_bpb, "seconds": round(ev.seconds, 1),
                                    "mode": "eager", "reason": ev.reason}
            report.update(costs(config["budget"], result, ev))
            report["forward_seconds"] = forward_seconds(checkpoint, *config["forward"])
        profile = prepare.load_profile()
        source = (root / "backends" / "cuda" / "train.py").read_text()
        batch = read_constants(source)["DEVICE_BATCH_SIZE"]
        scratch = work / "rungs"
        (scratch / "backends" / "cuda").mkdir(parents=True)
        shutil.copy2(root / "prepare.py", scratch / "prepare.py")
        rungs = []
        for depth in config["depths"]:
            rung, error = cal.measure("cuda", source, depth, batch, 300.0, scratch)
            report.setdefault("rungs", []).append(rung.__dict__ if rung else {"depth": depth, "error": error[-500:]})
            if rung:
                rungs.append(rung)
        if rungs:
            choice, reason = cal.choose(rungs, 300.0, profile.seq_len, batch, cal.memory_limit_mb("cuda"))
            report["pick"] = {"choice": choice, "reason": reason, "budget": 300.0}
    finally:
        report["seconds"] = round(time.time() - started, 1)
        shutil.rmtree(work, ignore_errors=True)
        out.write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    return report


def costs(budget, result, ev):
    """What one experiment costs, from this run's own numbers: startup (the training run's wall time less its
    counted training seconds: interpreter, imports, compile, the export's trace, the checkpoint), the harness's
    evaluation seconds, experiments per hour at this budget and at the profile's 300 s, and the bytes the
    evaluation moved through host memory, counted by the protocol from the rows it scored."""
    import prepare
    from autoresearch import evaluate as evaluation
    from bench.eval_scale import new_bytes

    startup = max(0.0, result.elapsed - float(result.summary["training_seconds"]))
    profile = prepare.load_profile()
    # the evaluation's own line: "... N validation and M holdout rows in batches of B"
    found = re.search(r"(\d+) validation and (\d+) holdout rows in batches of (\d+)", ev.log)
    rows, batch = int(found[1]) + int(found[2]), int(found[3])
    copies = -(-evaluation.PROBE_ROWS.get(profile.name, evaluation.DEFAULT_PROBE_ROWS) // batch)
    sent, back = new_bytes(profile.seq_len, rows, batch, copies)
    return {"startup_seconds": round(startup, 1), "eval_seconds": round(ev.seconds, 2),
            "experiments_per_hour": round(3600 / (budget + startup + ev.seconds), 2),
            "experiments_per_hour_300s": round(3600 / (300 + startup + ev.seconds), 2),
            "host_bytes": sent + back, "host_bytes_in": sent, "host_bytes_out": back,
            "scored_rows": rows, "probed_rows": copies * batch, "batch": batch}


def _version(name):
    from autoresearch.hardware import package_version

    return package_version(name)


def _plain(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    args = parser.parse_args()
    report = run(TINY if args.dry_run else FULL, args.out)
    ok = report.get("evaluation", {}).get("status") == "ok" and "pick" in report
    print(f"gpu_smoke: {'ok' if ok else 'FAILED'} in {report['seconds']:.0f}s; wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
