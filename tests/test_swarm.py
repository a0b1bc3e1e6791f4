"""The swarm on a local Ray cluster of this CPU: two workers (a core each), real clones, real training runs of a few
seconds, a worker's process killed mid-run, the driver stopped by SIGTERM. The merge rules of the driver's branch
are also tested without Ray, on real repositories."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import git
import pytest

from conftest import BUDGET, cli, commit_edit, copy_checkout, make_repo
from autoresearch.branch import open_branch
from autoresearch.experiment import train_hash
from autoresearch.settings import Run
from autoresearch.gate import Gate
from autoresearch.hparams import read_constants, set_constants
from autoresearch.ledger import format_row, notes_rows, read_ledger
from autoresearch.turns import load_turns
from test_faults import alive

pytestmark = pytest.mark.serial  # Ray places a worker per share of the cores

pytest.importorskip("ray")

# A baseline that barely learns (every learning rate / 100), so that restoring them is a sure keep
SLOW = {"EMBEDDING_LR": 0.006, "UNEMBEDDING_LR": 0.00004, "MATRIX_LR": 0.0004, "SCALAR_LR": 0.005}
GOOD = {"EMBEDDING_LR": 0.6, "UNEMBEDDING_LR": 0.004, "MATRIX_LR": 0.04, "SCALAR_LR": 0.5}

# The agent: worker w0's first turn restores the learning rates; every other turn moves WARMDOWN_RATIO at random
AGENT = """
import pathlib, random
from autoresearch.hparams import read_constants, set_constants
path = pathlib.Path("backends/mlx/train.py")
source = path.read_text()
if pathlib.Path.cwd().name == "w0" and read_constants(source)["MATRIX_LR"] == {slow}:
    change, text = "restore the learning rates", set_constants(source, {good})
else:
    value = round(random.uniform(0.2, 0.8), 4)
    change, text = f"WARMDOWN_RATIO {{value}}", set_constants(source, {{"WARMDOWN_RATIO": value}})
path.write_text(text)
pathlib.Path(".autoresearch/description").write_text(change)
""".format(slow=SLOW["MATRIX_LR"], good=GOOD)


def swarm_args(*extra):
    return ("--backend", "mlx", "swarm", "--workers", 2, "--budget", BUDGET, "--gate", "greedy", *extra)


@pytest.fixture(scope="session")
def swarm_template(tmp_path_factory, cpu_cache):
    """A checkout whose run branch the swarm set up on worker 0 (one core: the workers' hardware)."""
    root = make_repo(tmp_path_factory.mktemp("swarm") / "project", backends=("mlx",))
    train = root / "backends/mlx/train.py"
    train.write_text(set_constants(train.read_text(), SLOW))
    repo = git.Repo(root)
    repo.index.add(["backends/mlx/train.py"])
    repo.index.commit("slow learning rates")
    proc = cli(root, *swarm_args("--agent", "random", "--tag", "s", "--noise-runs", 1, "--no-calibrate", "-n", 0),
               env={"AUTORESEARCH_CACHE": str(cpu_cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "set up on the workers' hardware" in proc.stdout
    share = len(os.sched_getaffinity(0)) // 2
    assert repo.active_branch.name.startswith("autoresearch/s-mlx-cpu-") and f"-{share}c-" in repo.active_branch.name
    return root


@pytest.fixture
def swarm_dir(swarm_template, tmp_path, use_cache):
    return copy_checkout(swarm_template, tmp_path)


def check_driver(root):
    """The driver's branch at the swarm's best and its last keep; clean; the ledger equal to the notes."""
    repo = git.Repo(root)
    rows = read_ledger(root / "results.tsv")
    kept = [r for r in rows if r.status == "keep"]
    best = min(kept, key=lambda r: r.val_bpb)
    assert repo.head.commit.hexsha.startswith(kept[-1].commit) and kept[-1] is best
    assert not repo.is_dirty(untracked_files=True)
    assert sorted(format_row(r) for r, _ in notes_rows(repo)) == sorted(format_row(r) for r in rows)
    return rows


class Driver:
    """`autoresearch swarm` in a fresh process, its output read as it comes."""

    def __init__(self, root, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "autoresearch", *map(str, swarm_args(*args))], cwd=root,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def workers(self, timeout=120):
        """{worker: (pid of its Ray process, its clone)} once both have said where they run."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = {line.split(":")[0]: (int(line.split()[2]), Path(line.split("clone ")[1].strip()))
                     for line in list(self.lines) if line.startswith(("w0: pid", "w1: pid"))}
            if len(found) == 2:
                return found
            time.sleep(0.1)
        raise AssertionError("the workers never started:\n" + self.text())

    def text(self):
        return "".join(self.lines)

    def wait(self, timeout=600):
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return self.proc.returncode


def trainer_of(clone, timeout=120):
    """The pid of the trainer running in a worker's clone, once there is one."""
    pid_file = clone / ".autoresearch/trainer.pid"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            time.sleep(0.05)
    raise AssertionError(f"no trainer started in {clone}")


def test_two_workers_share_the_best_and_a_killed_worker_recovers(swarm_dir, tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    driver = Driver(swarm_dir, "--agent", f"{sys.executable} {agent}", "-n", 6)
    workers = driver.workers()
    killed = trainer_of(workers["w1"][1])  # w1 trains its first experiment: kill its Ray process (the actor)
    os.kill(workers["w1"][0], signal.SIGKILL)
    # a second driver on this checkout would share the workers' clones: refused at once, before Ray starts
    started = time.time()
    second = cli(swarm_dir, *swarm_args("--agent", "random"))
    assert second.returncode == 2 and "another harness works on this checkout" in second.stderr, second.stderr
    assert time.time() - started < 30 and driver.proc.poll() is None
    assert driver.wait() == 0, driver.text()
    text = driver.text()
    assert not alive(killed), text
    assert "w1: RESULT lost (worker w1 died)" in text and "Ray restarts it" in text
    assert "adopts the swarm's best" in text
    assert re.search(r"^progress: w[01] turn \d+ step \d+ \(\d+% of 3s\)", text, re.M)  # on stderr, while they train

    rows = check_driver(swarm_dir)
    swarm_rows = [r for r in rows if r.worker != "-"]
    measured = [r for r in swarm_rows if r.status != "lost"]
    assert len(measured) == 6 and {r.worker for r in measured} == {"w0", "w1"}, text
    lost = [r for r in swarm_rows if r.status == "lost"]
    assert len(lost) == 1 and lost[0].worker == "w1" and "[lost: worker w1 died]" in lost[0].description
    assert any(r.worker == "w1" for r in swarm_rows[swarm_rows.index(lost[0]) + 1:])  # w1 ran again after its death
    assert len({r.train_hash for r in measured}) == len(measured)  # no program twice
    # w0's first turn restored the learning rates: kept, and the branch's best descends from it
    repo = git.Repo(swarm_dir)
    restored = next(r for r in measured if r.description == "restore the learning rates")
    assert restored.status == "keep" and restored.worker == "w0"
    assert read_constants((swarm_dir / "backends/mlx/train.py").read_text())["MATRIX_LR"] == GOOD["MATRIX_LR"]
    # adopted: w1 ran an experiment on top of w0's keep (its commit's parent is a commit w0 kept)
    w0_kept = {r.commit for r in measured if r.worker == "w0" and r.status == "keep"}
    assert any(repo.commit(r.commit).parents[0].hexsha[:7] in w0_kept for r in measured if r.worker == "w1")


def test_sigterm_stops_every_trainer_and_leaves_the_branch_at_its_last_keep(swarm_dir):
    head = git.Repo(swarm_dir).head.commit.hexsha
    driver = Driver(swarm_dir, "--agent", "random")
    trainers = [trainer_of(clone) for _, clone in driver.workers().values()]
    driver.proc.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=120) == 143, driver.text()
    assert "stopped 2 training run(s) in flight" in driver.text()
    assert not any(alive(pid) for pid in trainers)
    assert git.Repo(swarm_dir).head.commit.hexsha == head
    assert len(check_driver(swarm_dir)) == 1  # nothing in flight was recorded


def test_refusals_are_one_line_and_change_nothing(swarm_dir):
    head = git.Repo(swarm_dir).head.commit.hexsha
    proc = cli(swarm_dir, *swarm_args("--agent", "random", "--workers", 0))
    assert proc.returncode == 2 and "--workers must be a whole number >= 1, got 0" in proc.stderr
    (swarm_dir / "notes.txt").write_text("mine")
    proc = cli(swarm_dir, *swarm_args("--agent", "random"))
    assert proc.returncode == 2 and "uncommitted changes (notes.txt)" in proc.stderr
    assert (swarm_dir / "notes.txt").read_text() == "mine" and git.Repo(swarm_dir).head.commit.hexsha == head
    # without Ray installed: the extra to install
    code = ("import sys; sys.modules['ray'] = None\nfrom autoresearch.swarm import Plan, run_swarm\n"
            "from autoresearch.settings import Run\n"
            "try:\n    run_swarm(Run.resolve('.', 'mlx', 3), Plan(2))\nexcept Exception as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], cwd=swarm_dir, capture_output=True, text=True, timeout=60)
    assert "pip install -e '.[swarm]'" in done.stdout, done.stdout + done.stderr


def test_a_whole_machine_run_branch_is_another_series_than_the_workers(repo_dir):
    """`setup` measured its baseline on every core; a worker has half of them: never compared."""
    proc = cli(repo_dir, *swarm_args("--agent", "random", "-n", 1))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"-{os.cpu_count()}c-" in proc.stderr and "the workers measure on mlx-cpu-" in proc.stderr
    said = [line for line in proc.stderr.strip().splitlines() if not line.startswith("sandbox: ")]  # said once
    assert "--tag TAG" in proc.stderr and len(said) == 1
    assert len(read_ledger(repo_dir / "results.tsv")) == 1


def test_a_cluster_node_without_the_data_stops_the_swarm_before_any_experiment(swarm_dir, tmp_path):
    """`--address auto` joins the cluster `ray start` made on this node, whose workers use that node's own cache
    (AUTORESEARCH_CACHE of `ray start`'s environment): an unprepared one stops the swarm in one line."""
    ray_cli = Path(sys.executable).with_name("ray")
    empty = tmp_path / "node-cache"
    started = subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--include-dashboard=false",
                              "--disable-usage-stats"], env=dict(os.environ, AUTORESEARCH_CACHE=str(empty)),
                             capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        head = git.Repo(swarm_dir).head.commit.hexsha
        proc = cli(swarm_dir, *swarm_args("--agent", "random", "-n", 1, "--address", "auto"))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "error: worker w0 on " in proc.stderr and f"no prepared data in {empty}" in proc.stderr
        assert "AUTORESEARCH_CACHE in the environment of `ray start`" in proc.stderr
        assert git.Repo(swarm_dir).head.commit.hexsha == head and len(read_ledger(swarm_dir / "results.tsv")) == 1
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=180)


# ---------------------------------------------------------------------------
# The driver's merge rules, without Ray: real repositories, rows as a worker returns them


def worker_commit(clone, base, values, description):
    """A commit of the worker's clone on top of base (its train.py edited) and the row it would report."""
    from autoresearch.swarm import OUT_REF, Report, make_bundle

    repo = git.Repo(clone)
    repo.git.checkout("--force", base)
    train = clone / "backends/mlx/train.py"
    train.write_text(set_constants(train.read_text(), values))
    repo.index.add(["backends/mlx/train.py"])
    commit = repo.index.commit(description)
    repo.git.update_ref(OUT_REF, commit.hexsha)
    return commit, make_bundle(repo, OUT_REF, f"^{base}"), train_hash(train.read_text())


def test_a_stale_keep_is_judged_again_against_the_moved_best(swarm_dir, tmp_path):
    from autoresearch.swarm import Report, absorb

    driver = git.Repo(swarm_dir)
    base = driver.head.commit.hexsha
    clone = tmp_path / "clone"
    git.Repo.clone_from(swarm_dir, clone)
    with open_branch(Run.resolve(swarm_dir, "mlx", BUDGET, gate=Gate("greedy")), "test", say=print,
                     hardware=read_ledger(swarm_dir / "results.tsv")[0].hardware) as branch:
        template = branch.best()

        def report(values, description, val, start):
            commit, data, digest = worker_commit(clone, start, values, description)
            row = replace(template, commit=commit.hexsha[:7], val_bpb=val, samples=f"{val:.6f}",
                          description=description, train_hash=digest)
            return Report("w1", [], f"w1 turn 1: RESULT keep val_bpb={val}", row, commit.hexsha,
                          start, data)

        first = template.val_bpb - 0.1
        row, _ = absorb(branch, report({"MATRIX_LR": 0.02}, "first", first, base))
        assert row.status == "keep" and driver.head.commit.hexsha.startswith(row.commit)  # a fast-forward
        after_first = driver.head.commit
        # started from the baseline, better than the new best: committed on top of it, with its own train.py
        row, message = absorb(branch, report({"MATRIX_LR": 0.03}, "second", first - 0.05, base))
        assert row.status == "keep" and "committed on top of it" in message
        head = driver.head.commit
        assert head.parents == (after_first,) and head.hexsha.startswith(row.commit)
        assert read_constants((swarm_dir / "backends/mlx/train.py").read_text())["MATRIX_LR"] == 0.03
        # started from the baseline, better than it but not than the moved best: a discard, the branch unmoved
        row, message = absorb(branch, report({"MATRIX_LR": 0.01}, "third", first - 0.01, base))
        assert row.status == "discard" and "the swarm's best had moved to" in row.description
        assert driver.head.commit == head and "discarded" in message
    check_driver(swarm_dir)


def test_claims_keep_two_workers_off_one_program():
    from autoresearch.swarm import Claims

    claims = Claims()
    assert claims.claim("h1", "w0", "lr up", "src") is None
    assert claims.claim("h1", "w1", "lr up", "src") == 'runs on w0 ("lr up")'
    claims.finished("h1", judged=True)
    assert claims.claim("h1", "w1", "lr up", "src") == 'ran on w0 ("lr up")'
    assert claims.claim("h2", "w1", "depth", "src2") is None
    claims.finished("h2", judged=False)  # invalid: caught, not judged; the program may run again
    assert claims.claim("h2", "w0", "depth", "src2") is None
    assert claims.lost("w0") == [("h2", "depth", "src2")] and claims.lost("w0") == []
    assert claims.claim("h2", "w1", "depth", "src2") is None


def test_tpe_workers_share_one_study(run_repo):
    """Two workers proposing with TPE: each turn's study is the driver's ledger, other workers' rows in it. (The
    step compile off: every size TPE tries would compile its kernels anew, half a minute each on one core.)"""
    swarm_dir = run_repo
    commit_edit(swarm_dir, "no compile", "use_compile = True", "use_compile = False")
    proc = cli(swarm_dir, *swarm_args("--agent", "tpe", "--tag", "tpe", "--noise-runs", 1, "--no-calibrate", "-n", 4))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [r for r in check_driver(swarm_dir) if r.worker != "-" and r.status != "lost"]
    assert len(rows) == 4 and all(r.description.startswith("tpe: ") and r.params != "-" for r in rows), proc.stdout
    assert len({r.train_hash for r in rows}) == 4
    # every scored row carries the holdout's figure beside the one it was judged on; results shows it
    scored = [r for r in read_ledger(swarm_dir / "results.tsv") if r.status in ("keep", "discard")]
    assert all(r.holdout_bpb > 0 and r.holdout_bpb != r.val_bpb for r in scored)
    assert all(r.holdout_bpb == 0 for r in rows if r.status not in ("keep", "discard"))
    summary = json.loads(cli(swarm_dir, "results", "--json").stdout)["groups"][0]
    assert summary["baseline"]["holdout_bpb"] == round(scored[0].holdout_bpb, 6)
    clones = {line.split(":")[0]: Path(line.split("clone ")[1].strip())
              for line in proc.stdout.splitlines() if line.startswith(("w0: pid", "w1: pid"))}
    studies = {}  # worker -> what each of its turns' study held, by worker
    for name, clone in clones.items():
        for turn in load_turns(clone):
            held = turn["output"].split("(")[1].split(")")[0]
            studies.setdefault(name, []).append(dict(part.split(": ") for part in held.split(", ")))
    # the baseline row is the driver's ("here"); a worker's later turn fitted rows the other worker recorded
    assert all("here" in s for turns in studies.values() for s in turns), studies
    assert any(other in s for name, turns in studies.items() for s in turns
               for other in ("w0", "w1") if other != name), studies
