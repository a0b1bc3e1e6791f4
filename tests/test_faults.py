"""The fault matrix: signals, kills, two harnesses, broken caches, torn and lost ledgers, full disks, bad options.
Real processes, real signals, real git repositories and real (few-second) training runs. After each fault: HEAD at
the last keep, no trainer left running, the ledger well-formed and equal to the notes, user files intact, one
clear line. They run with --sandbox off: what recovery must do where no sandbox ends a run's processes with its
harness (tests/test_sandbox.py checks that one does)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import numpy as np
import pytest

from conftest import BUDGET, cli, copy_checkout, edit
from autoresearch.ledger import format_row, notes_rows, read_ledger


@pytest.fixture(autouse=True)
def unsandboxed(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "off")  # every command the tests start, through the environment


@pytest.fixture
def repo_dir(unsandboxed_template, tmp_path, use_cache):
    return copy_checkout(unsandboxed_template, tmp_path)


def spawn(root, *args):
    return subprocess.Popen([sys.executable, "-m", "autoresearch", *map(str, args)], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_training(root, timeout=120):
    """The trainer's pid once it prints its first step line."""
    deadline = time.time() + timeout
    log, pid_file = root / ".autoresearch/run.log", root / ".autoresearch/trainer.pid"
    while time.time() < deadline:
        if pid_file.exists() and "\nstep 0" in log.read_text():  # pid first: by then the old log is cleared
            return int(pid_file.read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError("training never started")


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a killed orphan may linger as a zombie: it runs nothing


def check_invariants(root, n_rows):
    """HEAD at the last keep, a clean tree, the ledger readable and equal to the notes."""
    repo = git.Repo(root)
    rows = read_ledger(root / "results.tsv")
    assert len(rows) == n_rows
    kept = [r for r in rows if r.status == "keep"]
    assert repo.head.commit.hexsha.startswith(kept[-1].commit)
    assert not repo.is_dirty(untracked_files=True)
    noted = sorted(format_row(r) for r, _ in notes_rows(repo))
    assert noted == sorted(format_row(r) for r in rows)
    return rows


@pytest.mark.parametrize("command,sig,code", [("run", signal.SIGTERM, 143), ("run", signal.SIGHUP, 129),
                                              ("loop", signal.SIGTERM, 143)])
def test_signal_mid_training_resets_and_kills_the_trainer(repo_dir, command, sig, code):
    head = git.Repo(repo_dir).head.commit.hexsha
    if command == "run":
        edit(repo_dir)
        proc = spawn(repo_dir, "--backend", "mlx", "run", "-m", "lr", "--budget", BUDGET)
    else:
        proc = spawn(repo_dir, "--backend", "mlx", "loop", "--agent", "random", "--budget", BUDGET)
    trainer = wait_for_training(repo_dir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, out + err
    assert "interrupted" in err and "not measured" in out + err
    assert not alive(trainer)
    repo = git.Repo(repo_dir)
    assert repo.head.commit.hexsha == head
    assert any(r.path.startswith("refs/autoresearch/interrupted/") for r in repo.refs)
    check_invariants(repo_dir, 1)


def test_sigkill_then_next_run_recovers(repo_dir):
    repo = git.Repo(repo_dir)
    head = repo.head.commit.hexsha
    edit(repo_dir)
    proc = spawn(repo_dir, "--backend", "mlx", "run", "-m", "killed", "--budget", BUDGET)
    trainer = wait_for_training(repo_dir)
    killed_commit = repo.head.commit.hexsha
    assert killed_commit != head
    # a trainer that prints dies of the broken pipe soon after its harness; one stuck in a step (held here with
    # SIGSTOP, so the test does not race that death) outlives it, and the next harness must stop it
    os.kill(trainer, signal.SIGSTOP)
    proc.kill()
    proc.wait()
    assert alive(trainer)
    edit(repo_dir, WARMUP_RATIO=0.1)
    done = cli(repo_dir, "--backend", "mlx", "run", "-m", "after the kill", "--budget", BUDGET, "--gate", "greedy")
    assert done.returncode in (0, 3), done.stdout + done.stderr
    assert "stopped process group" in done.stderr and f"HEAD was {killed_commit[:7]}" in done.stderr
    assert not alive(trainer)
    assert f"refs/autoresearch/stray/{killed_commit[:7]}" in [r.path for r in repo.refs]
    rows = check_invariants(repo_dir, 2)
    assert "vs best" in done.stdout and rows[1].description == "after the kill"
    ancestry = [c.hexsha for c in repo.iter_commits()]
    assert killed_commit not in ancestry and head in ancestry


def test_loop_refuses_a_dirty_tree_and_keeps_user_files(repo_dir):
    (repo_dir / "notes.txt").write_text("my notes")
    (repo_dir / "program.md").write_text((repo_dir / "program.md").read_text() + "\nmy edit\n")
    proc = cli(repo_dir, "--backend", "mlx", "loop", "--agent", "random", "-n", 1, "--budget", BUDGET)
    assert proc.returncode == 2 and "uncommitted changes" in proc.stderr
    assert (repo_dir / "notes.txt").read_text() == "my notes"
    assert (repo_dir / "program.md").read_text().endswith("my edit\n")


def test_a_second_harness_fails_at_once_naming_the_first(repo_dir):
    edit(repo_dir)
    first = spawn(repo_dir, "--backend", "mlx", "run", "-m", "first", "--budget", BUDGET)
    wait_for_training(repo_dir)
    started = time.time()
    second = cli(repo_dir, "--backend", "mlx", "run", "-m", "second", "--budget", BUDGET)
    assert time.time() - started < 30
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "run" in errors[0]
    out, err = first.communicate(timeout=120)
    assert first.returncode in (0, 3), out + err
    log = (repo_dir / ".autoresearch/run.log").read_text()
    assert "\nstep 0" in log and "=== mlx seed 42" in log  # the first run's log, not truncated by the second
    check_invariants(repo_dir, 2)


@pytest.mark.parametrize("damage", ["truncated shard", "missing tokens", "short val rows"])
def test_a_broken_cache_is_an_error_not_the_candidates_fault(repo_dir, tmp_path, cpu_cache, damage):
    cache = tmp_path / "cache"
    shutil.copytree(cpu_cache, cache)
    tokens = cache / "tokens"
    if damage == "truncated shard":
        shard = sorted(tokens.glob("shard_0000*.npy"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "missing tokens":
        shutil.rmtree(tokens)
    else:
        np.save(tokens / "val_rows.npy", np.load(tokens / "val_rows.npy")[:8])
    env = {"AUTORESEARCH_CACHE": str(cache)}
    head = git.Repo(repo_dir).head.commit.hexsha
    edit(repo_dir)
    edited = (repo_dir / "backends/mlx/train.py").read_text()
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "lr", "--budget", BUDGET, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prepare --force" in errors[0]
    assert git.Repo(repo_dir).head.commit.hexsha == head
    assert (repo_dir / "backends/mlx/train.py").read_text() == edited  # kept for the retry
    assert len(read_ledger(repo_dir / "results.tsv")) == 1
    # repaired, the same edit runs: it was not blacklisted
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "lr", "--budget", BUDGET, "--gate", "greedy")
    assert proc.returncode in (0, 3) and "repeat" not in proc.stdout, proc.stdout + proc.stderr
    check_invariants(repo_dir, 2)


def test_ledger_without_final_newline_and_with_a_torn_row(repo_dir):
    ledger = repo_dir / "results.tsv"
    ledger.write_text(ledger.read_text().rstrip("\n"))
    edit(repo_dir)
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "one", "--budget", BUDGET, "--gate", "greedy")
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    check_invariants(repo_dir, 2)
    text = ledger.read_text()
    ledger.write_text(text[: len(text) - 40])  # the last row cut mid-line
    edit(repo_dir, WARMUP_RATIO=0.05)
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "two", "--budget", BUDGET, "--gate", "greedy")
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert "results.tsv lost rows (deleted or cut short); restored from the harness's record" in proc.stderr
    rows = check_invariants(repo_dir, 3)
    assert [r.description for r in rows] == ["baseline", "one", "two"]


def test_train_py_that_deletes_the_ledger_is_caught_and_the_ledger_restored(repo_dir):
    ledger = (repo_dir / "results.tsv").read_text()
    train = repo_dir / "backends/mlx/train.py"
    train.write_text(train.read_text().replace("def main():\n", "def main():\n    os.remove('results.tsv')\n", 1))
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "delete the ledger", "--budget", BUDGET)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    assert "RESULT invalid" in proc.stdout and "results.tsv deleted" in proc.stdout
    rows = check_invariants(repo_dir, 2)
    assert (repo_dir / "results.tsv").read_text().startswith(ledger)
    assert rows[-1].status == "invalid"


def test_ledger_deleted_between_commands_is_restored_before_comparing(repo_dir):
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "nothing", "--budget", BUDGET)  # the record sees the checkout
    assert "is unchanged" in proc.stderr, proc.stderr
    (repo_dir / "results.tsv").unlink()
    edit(repo_dir)
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "lr", "--budget", BUDGET, "--gate", "greedy")
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert "results.tsv lost rows" in proc.stderr and "vs best" in proc.stdout and "(baseline" not in proc.stdout
    check_invariants(repo_dir, 2)


def test_a_fresh_clone_restores_its_ledger_from_the_notes(repo_dir, tmp_path):
    (repo_dir / "results.tsv").unlink()
    edit(repo_dir)
    fresh = {"AUTORESEARCH_STATE": str(tmp_path / "another-machine")}  # a record that never saw this checkout
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "lr", "--budget", BUDGET, "--gate", "greedy", env=fresh)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert "restored 1 row" in proc.stderr and "vs best" in proc.stdout and "(baseline" not in proc.stdout
    check_invariants(repo_dir, 2)


def test_disk_full_while_appending_writes_nothing_and_resets(repo_dir, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the ENOSPC path is covered in test_ledger.py")
    try:
        ledger = repo_dir / "results.tsv"
        text = ledger.read_text()
        (full / "results.tsv").write_text(text + "\n" * (-len(text.encode()) % 4096))  # its last page full
        ledger.unlink()
        ledger.symlink_to(full / "results.tsv")  # the ledger on a disk with no page left
        with open(full / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        before = (full / "results.tsv").read_bytes()
        head = git.Repo(repo_dir).head.commit.hexsha
        edit(repo_dir)
        proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "full", "--budget", BUDGET, "--gate", "greedy")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left" in errors[0] and "Traceback" not in proc.stderr
        assert (full / "results.tsv").read_bytes() == before
        assert git.Repo(repo_dir).head.commit.hexsha == head
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)


@pytest.mark.parametrize("args,expected", [
    (("--gate", "seeds", "--seeds", "0"), "--seeds must be"),
    (("--timeout", "0"), "--timeout must be"),
    (("--k", "-1"), "--k must be"),
    (("--confidence", "1.5"), "--confidence must be"),
    (("--budget", "-3"), "--budget must be"),
])
def test_bad_options_are_one_line_exit_2_before_anything_is_committed(repo_dir, args, expected):
    head = git.Repo(repo_dir).head.commit.hexsha
    edit(repo_dir)
    edited = (repo_dir / "backends/mlx/train.py").read_text()
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "bad option", *(["--budget", BUDGET] if "--budget" not in
                                                                        args else []), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr
    assert git.Repo(repo_dir).head.commit.hexsha == head
    assert (repo_dir / "backends/mlx/train.py").read_text() == edited
    assert len(read_ledger(repo_dir / "results.tsv")) == 1
