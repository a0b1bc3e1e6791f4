"""`autoresearch results` and `autoresearch bench report` on fixture ledgers with exact expected numbers."""

import dataclasses
import json
import re
from datetime import datetime, timedelta, timezone

import git
import pytest
from typer.testing import CliRunner

from conftest import one_commit_repo
from autoresearch.cli import app
from autoresearch.experiment import record
from autoresearch.ledger import COLUMNS, Row, format_row
from autoresearch.report import MAX_PANELS, findings_matrix, hardware_table, results_summary, series_of

MLX = "mlx-cpu-x86_64-2c-24gb"
MPS = "mps-cpu-x86_64-2c-24gb"
H100 = "cuda-nvidia-h100-80gb-hbm3-80gb"
BRANCH = {MLX: f"autoresearch/a-{MLX}", MPS: f"autoresearch/b-{MPS}", H100: f"autoresearch/c-{H100}"}
BACKEND = {MLX: "mlx", MPS: "mps", H100: "cuda"}
PROFILE = {MLX: "cpu", MPS: "cpu", H100: "gpu"}
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(hw, i, commit, status, val, description, training_seconds=300.0, tokens=0, memory_gb=1.0, **extra):
    """Row i of a series, recorded 6 minutes after the previous one."""
    fields = dict(
        commit=commit, val_bpb=val, memory_gb=memory_gb, status=status, description=description, hardware=hw,
        backend=BACKEND[hw], eval_profile=PROFILE[hw], budget=300.0, seed=42,
        timestamp=(START + timedelta(minutes=6 * i)).strftime("%Y-%m-%dT%H:%M:%S%z"),
        training_seconds=training_seconds if status != "crash" else 0.0, num_steps=100, num_params_M=11.5,
        tokens=tokens, config="DEPTH=4,TOTAL_BATCH_SIZE=16384" if hw != H100 else "-", gate="greedy",
        train_hash=f"{commit}{i:09d}", branch=BRANCH[hw], samples=f"{val:.6f}" if status != "crash" else "-")
    fields.update(extra)
    return Row(**fields)


def fixture_rows():
    return [
        # mlx: ties (a discard equal to the best, a later keep equal to the best), a crash, a verify row
        # with holdout figures: the best gained 0.1 on the rows it was selected on, 0.08 on the holdout
        row(MLX, 0, "a000001", "keep", 1.5, "baseline", tokens=3_000_000, memory_gb=2.0, holdout_bpb=1.52),
        row(MLX, 1, "a000002", "keep", 1.45, "DEPTH 4 -> 6", tokens=2_400_000, memory_gb=3.0, holdout_bpb=1.48),
        row(MLX, 2, "a000003", "discard", 1.46, "MATRIX_LR 0.04 -> 0.06"),
        row(MLX, 3, "a000004", "crash", 0.0, "bad init"),
        row(MLX, 4, "a000005", "keep", 1.4, "WARMUP_RATIO 0.0 -> 0.1", tokens=3_150_000, memory_gb=3.5,
            holdout_bpb=1.44),
        row(MLX, 5, "a000005", "verify", 1.401, "verify a000005: WARMUP_RATIO 0.0 -> 0.1"),
        row(MLX, 6, "a000006", "discard", 1.4, "tie, discarded"),
        row(MLX, 7, "a000007", "keep", 1.4, "tie, kept by the seeds gate", holdout_bpb=1.43),
        # mps: two transfers from mlx (one discarded, one kept), then a plateau of three
        row(MPS, 0, "b000001", "keep", 2.0, "baseline", tokens=540_000),
        row(MPS, 1, "b000002", "discard", 2.01, "transfer a000002: DEPTH 4 -> 6"),
        row(MPS, 2, "b000003", "keep", 1.9, "transfer a000005: WARMUP_RATIO 0.0 -> 0.1", tokens=600_000),
        row(MPS, 3, "b000004", "discard", 1.95, "WEIGHT_DECAY 0.2 -> 0.3"),
        row(MPS, 4, "b000005", "crash", 0.0, "DEPTH 4 -> 12"),
        row(MPS, 5, "b000006", "discard", 1.91, "SCALAR_LR 0.5 -> 0.6"),
        # an H100 under the gpu profile: a transfer that crashed, a change of its own
        row(H100, 0, "c000001", "keep", 1.0, "baseline", memory_gb=44.0),
        row(H100, 1, "c000002", "crash", 0.0, "transfer a000002: DEPTH 4 -> 6"),
        row(H100, 2, "c000003", "keep", 0.98, "TOTAL_BATCH_SIZE 2**19 -> 2**18", memory_gb=44.0),
    ]


def write_ledger(path, rows, header=True):
    path.write_text(("\t".join(COLUMNS) + "\n" if header else "") + "".join(format_row(r) for r in rows))
    return path


@pytest.fixture
def ledger(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / ".autoresearch").mkdir(parents=True)
    (checkout / ".autoresearch" / "noise.json").write_text(json.dumps(
        {f"{MLX}|cpu|300": {"samples": [1.5, 1.51, 1.49], "spread": 0.01, "commit": "a000001"}}))
    return write_ledger(checkout / "results.tsv", fixture_rows())


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result


EXPECTED_MLX = {
    "hardware": MLX, "backend": "mlx", "eval_profile": "cpu", "budget": 300.0, "branch": BRANCH[MLX],
    "sandbox": "none", "agent": None,  # no turn records: the random agent, or none
    "config": "DEPTH=4,TOTAL_BATCH_SIZE=16384",
    "baseline": {"commit": "a000001", "val_bpb": 1.5, "holdout_bpb": 1.52},
    "best": {"commit": "a000005", "val_bpb": 1.4, "holdout_bpb": 1.44, "description": "WARMUP_RATIO 0.0 -> 0.1",
             "memory_gb": 3.5,
             "training_seconds": 300.0, "tokens": 3150000, "tokens_per_sec": 10500.0, "num_params_M": 11.5},
    "improvement": {"abs": 0.1, "pct": 6.6667},
    "holdout": {"baseline": 1.52, "best": 1.44, "val_gain": 0.1, "holdout_gain": 0.08, "selection_bias": 0.02},
    "counts": {"experiments": 6, "keep": 3, "discard": 2, "crash": 1, "verify": 1},
    "keep_rate": 0.5,
    "kept": [{"commit": "a000002", "description": "DEPTH 4 -> 6", "val_bpb": 1.45, "delta": -0.05,
              "holdout_bpb": 1.48},
             {"commit": "a000005", "description": "WARMUP_RATIO 0.0 -> 0.1", "val_bpb": 1.4, "delta": -0.05,
              "holdout_bpb": 1.44},
             {"commit": "a000007", "description": "tie, kept by the seeds gate", "val_bpb": 1.4, "delta": 0.0,
              "holdout_bpb": 1.43}],
    "plateau": {"k": 3, "since_last_keep": 0, "plateau": False},
    "noise": {"spread": 0.01, "runs": 3, "commit": "a000001", "improvement_in_spreads": 10.0},
}


def test_results_json_exact(ledger):
    result = invoke("results", "--ledger", str(ledger), "--json", "--plateau", "3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ledger"] == str(ledger) and data["plateau_k"] == 3
    assert [g["hardware"] for g in data["groups"]] == [MLX, MPS, H100]
    mlx, mps, h100 = data["groups"]
    assert mlx == EXPECTED_MLX
    assert mps["baseline"] == {"commit": "b000001", "val_bpb": 2.0, "holdout_bpb": None}  # rows without a holdout
    assert mps["holdout"] is None
    assert mps["best"]["commit"] == "b000003" and mps["best"]["tokens_per_sec"] == 2000.0
    assert mps["improvement"] == {"abs": 0.1, "pct": 5.0}
    assert mps["counts"] == {"experiments": 5, "keep": 1, "discard": 3, "crash": 1, "verify": 0}
    assert mps["keep_rate"] == 0.2
    assert mps["kept"] == [{"commit": "b000003", "description": "transfer a000005: WARMUP_RATIO 0.0 -> 0.1",
                            "val_bpb": 1.9, "delta": -0.1, "holdout_bpb": None}]
    assert mps["plateau"] == {"k": 3, "since_last_keep": 3, "plateau": True}
    assert mps["noise"] is None  # no noise floor stored for this hardware
    assert h100["eval_profile"] == "gpu" and h100["config"] == "-"
    assert h100["improvement"] == {"abs": 0.02, "pct": 2.0}
    assert h100["best"]["tokens_per_sec"] is None  # no token count recorded
    assert h100["counts"] == {"experiments": 2, "keep": 1, "discard": 0, "crash": 1, "verify": 0}
    assert h100["plateau"] == {"k": 3, "since_last_keep": 0, "plateau": False}
    assert len(data["notes"]) == 1 and data["notes"][0].startswith("different eval profiles (cpu, gpu)")


def test_results_default_plateau_and_text(ledger):
    data = results_summary(fixture_rows())
    assert [g["plateau"] for g in data["groups"]] == [
        {"k": 10, "since_last_keep": 0, "plateau": False}, {"k": 10, "since_last_keep": 3, "plateau": False},
        {"k": 10, "since_last_keep": 0, "plateau": False}]
    result = invoke("results", "--ledger", str(ledger))
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (MLX, MPS, H100, "1.500000", "1.400000", "6.67%", "keep rate 50.0%", "keep rate 20.0%",
                     "+0.000000", "-0.050000", "spread 0.010000 over 3 seeds", "10,500 tokens/s",
                     "(+1 verify)", "different eval profiles",
                     "baseline 1.520000, best 1.440000", "selection bias +0.020000"):
        assert expected in text, expected


def test_results_plot_png(ledger, tmp_path):
    png = tmp_path / "charts" / "progress.png"
    result = invoke("results", "--ledger", str(ledger), "--plot", str(png), "--json")
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    # three panels stacked, 4.6 inches each at 110 dpi: taller than wide
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 1000 < width < height and height > 3 * 4.6 * 110 * 0.9


def test_results_errors(tmp_path):
    bad = tmp_path / "results.tsv"
    rows = fixture_rows()[:3]
    bad.write_text("\t".join(COLUMNS) + "\n" + format_row(rows[0]) + "a000002\t1.45\tkeep\n" + format_row(rows[2]))
    result = invoke("results", "--ledger", str(bad))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {bad}:3: expected {len(COLUMNS)} tab-separated columns, found 3"
    bad.write_text("\t".join(COLUMNS) + "\n" + format_row(rows[0]).replace("\t1.5\t", "\tfast\t", 1))
    result = invoke("results", "--ledger", str(bad), "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: {bad}:2: column val_bpb is not a number: 'fast'"
    write_ledger(bad, [], header=True)
    for args in (["--ledger", str(bad)], ["--ledger", str(tmp_path / "absent.tsv"), "--json"]):
        result = invoke("results", *args)
        assert result.exit_code == 1 and "no experiments yet" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


EXPECTED_TABLE = [
    {"label": MLX, "hardware": MLX, "backend": "mlx", "config": "DEPTH=4,TOTAL_BATCH_SIZE=16384",
     "eval_profile": "cpu", "budget": 300.0, "branch": BRANCH[MLX], "sandbox": "none", "baseline": 1.5, "best": 1.4,
     "improvement_pct": 6.6667, "holdout": EXPECTED_MLX["holdout"], "experiments": 6, "keep": 3, "discard": 2, "crash": 1, "tokens_per_sec": 10500.0,
     # 6 minutes between rows (12 across the verify re-run): median 360 s; overheads 60 (360 for the crash)
     "experiments_per_hour": 10.0, "overhead_s": 60.0},
    {"label": MPS, "hardware": MPS, "backend": "mps", "config": "DEPTH=4,TOTAL_BATCH_SIZE=16384",
     "eval_profile": "cpu", "budget": 300.0, "branch": BRANCH[MPS], "sandbox": "none", "baseline": 2.0, "best": 1.9,
     "improvement_pct": 5.0, "holdout": None, "experiments": 5, "keep": 1, "discard": 3, "crash": 1, "tokens_per_sec": 2000.0,
     "experiments_per_hour": 10.0, "overhead_s": 60.0},
    {"label": H100, "hardware": H100, "backend": "cuda", "config": "-", "eval_profile": "gpu", "budget": 300.0,
     "branch": BRANCH[H100], "sandbox": "none", "baseline": 1.0, "best": 0.98, "improvement_pct": 2.0, "holdout": None,
     "experiments": 2, "keep": 1, "discard": 0, "crash": 1, "tokens_per_sec": None,
     "experiments_per_hour": None, "overhead_s": None},  # two intervals only: too few for a pace
]

UNTESTED = {"status": "untested"}
EXPECTED_MATRIX = [
    {"commit": "a000002", "description": "DEPTH 4 -> 6", "origin": MLX, "cells": {
        MLX: {"status": "kept", "commit": "a000002", "val_bpb": 1.45, "delta": -0.05},
        MPS: {"status": "discarded", "commit": "b000002", "val_bpb": 2.01, "delta": 0.01},
        H100: {"status": "crashed", "commit": "c000002", "val_bpb": None, "delta": None}}},
    {"commit": "a000005", "description": "WARMUP_RATIO 0.0 -> 0.1", "origin": MLX, "cells": {
        MLX: {"status": "kept", "commit": "a000005", "val_bpb": 1.4, "delta": -0.05},
        MPS: {"status": "kept", "commit": "b000003", "val_bpb": 1.9, "delta": -0.1},
        H100: UNTESTED}},
    {"commit": "a000007", "description": "tie, kept by the seeds gate", "origin": MLX, "cells": {
        MLX: {"status": "kept", "commit": "a000007", "val_bpb": 1.4, "delta": 0.0}, MPS: UNTESTED, H100: UNTESTED}},
    {"commit": "c000003", "description": "TOTAL_BATCH_SIZE 2**19 -> 2**18", "origin": H100, "cells": {
        MLX: UNTESTED, MPS: UNTESTED,
        H100: {"status": "kept", "commit": "c000003", "val_bpb": 0.98, "delta": -0.02}}},
]


def test_hardware_table_and_findings_matrix():
    series = series_of(fixture_rows())
    assert hardware_table(series) == EXPECTED_TABLE
    assert findings_matrix(series) == EXPECTED_MATRIX


def test_bench_report_from_ledgers_dedupes_and_notes(tmp_path):
    rows = fixture_rows()
    first = write_ledger(tmp_path / "box1.tsv", rows[:10])  # mlx and the first mps rows
    second = write_ledger(tmp_path / "box2.tsv", rows[8:])  # overlaps: rows 8 and 9 twice
    out = tmp_path / "report"
    result = invoke("bench", "report", str(first), str(second), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "(17 rows, 3 series, 4 kept changes)" in result.stdout
    md = (out / "report.md").read_text()
    assert (out / "progress.png").read_bytes()[:8] == PNG_MAGIC
    assert "17 rows from 2 sources" in md
    assert "**Note:** different eval profiles (cpu, gpu)" in md
    assert (f"| {MLX} | mlx | DEPTH=4,TOTAL_BATCH_SIZE=16384 | cpu | 300s | none | 1.500000 | 1.400000 | 6.67% | "
            "6 (3/2/1) | 10,500 | 10.0 | 60.0 |") in md
    assert f"| {H100} | cuda | – | gpu | 300s | none | 1.000000 | 0.980000 | 2.00% | 2 (1/0/1) | – | – | – |" in md
    assert f"| change | commit | {MLX} | {MPS} | {H100} |" in md
    assert ("| DEPTH 4 -> 6 | a000002 | **kept** -0.0500 (a000002) | discarded +0.0100 (b000002) | "
            "crashed (c000002) |") in md
    assert ("| WARMUP_RATIO 0.0 -> 0.1 | a000005 | **kept** -0.0500 (a000005) | **kept** -0.1000 (b000003) | "
            "untested |") in md
    # escaped, so that 2**19 -> 2**18 does not turn bold
    assert "| TOTAL_BATCH_SIZE 2\\*\\*19 -> 2\\*\\*18 | c000003 | untested | untested | **kept** -0.0200 (c000003) |" in md
    assert "![progress](progress.png)" in md
    # the holdout: the mlx series only (the others' rows carry none)
    assert f"| {MLX} | 1.520000 | 1.440000 | +0.100000 | +0.080000 | +0.020000 |" in md
    holdout = md.split("## Holdout")[1].split("\n## ")[0]
    assert holdout.count(" |\n") == 2 and "1. a000005 1.400000 (-0.050000, holdout 1.440000)" in md


def test_bench_report_errors(tmp_path):
    empty = write_ledger(tmp_path / "empty.tsv", [])
    for source, message in ((str(empty), "no experiments in this ledger"),
                            ("autoresearch/nope", "neither a ledger file nor a branch")):
        result = CliRunner().invoke(app, ["bench", "report", source, "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_bench_report_from_run_branches_notes(tmp_path, monkeypatch):
    """Rows read back from refs/notes/autoresearch of a temp repo, filtered by the branch column."""
    root = tmp_path / "repo"
    repo = one_commit_repo(root)
    rows, real = fixture_rows(), {}
    for hw in (MLX, MPS):
        repo.git.checkout("main")
        repo.git.checkout("-b", BRANCH[hw])
        for r in [r for r in rows if r.hardware == hw]:
            if r.status == "verify":  # a verify row annotates the kept commit it re-ran
                r.commit = real[r.commit]
                record(repo, r, repo.commit(r.commit))
                continue
            (root / "train.py").write_text(f"x = '{r.commit}'\n")
            repo.index.add(["train.py"])
            commit = repo.index.commit(r.description)
            real[r.commit], r.commit = commit.hexsha[:7], commit.hexsha[:7]
            for fake, sha in real.items():  # transfers name their origin's real commit
                r.description = r.description.replace(f"transfer {fake}:", f"transfer {sha}:")
            record(repo, r, commit)
    # a second row on one commit (notes append) and a row of another branch on this one's commit
    other = row(H100, 0, "c000001", "keep", 1.0, "baseline")
    record(repo, other, repo.commit(BRANCH[MPS]))
    (root / "results.tsv").unlink()  # the notes alone carry the rows
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    result = invoke("bench", "report", BRANCH[MLX], f"refs/heads/{BRANCH[MPS]}", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "(14 rows, 2 series, 3 kept changes)" in result.stdout
    md = (out / "report.md").read_text()
    assert H100 not in md and "Note:" not in md
    a2, a5 = (r.commit for r in rows if r.description in ("DEPTH 4 -> 6", "WARMUP_RATIO 0.0 -> 0.1")
              and r.hardware == MLX)
    assert f"| {MLX} | mlx | DEPTH=4,TOTAL_BATCH_SIZE=16384 | cpu | 300s | none | 1.500000 | 1.400000 | 6.67% |" in md
    assert f"| DEPTH 4 -> 6 | {a2} | **kept** -0.0500 ({a2}) | discarded +0.0100" in md
    assert f"| WARMUP_RATIO 0.0 -> 0.1 | {a5} | **kept** -0.0500 ({a5}) | **kept** -0.1000" in md
    assert (out / "progress.png").stat().st_size > 10_000


HOSTILE = ("lr up [/red] [link=http://evil.example]click[/link] \x1b]0;pwned\x07\x1b[2K\rall good "
           "\x1b]8;;http://evil.example\x1b\\harmless\x1b]8;;\x1b\\ \u202eright-to-left")


def test_outside_strings_print_as_plain_text(tmp_path):
    rows = fixture_rows()[:3] + [row(MLX, 8, "a000008", "keep", 1.3, HOSTILE)]
    led = write_ledger(tmp_path / "results.tsv", rows)
    result = CliRunner().invoke(app, ["results", "--ledger", str(led)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    shown = result.stdout
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "lr up [/red] [link=http://evil.example]click[/link]" in shown and "all good" in shown
    # a path, a source that holds markup: one plain error line, not a MarkupError
    for args in (["results", "--ledger", str(tmp_path / "absent[/red].tsv")],
                 ["bench", "report", "nope[/red]\x1b[2J", "--out", str(tmp_path / "o")]):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        line, = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and "[/red]" in line and "\x1b" not in line


def test_report_md_escapes_every_cell(tmp_path):
    from markdown_it import MarkdownIt

    evil = "<img src=x onerror=alert(1)> <b>bold</b> ![i](http://evil.example/x.png) [l](http://evil.example) a|b"
    rows = [dataclasses.replace(r, backend="ml|x <b>x</b>", branch="autoresearch/a|<img src=x>", commit=r.commit + "|`")
            for r in fixture_rows()[:3]]
    rows.append(dataclasses.replace(rows[1], commit="a000009", val_bpb=1.3, description=evil, train_hash="h9"))
    out = tmp_path / "report"
    result = invoke("bench", "report", str(write_ledger(tmp_path / "results.tsv", rows)), "--out", str(out))
    assert result.exit_code == 0, result.output
    html = MarkdownIt("commonmark").enable("table").render((out / "report.md").read_text())
    assert "<img src=\"x" not in html and "evil.example/x.png\"" not in html and "<b>" not in html and "<a " not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    for table in html.split("<table>")[1:]:
        body = table.split("</table>")[0]
        assert "<code>" not in body
        widths = {r.count("<td") for r in body.split("<tr>")[1:] if "<td" in r}
        heads = len(re.findall(r"<th[ >]", body.split("</thead>")[0]))
        assert widths <= {heads}, (widths, heads)  # a `|` in a cell stays in its cell


def test_nan_val_bpb_is_null_in_json_and_drawn(tmp_path):
    rows = fixture_rows()[:3]
    rows[0] = dataclasses.replace(rows[0], val_bpb=float("nan"))
    led = write_ledger(tmp_path / "results.tsv", rows)
    result = invoke("results", "--ledger", str(led), "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(constant)

    group, = json.loads(result.stdout, parse_constant=refuse)["groups"]
    assert group["baseline"]["val_bpb"] is None and group["improvement"] == {"abs": None, "pct": None}
    result = invoke("bench", "report", str(led), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "progress.png").read_bytes()[:8] == PNG_MAGIC


def test_many_hardware_tags_draw_a_bounded_chart(tmp_path):
    rows = []
    for t in range(40):
        hw = f"mlx-cpu-box{t:03d}-2c-24gb"
        BRANCH[hw], BACKEND[hw], PROFILE[hw] = f"autoresearch/a-{hw}", "mlx", "cpu"
        rows += [row(hw, 0, f"{t:03d}0001", "keep", 1.5, "baseline"), row(hw, 1, f"{t:03d}0002", "keep", 1.4, "x")]
    out = tmp_path / "report"
    result = invoke("bench", "report", str(write_ledger(tmp_path / "results.tsv", rows)), "--out", str(out))
    assert result.exit_code == 0, result.output
    png = (out / "progress.png").read_bytes()
    height = int.from_bytes(png[20:24], "big")
    assert height < (MAX_PANELS + 1) * 4.6 * 110  # a panel for each drawn series, not for all 40
    md = (out / "report.md").read_text()
    assert f"The chart shows the first {MAX_PANELS} of the 40 series" in md
    assert md.count("| mlx-cpu-box") >= 40  # the tables still hold every series
