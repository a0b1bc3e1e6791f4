"""The harness's own record and other machines' rows: what was written outside the harness (an agent with a shell,
a process left behind, notes merged from elsewhere) never decides anything. Real checkouts, real git, the real
command line; nothing here trains (every command stops at "train.py is unchanged", after the checks)."""

import subprocess
import sys
import time
from pathlib import Path

import git
import pytest

from conftest import cli
from autoresearch.ledger import LEDGER_NAME, NOTES_REF, format_row, read_ledger


def untouched_run(root, env=None):
    """`autoresearch run` with train.py unchanged: every check of opening the run branch, then refused."""
    return cli(root, "--backend", "mlx", "run", "-m", "nothing", "--budget", 3, env=env)


def errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_a_ledger_or_noise_floor_changed_outside_the_harness_is_put_back_and_stops_the_command(repo_dir):
    assert "is unchanged" in untouched_run(repo_dir).stderr  # the record adopts this checkout
    ledger = repo_dir / LEDGER_NAME
    true_rows = ledger.read_bytes()
    best = read_ledger(ledger)[0]
    forged = format_row(best).replace(f"{best.val_bpb:.6f}".rstrip("0"), "1.0", 1).replace(best.commit, "0000000")
    ledger.write_text(ledger.read_text() + forged)
    noise = repo_dir / ".autoresearch" / "noise.json"
    noise.write_text('{"mlx-cpu": {"samples": [1, 2], "spread": -5, "commit": "x"}}\n')
    proc = untouched_run(repo_dir)
    assert proc.returncode == 2 and len(errors(proc)) == 1, proc.stderr
    assert "results.tsv and .autoresearch/noise.json changed outside the harness" in errors(proc)[0]
    assert ledger.read_bytes() == true_rows and not noise.exists()  # as the harness left them: no noise floor yet
    assert "is unchanged" in untouched_run(repo_dir).stderr  # and the next command goes on


def test_a_pid_file_the_harness_did_not_write_kills_nothing(repo_dir):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        time.sleep(0.2)
        started = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        command = Path(f"/proc/{victim.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        (repo_dir / ".autoresearch" / "trainer.pid").write_text(f"{victim.pid} {started} {command}\n")  # exact
        proc = untouched_run(repo_dir)
        assert "is unchanged" in proc.stderr and "stopped process group" not in proc.stderr, proc.stderr
        assert victim.poll() is None  # still running
        assert not (repo_dir / ".autoresearch" / "trainer.pid").exists()
    finally:
        victim.kill()
        victim.wait()


def foreign_commit(repo):
    """A commit of another machine's: unrelated history, its own prepare.py and CLI."""
    root = Path(repo.working_tree_dir)
    mine = repo.active_branch.name
    repo.git.checkout("-q", "--orphan", "theirs")
    (root / "prepare.py").write_text("# theirs\n")
    (root / "autoresearch_cli.py").write_text("# theirs\n")
    repo.git.add("-A")
    commit = repo.index.commit("their project")
    repo.git.checkout("-q", "-f", mine)
    repo.git.branch("-D", "theirs")
    return commit


def test_notes_from_another_machine_cannot_take_the_checkout_over(repo_dir):
    repo = git.Repo(repo_dir)
    head, prepare_py = repo.head.commit.hexsha, (repo_dir / "prepare.py").read_bytes()
    mine = read_ledger(repo_dir / LEDGER_NAME)
    theirs = foreign_commit(repo)
    base = mine[0]
    old_baseline = (format_row(base).replace(base.commit, theirs.hexsha[:7])
                    .replace(base.timestamp, "2020-01-01T00:00:00+0000"))
    future_keep = (format_row(base).replace(base.commit, theirs.hexsha[:7]).replace("baseline", "better")
                   .replace(base.timestamp, "2099-01-01T00:00:00+0000"))
    repo.git.notes("--ref", NOTES_REF, "append", "-m", old_baseline.rstrip("\n") + "\n" + future_keep.rstrip("\n"),
                   theirs.hexsha)
    # a note of rows claiming another commit, a note that is no rows, one that is not UTF-8, one far too large
    repo.git.notes("--ref", NOTES_REF, "append", "-m", future_keep.rstrip("\n"), head)
    other = repo.index.commit("another", parent_commits=[repo.head.commit], head=False)
    repo.git.notes("--ref", NOTES_REF, "add", "-m", "[/red] not a row", other.hexsha)
    big = repo.index.commit("big", parent_commits=[repo.head.commit], head=False)
    (repo_dir.parent / "big.txt").write_text(future_keep * 2000)
    repo.git.notes("--ref", NOTES_REF, "add", "-F", str(repo_dir.parent / "big.txt"), big.hexsha)
    binary = repo.index.commit("binary", parent_commits=[repo.head.commit], head=False)
    (repo_dir.parent / "binary.txt").write_bytes(b"\xff\xfe" + future_keep.encode())
    repo.git.notes("--ref", NOTES_REF, "add", "-F", str(repo_dir.parent / "binary.txt"), binary.hexsha)
    (repo_dir / LEDGER_NAME).unlink()  # and this checkout lost its ledger: the notes are all there is
    fresh = {"AUTORESEARCH_STATE": str(repo_dir.parent / "fresh-state")}  # a record that never saw it either
    proc = untouched_run(repo_dir, env=fresh)
    assert "is unchanged" in proc.stderr, proc.stderr
    assert repo.head.commit.hexsha == head and (repo_dir / "prepare.py").read_bytes() == prepare_py
    assert not (repo_dir / "autoresearch_cli.py").exists()
    restored = read_ledger(repo_dir / LEDGER_NAME)
    assert [r.commit for r in restored] == [r.commit for r in mine]  # only rows of this branch's own commits
    skipped = [line for line in proc.stderr.splitlines() if "is skipped" in line]
    assert {c.hexsha[:7] for c in (big, other, binary)} == {line.split("commit ")[1][:7] for line in skipped}
    assert "claim another commit: skipped" in proc.stderr


def test_recovery_refuses_a_last_keep_off_the_branch_history(repo_dir):
    repo = git.Repo(repo_dir)
    head = repo.head.commit.hexsha
    theirs = foreign_commit(repo)
    ledger = repo_dir / LEDGER_NAME
    base = read_ledger(ledger)[0]
    forged = format_row(base).replace(base.commit, theirs.hexsha[:7]).replace("baseline", "their keep")
    ledger.write_text(ledger.read_text() + forged)
    # a record that never saw this checkout adopts the ledger as it is: recovery itself must hold the line
    fresh = {"AUTORESEARCH_STATE": str(repo_dir.parent / "fresh-state")}
    proc = untouched_run(repo_dir, env=fresh)
    assert proc.returncode == 2 and len(errors(proc)) == 1 and "not on" in errors(proc)[0], proc.stderr
    assert repo.head.commit.hexsha == head and not (repo_dir / "autoresearch_cli.py").exists()


def test_a_full_state_folder_is_one_line_and_leaves_no_half_written_copy(repo_dir, tmp_path):
    """The record's folder on a full disk: an error in one line (exit 1), no traceback, no *.tmp left in it."""
    state = tmp_path / "state"
    state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with open(state / "filler", "wb", buffering=0) as f:  # fill it: the last write fails with ENOSPC
            with pytest.raises(OSError, match="No space left"):
                while True:
                    f.write(b"x" * 4096)
        proc = untouched_run(repo_dir, env={"AUTORESEARCH_STATE": str(state)})
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert errors(proc) and errors(proc)[0].startswith("error: the harness's record of this checkout cannot "
                                                           "be written in "), proc.stderr
        assert "No space left on device" in errors(proc)[0], proc.stderr
        assert not list(state.rglob("*.tmp")), list(state.rglob("*"))
    finally:
        subprocess.run(["umount", "-l", str(state)])


def test_a_train_py_of_more_than_a_megabyte_is_refused(repo_dir):
    """Both evaluator processes read it: which of a huge file's pages are cached could carry the rows across."""
    train = repo_dir / "backends/mlx/train.py"
    train.write_text(train.read_text() + "#" * (1 << 20) + "\n")
    head = git.Repo(repo_dir).head.commit.hexsha
    proc = untouched_run(repo_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert errors(proc) == [f"error: backends/mlx/train.py is {train.stat().st_size:,} bytes, over the 1,048,576 a "
                            "train.py may be (upstream's is about 25,000)"], proc.stderr
    assert git.Repo(repo_dir).head.commit.hexsha == head
