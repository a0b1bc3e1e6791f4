"""setup with a baseline that measures nothing, and baseline seeds the machine slowed: real setups of tiny mlx
models trained for a few seconds on the CPU, in real git checkouts."""

import json
import os
import pickle
import re
import subprocess
import sys

import git
import pytest

from conftest import PROFILE, cli, commit_edit, quick_repo  # noqa: F401 (a fixture)
from autoresearch.branch import RunBranch
from autoresearch.experiment import SLOWED_MARK, SetupFailed, find_repeat, run_experiment, setup
from autoresearch.gate import judge_pace
from autoresearch.hardware import hardware_tag
from autoresearch.ledger import read_ledger
from autoresearch.record import record_dir
from autoresearch.settings import Run

BUDGET = 3
STEP = "        t0 = time.time()\n"  # the first line of the mlx trainer's step loop


def nothing_left(root, tag, branch="main"):
    """No run branch of tag, the checkout back on branch and clean, no row or noise floor anywhere: the ledger, the
    noise file, the harness's record of both, the git notes."""
    repo = git.Repo(root)
    assert not [h.name for h in repo.heads if h.name.startswith(f"autoresearch/{tag}-")]
    assert repo.active_branch.name == branch and not repo.is_dirty(untracked_files=True)
    ledger, noise = root / "results.tsv", root / ".autoresearch/noise.json"
    assert not ledger.exists() or read_ledger(ledger) == []
    assert not noise.exists() or json.loads(noise.read_text()) == {}
    record = record_dir(root)
    assert not (record / "results.tsv").exists() or read_ledger(record / "results.tsv") == []
    assert not (record / ".autoresearch__noise.json").exists()
    assert "refs/notes/autoresearch" not in repo.git.for_each_ref("--format=%(refname)")


def test_a_baseline_that_measures_nothing_sets_up_nothing(quick_repo):
    # each step takes 2 s (a model too slow for the time it is given): with --timeout 4 the baseline is a crash
    commit_edit(quick_repo, "slow steps", STEP, STEP + "        time.sleep(2.0)\n")
    args = ["--backend", "mlx", "setup", "--tag", "a", "--budget", "1", "--noise-runs", "1", "--no-calibrate"]
    proc = cli(quick_repo, *args, "--timeout", "4")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    name = f"autoresearch/a-{hardware_tag('mlx')}"
    assert re.match(rf"error: setup failed: the baseline is crash \(timeout\); log tail in "
                    rf"\.autoresearch/last_crash\.log; branch {re.escape(name)} removed, back on main, nothing "
                    rf"recorded", errors[0]), errors[0]
    assert "RESULT" not in proc.stdout
    nothing_left(quick_repo, "a")
    # the same setup with time enough: set up, its baseline recorded
    proc = cli(quick_repo, *args, "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("RESULT keep val_bpb=")
    rows = read_ledger(quick_repo / "results.tsv")
    assert [(r.description, r.status, r.branch) for r in rows] == [("baseline", "keep", name)]
    assert git.Repo(quick_repo).active_branch.name == name


def test_a_crashing_baseline_raises_setup_failed_for_the_swarm(quick_repo):
    """The swarm's workers call setup(): what they get is one exception, a Refused, that survives pickling."""
    commit_edit(quick_repo, "raise", "def main():\n", "def main():\n    raise RuntimeError('broken on purpose')\n")
    with pytest.raises(SetupFailed) as caught:
        setup(Run.resolve(quick_repo, "mlx", BUDGET), "w", noise_runs=2, say=lambda text: None)
    e = caught.value
    assert e.status == "crash" and "\n" not in str(e) and "the baseline is crash (exit 1)" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is SetupFailed and str(again) == str(e) and again.status == "crash"
    assert "broken on purpose" in (quick_repo / ".autoresearch/last_crash.log").read_text()
    nothing_left(quick_repo, "w")


def test_the_pace_rule():
    assert judge_pace(737, 6538).slowed and not judge_pace(6000, 6538).slowed
    assert judge_pace(737, 6538).reason == "737 tokens/s vs typical 6,538 (below 0.7 x = 4,577)"
    assert not judge_pace(None, 6538).slowed and not judge_pace(737, None).slowed


def test_b_a_slowed_seed_does_not_set_the_noise_floor(quick_repo):
    # seed 43 sleeps 2 s in every step, on its first run and its second: a fraction of the others' tokens/s, even
    # where a loaded machine makes a step of this model take a second
    commit_edit(quick_repo, "seed 43 is slow", STEP,
                STEP + "        if os.environ.get('AUTORESEARCH_SEED') == '43':\n            time.sleep(2.0)\n")
    said = []
    outcome = setup(Run.resolve(quick_repo, "mlx", BUDGET), "b", noise_runs=3, say=said.append)
    print("\n".join([*said, outcome.message]))  # shown with pytest -s
    assert outcome.status == "keep", outcome.message
    flags = [line for line in said if line.startswith("seed 43 slowed")]
    assert len(flags) == 2, said
    assert re.match(r"seed 43 slowed by the machine: [\d,]+ tokens/s vs typical [\d,]+ \(below 0\.7 x = [\d,]+\); "
                    r"running it again$", flags[0]), flags[0]
    assert re.match(r"seed 43 slowed again: [\d,]+ tokens/s vs typical", flags[1]), flags[1]
    # on a machine busy with other jobs, seed 42 or 44 can be slowed too (really): each one flagged is left out
    left_out = outcome.message.count("slowed by the machine, ")
    assert "seed 43 slowed by the machine, " in outcome.message and 1 <= left_out <= 2, outcome.message
    noise = json.loads((quick_repo / ".autoresearch/noise.json").read_text()) if left_out == 1 else {}
    if left_out == 2:  # one seed left: no noise floor, and the line says why
        assert re.search(r"; noise floor unreliable, not recorded: only 1 of 3 seeds ran at the machine's typical "
                         r"speed \(seed 4[234] slowed by the machine, ", outcome.message), outcome.message
        assert not (quick_repo / ".autoresearch/noise.json").exists()
        return
    assert re.search(r"noise floor: spread [\d.]+ over 2 seeds \(left out: seed 43 slowed by the machine, [\d,]+ "
                     r"tokens/s vs typical [\d,]+ \(below 0\.7 x = [\d,]+\)\)\)", outcome.message), outcome.message
    (entry,) = noise.values()
    baseline = read_ledger(quick_repo / "results.tsv")[0]
    assert len(entry["samples"]) == 2 and entry["samples"] == pytest.approx(baseline.values(), abs=1e-6)
    assert json.loads((record_dir(quick_repo) / ".autoresearch__noise.json").read_text()) == noise


def busy_loops(cores, per_core=3):
    """Processes that spin on each of these cores, each pinned to its core: another job taking the machine."""
    code = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code, str(c)]) for c in sorted(cores) for _ in range(per_core)]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning processes to cores needs Linux")
def test_b_a_seed_slowed_by_another_job_runs_again(quick_repo):
    """A real load for the first run of seed 43 only: it is flagged and run again; the noise floor comes from runs
    the load did not slow."""
    load, seen = [], []

    def on_line(text):
        if not text.startswith("=== mlx seed "):
            return
        seen.append(text.split()[3])
        for p in load:  # the run the load was for has ended
            p.kill()
            p.wait()
        load.clear()
        if seen == ["42", "43"]:
            load.extend(busy_loops(os.sched_getaffinity(0)))

    said = []
    try:
        outcome = setup(Run.resolve(quick_repo, "mlx", BUDGET), "c", noise_runs=3, on_line=on_line, say=said.append)
    finally:
        for p in load:
            p.kill()
            p.wait()
    assert outcome.status == "keep", outcome.message
    assert seen[:3] == ["42", "43", "44"] and "43" in seen[3:], seen  # seed 43 ran again after the three
    assert re.match(r"seed 43 slowed by the machine: [\d,]+ tokens/s vs typical", said[0]), said
    # the noise floor comes from the seeds that ran at the typical speed, and says which were left out
    noise = json.loads((quick_repo / ".autoresearch/noise.json").read_text())
    (entry,) = noise.values()
    left_out = outcome.message.count("slowed by the machine")
    assert len(entry["samples"]) == 3 - left_out and f"over {3 - left_out} seeds" in outcome.message


def test_an_experiment_the_machine_slowed_runs_again_and_is_no_repeat(quick_repo):
    setup(Run.resolve(quick_repo, "mlx", BUDGET), "e", noise_runs=1, say=lambda text: None)
    train = quick_repo / "backends/mlx/train.py"
    source = train.read_text()
    slow = source.replace(STEP, STEP + "        time.sleep(2.0)\n")
    train.write_text(slow)
    outcome = run_experiment(Run.resolve(quick_repo, "mlx", BUDGET), "slow steps", say=lambda text: None)
    assert re.search(r" \[seed 42 slowed by the machine \([\d,]+ tokens/s vs typical [\d,]+ \(below 0\.7 x = "
                     r"[\d,]+\)\), run again: slowed again, [\d,]+ tokens/s", outcome.message), outcome.message
    row = read_ledger(quick_repo / "results.tsv")[-1]
    assert row.description.startswith(f"slow steps {SLOWED_MARK} ") and row.status in ("keep", "discard")
    if row.status == "discard":  # judged at a speed the machine may have imposed: the same program may run again
        train.write_text(slow)
        branch = RunBranch(git.Repo(quick_repo), Run(quick_repo, "mlx", float(BUDGET), PROFILE))
        assert find_repeat(branch) is None
