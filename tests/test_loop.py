"""The experiment loop on real git repositories with real CPU training runs (a few seconds each)."""

import os
import re
import subprocess
import sys
import textwrap

import git
import pytest

from conftest import cli, PROFILE
from autoresearch.agents import CommandAgent, RandomAgent
from autoresearch.experiment import Refused, open_repo, run_experiment, setup
from autoresearch.hardware import hardware_tag
from autoresearch.hparams import set_constants
from autoresearch.ledger import COLUMNS, read_ledger
from autoresearch.loop import TurnRules, run_loop
from autoresearch.settings import Run

BUDGET = 3



def check_ledger_and_branch(root, backend, n_rows):
    repo = git.Repo(root)
    rows = read_ledger(root / "results.tsv")
    header = (root / "results.tsv").read_text().splitlines()[0].split("\t")
    assert header[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"] and header == COLUMNS
    assert len(rows) == n_rows
    assert rows[0].description == "baseline" and rows[0].status == "keep"
    for r in rows:
        assert r.hardware == hardware_tag(backend) and r.backend == backend and r.eval_profile == PROFILE
        assert r.budget == BUDGET and r.seed == 42 and r.timestamp and len(r.train_hash) == 16
        assert r.branch == repo.active_branch.name
        if r.status != "crash":
            assert r.val_bpb > 0 and r.num_steps > 0 and r.tokens > 0 and r.training_seconds > 0
    kept = [r for r in rows if r.status == "keep"]
    # the branch sits at the last keep; every discard and crash was reverted
    assert repo.head.commit.hexsha.startswith(kept[-1].commit)
    ancestry = {c.hexsha[:7] for c in repo.iter_commits()}
    assert all(r.commit in ancestry for r in kept)
    assert not any(r.commit in ancestry for r in rows if r.status != "keep")
    assert not repo.is_dirty(untracked_files=True)
    # greedy keeps are strictly improving
    vals = [r.val_bpb for r in kept]
    assert vals == sorted(vals, reverse=True) and len(set(vals)) == len(vals)
    return rows


def test_random_loop_mlx_through_the_cli(run_repo):
    proc = cli(run_repo, "--backend", "mlx", "setup", "--tag", "t1", "--budget", str(BUDGET),
               "--noise-runs", "2", "--no-calibrate")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("RESULT keep")
    # piped, progress comes as plain lines on stderr, each seed's first step at least; stdout stays the contract's
    for seed in (1, 2):
        assert re.search(rf"^progress: baseline \| seed {seed}/2 \| step \d+ \(\d+% of {BUDGET}s\) \| loss [\d.]+ \| "
                         rf"[\d,]+ tok/s \| eta \d+m\d\ds$", proc.stderr, re.M), proc.stderr
    assert "progress:" not in proc.stdout
    proc = cli(run_repo, "--backend", "mlx", "loop", "--agent", "random", "-n", "5", "--budget", str(BUDGET))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "loop ended: 5 experiments" in proc.stdout
    trained = re.findall(r"^turn (\d+): RESULT (?!repeat)", proc.stdout, re.M)
    assert trained and all(f"progress: experiment {n} | seed 1/1 | step" in proc.stderr for n in trained)
    repeats = int(proc.stdout.split(" repeat")[0].rsplit(" ", 1)[-1])  # never-repeat answers add no row
    rows = check_ledger_and_branch(run_repo, "mlx", 6 - repeats)
    assert all(" -> " in r.description for r in rows[1:])  # the random agent says what it changed
    assert git.Repo(run_repo).active_branch.name == f"autoresearch/t1-{hardware_tag('mlx')}"
    proc = cli(run_repo, "results")
    assert proc.returncode == 0 and hardware_tag("mlx") in proc.stdout


def test_random_loop_mps_with_injected_crash(run_repo):
    setup(Run.resolve(run_repo, "mps", BUDGET), "t2", noise_runs=1)
    outcomes = run_loop(Run.resolve(run_repo, "mps", BUDGET), RandomAgent(seed=1), TurnRules(max_experiments=4),
                        on_event=lambda t: None)
    assert len(outcomes) == 4
    repeats = sum(o.status == "repeat" for o in outcomes)
    kept_source = (run_repo / "backends/mps/train.py").read_text()
    # an agent edit that raises: recorded as a crash with its log tail, and reverted
    injector = run_repo.parent / "inject.py"
    injector.write_text(textwrap.dedent("""
        from pathlib import Path
        p = Path("backends/mps/train.py")
        p.write_text(p.read_text().replace("def main():", "def main():\\n    raise RuntimeError('injected by agent')", 1))
        Path(".autoresearch/description").write_text("inject a crash\\n")
    """))
    outcome, = run_loop(Run.resolve(run_repo, "mps", BUDGET), CommandAgent(f"{sys.executable} {injector}"),
                        TurnRules(max_experiments=1), on_event=lambda t: None)
    assert outcome.status == "crash" and outcome.row.description == "inject a crash"
    assert "injected by agent" in (run_repo / ".autoresearch" / "last_crash.log").read_text()
    assert (run_repo / "backends/mps/train.py").read_text() == kept_source
    rows = check_ledger_and_branch(run_repo, "mps", 6 - repeats)
    assert rows[-1].status == "crash" and rows[-1].val_bpb == 0.0


def test_refusals_change_nothing(run_repo):
    setup(Run.resolve(run_repo, "mlx", BUDGET), "t3", noise_runs=1)
    repo = git.Repo(run_repo)
    head, ledger = repo.head.commit.hexsha, (run_repo / "results.tsv").read_text()
    train = run_repo / "backends/mlx/train.py"
    # nothing edited
    proc = cli(run_repo, "--backend", "mlx", "run", "-m", "nothing", "--budget", str(BUDGET))
    assert proc.returncode == 2 and "is unchanged" in proc.stderr
    # the evaluator edited alongside train.py
    train.write_text(set_constants(train.read_text(), {"DEPTH": 3}))
    (run_repo / "prepare.py").write_text((run_repo / "prepare.py").read_text() + "\n# better metric\n")
    proc = cli(run_repo, "--backend", "mlx", "run", "-m", "sneaky", "--budget", str(BUDGET))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prepare.py" in errors[0]
    assert repo.head.commit.hexsha == head and (run_repo / "results.tsv").read_text() == ledger
    # the other backend's file is "another file" too
    repo.git.checkout("--", "prepare.py")
    with pytest.raises(Refused, match="baseline was measured on mlx"):  # an mlx branch: mps is another series
        run_experiment(Run.resolve(run_repo, "mps", BUDGET), "wrong backend")
    # setup refuses a dirty tree and an existing branch
    with pytest.raises(Refused, match="uncommitted changes"):
        setup(Run.resolve(run_repo, "mlx", BUDGET), "t4", noise_runs=1)
    repo.git.checkout("--", ".")
    with pytest.raises(Refused, match="already exists"):
        setup(Run.resolve(run_repo, "mlx", BUDGET), "t3", noise_runs=1)
    assert repo.head.commit.hexsha == head


def test_agents_that_do_not_deliver_are_logged_and_skipped(run_repo):
    setup(Run.resolve(run_repo, "mlx", BUDGET), "t5", noise_runs=1)
    repo = open_repo(run_repo)
    head = repo.head.commit.hexsha
    events = []
    agents = [
        CommandAgent(f"{sys.executable} -c pass"),  # edits nothing
        CommandAgent(f"{sys.executable} -c \"open('prepare.py', 'a').write('#')\""),  # wrong file
        CommandAgent(f"{sys.executable} -c \"import time; time.sleep(30)\""),  # too slow
        CommandAgent(f"{sys.executable} -c \"import sys; sys.exit(3)\""),  # fails
        CommandAgent(f"{sys.executable} -c \"open('notes.txt', 'w').write('x')\""),  # new file
    ]
    for agent in agents:
        assert run_loop(Run.resolve(run_repo, "mlx", BUDGET), agent, TurnRules(max_experiments=1, agent_timeout=2),
                        on_event=events.append) == []
    assert len(events) == 5 and all("produced no experiment" in e for e in events)
    assert "unchanged" in events[0] and "prepare.py" in events[1] and "timed out" in events[2]
    assert "exited with 3" in events[3] and "notes.txt" in events[4]
    assert repo.head.commit.hexsha == head and not repo.is_dirty(untracked_files=True)
    assert len(read_ledger(run_repo / "results.tsv")) == 1
    assert "produced no experiment" in (run_repo / ".autoresearch" / "loop.log").read_text()


def test_prompt_carries_program_best_and_the_run_so_far(run_repo):
    from autoresearch.loop import build_prompt

    setup(Run.resolve(run_repo, "mlx", BUDGET), "t6", noise_runs=1)
    prompt = build_prompt(run_repo, "mlx", BUDGET)
    assert "Never stop" in prompt and "backends/mlx/train.py" in prompt
    best = read_ledger(run_repo / "results.tsv")[0]
    assert f"val_bpb {best.val_bpb:.6f} at commit {best.commit}" in prompt
    assert "## The run so far: 0 experiments after the baseline" in prompt
    assert f"- {best.commit} baseline val_bpb {best.val_bpb:.6f}" in prompt  # the kept path starts there
