"""`autoresearch transfer` between two run branches of a temporary repository, with real CPU trainings of a
few seconds, and the bench report of both branches read back from their git notes."""

import re

import git
import pytest
from typer.testing import CliRunner

import autoresearch.experiment as experiment
from autoresearch.cli import app
from autoresearch.experiment import run_experiment, setup
from autoresearch.gate import Decision, Gate
from autoresearch.hardware import hardware_tag
from autoresearch.hparams import read_constants, set_constants
from autoresearch.ledger import read_ledger
from autoresearch.report import bench_report
from autoresearch.transfer import target_budget, transfer
from autoresearch.settings import Run

BUDGET = 2
GREEDY = Gate("greedy")



@pytest.fixture
def always_keep(monkeypatch):
    """Every candidate is kept whatever its val_bpb: the test is about rows and cells, not about luck."""
    monkeypatch.setattr(experiment, "decide", lambda gate, c, b, s: Decision(True, False, "forced keep (test)"))


def edit(root, backend, **constants):
    path = root / "backends" / backend / "train.py"
    path.write_text(set_constants(path.read_text(), constants))


def test_transfer_between_run_branches(run_repo, always_keep, monkeypatch):
    root, repo = run_repo, git.Repo(run_repo)
    tag = hardware_tag("mlx")
    # branch A: a baseline and two kept changes
    setup(Run.resolve(root, "mlx", BUDGET), "a", noise_runs=1)
    branch_a = f"autoresearch/a-{tag}"
    edit(root, "mlx", MATRIX_LR=0.05)
    first = run_experiment(Run.resolve(root, "mlx", BUDGET, gate=GREEDY), "MATRIX_LR 0.04 -> 0.05")
    edit(root, "mlx", WARMUP_RATIO=0.1)
    second = run_experiment(Run.resolve(root, "mlx", BUDGET, gate=GREEDY), "WARMUP_RATIO 0.0 -> 0.1")
    assert (first.status, second.status) == ("keep", "keep")
    c1, c2 = first.row.commit, second.row.commit
    # main moves on where A's second change edits: that one will not apply on B
    repo.git.checkout("main")
    edit(root, "mlx", WARMUP_RATIO=0.05)
    repo.index.add(["backends/mlx/train.py"])
    repo.index.commit("warmup on main")
    setup(Run.resolve(root, "mlx", BUDGET), "b", noise_runs=1)
    branch_b = f"autoresearch/b-{tag}"
    base_b = repo.head.commit.hexsha

    # a different backend: nothing applies, nothing runs (through the CLI: the outcome table)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["transfer", "--from", branch_a, "--backend", "mps"])
    assert result.exit_code == 0, result.output
    assert f"{c1}: not applicable (backend mlx)" in result.stdout
    assert f"{c2}: not applicable (backend mlx)" in result.stdout
    assert f"transfer from {branch_a}" in result.stdout and c1 in result.stdout and c2 in result.stdout
    assert repo.head.commit.hexsha == base_b and len(read_ledger(root / "results.tsv")) == 4

    seen = []
    results = transfer(Run.resolve(root, "mlx", fallback=target_budget(root), gate=GREEDY), branch_a,
                       on_result=seen.append)  # budget: B's baseline's
    assert seen == results
    assert [(t.origin, t.description, t.source_commit, t.outcome) for t in results] == [
        (c1, "MATRIX_LR 0.04 -> 0.05", c1, "keep"),
        (c2, "WARMUP_RATIO 0.0 -> 0.1", c2, "not applicable (conflict)")]
    row = results[0].row
    assert row.description == f"transfer {c1}: MATRIX_LR 0.04 -> 0.05"
    assert row.branch == branch_b and row.status == "keep" and row.budget == BUDGET and row.hardware == tag
    assert results[1].row is None and "does not apply" in results[1].message
    # B advanced by exactly the transferred change; the conflicting one left nothing behind
    assert repo.active_branch.name == branch_b and repo.head.commit.hexsha.startswith(row.commit)
    assert repo.head.commit.parents[0].hexsha == base_b
    assert not repo.is_dirty(untracked_files=True)
    constants = read_constants((root / "backends/mlx/train.py").read_text())
    assert constants["MATRIX_LR"] == 0.05 and constants["WARMUP_RATIO"] == 0.05
    rows = read_ledger(root / "results.tsv")
    assert [(r.branch, r.status, r.description) for r in rows] == [
        (branch_a, "keep", "baseline"), (branch_a, "keep", "MATRIX_LR 0.04 -> 0.05"),
        (branch_a, "keep", "WARMUP_RATIO 0.0 -> 0.1"), (branch_b, "keep", "baseline"),
        (branch_b, "keep", f"transfer {c1}: MATRIX_LR 0.04 -> 0.05")]
    # transferring again: the first change is already here, the second still conflicts; nothing runs
    again = transfer(Run.resolve(root, "mlx", fallback=target_budget(root), gate=GREEDY), branch_a)
    assert [t.outcome for t in again] == ["not applicable (no change here)", "not applicable (conflict)"]
    assert len(read_ledger(root / "results.tsv")) == 5

    # the bench report of both branches, from their git notes alone
    (root / "results.tsv").unlink()
    report = bench_report([branch_a, branch_b], root / "report", repo)
    assert len(report["rows"]) == 5
    a_label, b_label = f"{tag} (a)", f"{tag} (b)"  # one hardware tag twice: columns named with the run's tag
    assert [t["label"] for t in report["table"]] == [a_label, b_label]
    assert report["notes"] == [f"{tag} has 2 series (different run branches): each has its own baseline, and "
                               "keep/discard compared results within one series only"]
    assert [(t["experiments"], t["keep"], t["discard"], t["crash"]) for t in report["table"]] == [
        (2, 2, 0, 0), (1, 1, 0, 0)]
    matrix = report["matrix"]
    assert [(c["commit"], c["description"], c["origin"]) for c in matrix] == [
        (c1, "MATRIX_LR 0.04 -> 0.05", a_label), (c2, "WARMUP_RATIO 0.0 -> 0.1", a_label)]
    assert [c["cells"][a_label]["status"] for c in matrix] == ["kept", "kept"]
    assert matrix[0]["cells"][b_label]["status"] == "kept" and matrix[0]["cells"][b_label]["commit"] == row.commit
    assert matrix[1]["cells"][b_label] == {"status": "untested"}
    md = (root / "report" / "report.md").read_text()
    assert re.search(rf"\| MATRIX_LR 0.04 -> 0.05 \| {c1} \| \*\*kept\*\* [-+]\d\.\d{{4}} \({c1}\) \| "
                     rf"\*\*kept\*\* [-+]\d\.\d{{4}} \({row.commit}\) \|", md)
    assert re.search(rf"\| WARMUP_RATIO 0.0 -> 0.1 \| {c2} \| \*\*kept\*\* [-+]\d\.\d{{4}} \({c2}\) \| untested \|", md)
    assert (root / "report" / "progress.png").read_bytes()[:4] == b"\x89PNG"


def test_transfer_refusals(run_repo):
    root, repo = run_repo, git.Repo(run_repo)
    with pytest.raises(experiment.Refused, match="not on a run branch"):
        transfer(Run.resolve(root, "mlx", BUDGET), "main")
    repo.git.checkout("-b", "autoresearch/x")
    with pytest.raises(experiment.Refused, match="no such branch"):
        transfer(Run.resolve(root, "mlx", BUDGET), "autoresearch/none")
    with pytest.raises(experiment.Refused, match="no kept experiments"):
        transfer(Run.resolve(root, "mlx", BUDGET), "main")
    with pytest.raises(experiment.Refused, match="is the branch checked out"):
        transfer(Run.resolve(root, "mlx", BUDGET), "autoresearch/x")
    edit(root, "mlx", DEPTH=3)
    with pytest.raises(experiment.Refused, match="uncommitted changes"):
        transfer(Run.resolve(root, "mlx", BUDGET), "main")
