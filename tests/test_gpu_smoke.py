"""bench/gpu_smoke.sh's dry run: the device check of issue 25, on this CPU with a tiny model."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_smoke_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([str(ROOT / "bench" / "gpu_smoke.sh"), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["torch"] and report["training"]["attention"] == "sdpa"
    assert report["training"]["tokens_per_sec"] > 0 and report["training"]["peak_vram_mb"] > 0
    assert report["evaluation"]["status"] == "ok" and report["evaluation"]["val_bpb"] > 0
    # one experiment's cost: 3600 / (budget + startup + evaluation), the evaluation's seconds and its host bytes
    assert report["eval_seconds"] > 0 and abs(report["eval_seconds"] - report["evaluation"]["seconds"]) < 0.1
    per_hour = 3600 / (2.0 + report["startup_seconds"] + report["eval_seconds"])  # from the rounded figures
    assert report["experiments_per_hour"] > 0 and abs(report["experiments_per_hour"] - per_hour) < 0.01 * per_hour
    # the smoke profile's protocol: (T + 1) int32 in and T float32 out per scored row, at least
    rows, T = report["scored_rows"], 256
    assert report["host_bytes"] == report["host_bytes_in"] + report["host_bytes_out"] > rows * (2 * T + 1) * 4
    assert set(report["forward_seconds"]) == {"eager", "compiled"}
    assert [r["depth"] for r in report["rungs"]] == [1, 2] and all(r["tokens_per_sec"] > 0 for r in report["rungs"])
    assert report["pick"]["choice"]["DEPTH"] in (1, 2) and "R(C)" in report["pick"]["reason"]
    assert report["hardware_tag"].startswith("cuda-cpu-") and report["gpu"] == {}  # no NVIDIA GPU here
