"""The ledger cannot be torn or lost: real files, real full disks (a file-size limit, a tmpfs), real git notes."""

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import git
import pytest

from conftest import one_commit_repo
from autoresearch.ledger import (COLUMNS, LEDGER_NAME, NOTES_REF, LedgerError, Row, append_row, format_row,
                                 notes_rows, parse_row, read_ledger, rebuild_ledger, restore_missing, write_note)

ROOT = Path(__file__).resolve().parents[1]
HW = "mlx-cpu-x86_64-2c-24gb"
BRANCH = f"autoresearch/a-{HW}"
OTHER = f"autoresearch/b-{HW}"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
HEADER = "\t".join(COLUMNS) + "\n"
OLD = COLUMNS[:COLUMNS.index("harness_seconds")]  # the first version's columns
ADDED_DEFAULTS = "\t0\t-\t-\t-\t0\t0\t0\t0\t-"  # harness_seconds, pin, worker, sandbox, startup, step, eval seconds, holdout, params


def make_row(i, branch=BRANCH, status="keep", **extra):
    """Row i, recorded 6 minutes after row i-1."""
    val = round(1.5 - 0.01 * i, 6)
    fields = dict(
        commit=f"a{i:06d}", val_bpb=val, memory_gb=1.0, status=status, description=f"change {i}", hardware=HW,
        backend="mlx", eval_profile="cpu", budget=300.0, seed=42,
        timestamp=(START + timedelta(minutes=6 * i)).strftime("%Y-%m-%dT%H:%M:%S%z"), training_seconds=300.0,
        num_steps=100, num_params_M=11.5, tokens=3_000_000, config="-", gate="greedy", train_hash=f"{i:016x}",
        branch=branch, samples=f"{val:.6f}", harness_seconds=301.25, pin="f00dfeed")
    fields.update(extra)
    return Row(**fields)


def side_files(path):
    """Everything beside the ledger: torn rows kept aside, backups, left-over temporary files."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture
def repo(tmp_path):
    return one_commit_repo(tmp_path / "repo")


def record(repo, rows):
    """Commit each row's change on its run branch and record the row as the harness does: ledger first, then the
    note."""
    root = Path(repo.working_tree_dir)
    for r in rows:
        repo.git.checkout("-q", "-B", r.branch)
        (root / "train.py").write_text(f"x = {r.description!r}\n")
        repo.index.add(["train.py"])
        commit = repo.index.commit(r.description)
        r.commit = commit.hexsha[:7]
        append_row(root / LEDGER_NAME, r)
        write_note(repo, r, commit)
    return root / LEDGER_NAME


# ---------------------------------------------------------------------------------------------
# A final line without its newline: a whole row that lost it, or a torn one


def test_final_newline_missing_is_repaired(tmp_path):
    path = tmp_path / LEDGER_NAME
    rows = [make_row(i) for i in range(3)]
    path.write_text(HEADER + format_row(rows[0]) + format_row(rows[1]).rstrip("\n"))
    assert read_ledger(path) == rows[:2]
    append_row(path, rows[2])
    assert path.read_text() == HEADER + "".join(map(format_row, rows))  # not joined onto the last row
    assert read_ledger(path) == rows
    assert side_files(path) == []  # nothing was torn


def test_torn_row_is_set_aside_and_the_next_row_is_whole(tmp_path):
    path = tmp_path / LEDGER_NAME
    rows = [make_row(i) for i in range(4)]
    fragment = format_row(rows[2])[:40]  # cut mid-line, in the description
    path.write_text(HEADER + format_row(rows[0]) + format_row(rows[1]) + fragment)
    assert read_ledger(path) == rows[:2]  # readable before any repair: the torn row is not a row
    append_row(path, rows[3])
    assert path.read_text() == HEADER + format_row(rows[0]) + format_row(rows[1]) + format_row(rows[3])
    assert read_ledger(path) == [rows[0], rows[1], rows[3]]
    assert (tmp_path / f"{LEDGER_NAME}.torn").read_text() == fragment + "\n"  # kept, not lost
    # a second torn row later is added to the same file
    with open(path, "a") as f:
        f.write("a000009\t1.4")
    append_row(path, rows[2])
    assert read_ledger(path) == [rows[0], rows[1], rows[3], rows[2]]
    assert (tmp_path / f"{LEDGER_NAME}.torn").read_text() == fragment + "\na000009\t1.4\n"
    assert side_files(path) == [f"{LEDGER_NAME}.torn"]


def test_torn_header_is_set_aside(tmp_path):
    path = tmp_path / LEDGER_NAME
    path.write_text(HEADER[:30])  # the first append died inside the header
    assert read_ledger(path) == []
    append_row(path, make_row(0))
    assert path.read_text() == HEADER + format_row(make_row(0))
    assert (tmp_path / f"{LEDGER_NAME}.torn").read_text() == HEADER[:30] + "\n"
    path.write_text("hello\n")  # not a ledger at all: refused, not rewritten
    with pytest.raises(LedgerError, match="header does not match"):
        append_row(path, make_row(1))
    assert path.read_text() == "hello\n"


# ---------------------------------------------------------------------------------------------
# A full disk: the whole row or nothing, and one line saying so

APPEND_UNDER_LIMIT = """
import resource, signal, sys
from autoresearch.ledger import LedgerError, append_row, parse_row
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    append_row(sys.argv[1], parse_row(sys.argv[3], 1, "argv"))
except LedgerError as e:
    print(e)
    sys.exit(3)
"""


def append_under_limit(path, limit, row):
    """append_row in a child whose files cannot grow past `limit` bytes: a fake full disk for this process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", APPEND_UNDER_LIMIT, str(path), str(limit), format_row(row)],
                          capture_output=True, text=True, env=env, timeout=60)


def test_append_past_a_file_size_limit_writes_nothing(tmp_path):
    path = tmp_path / LEDGER_NAME
    rows = [make_row(i) for i in range(3)]
    for r in rows[:2]:
        append_row(path, r)
    before = path.read_bytes()
    # 50 bytes of room: the first write is short, the second fails; both must be undone
    proc = append_under_limit(path, len(before) + 50, rows[2])
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert message == f"{path}: could not append a row (File too large); nothing was written"
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == before
    assert side_files(path) == []
    # a new ledger that cannot be written is not left behind, half a header long
    fresh = tmp_path / "fresh" / LEDGER_NAME
    fresh.parent.mkdir()
    proc = append_under_limit(fresh, 100, rows[0])
    assert proc.returncode == 3 and len(proc.stdout.strip().splitlines()) == 1, proc.stderr
    assert not fresh.exists()
    # with room, the same child appends
    proc = append_under_limit(path, 1 << 20, rows[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_ledger(path) == rows


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs, a disk that really fills up, where this process may mount one (root on Linux)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux; the file-size-limit tests cover the same code")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "--lazy", str(where)], check=True)  # lazy: a git child may still be closing


def fill(where):
    """Write a filler file until the disk is full."""
    with open(where / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC


def test_append_on_a_full_disk_writes_nothing(tmpfs):
    path = tmpfs / LEDGER_NAME
    for i in range(3):
        append_row(path, make_row(i))
    fill(tmpfs)
    before = path.read_bytes()
    # longer than what is left of the file's last page: part of it fits, the rest does not
    with pytest.raises(LedgerError) as failed:
        append_row(path, make_row(3, description="x" * 9000))
    assert str(failed.value) == f"{path}: could not append a row (No space left on device); nothing was written"
    assert path.read_bytes() == before
    (tmpfs / "filler").unlink()
    append_row(path, make_row(3))
    assert read_ledger(path) == [make_row(i) for i in range(4)]


NOTE_UNDER_LIMIT = """
import resource, sys
import git
from autoresearch.ledger import LedgerError, parse_row, write_note
repo = git.Repo(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY))  # git cannot write an object
try:
    write_note(repo, parse_row(sys.argv[2], 1, "argv"), repo.head.commit)
except LedgerError as e:
    print(e)
    sys.exit(3)
"""


def notes_of(repo):
    try:
        return repo.git.notes("--ref", NOTES_REF, "list")
    except git.GitCommandError:
        return ""


def test_note_past_a_file_size_limit_is_one_line(repo):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", NOTE_UNDER_LIMIT, repo.working_tree_dir, format_row(make_row(0))],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert message.startswith(f"refs/notes/{NOTES_REF}: could not add the row to the note of "
                              f"{repo.head.commit.hexsha[:7]} (")
    assert notes_of(repo) == ""  # no half-made note


def test_note_on_a_full_disk_is_one_line(tmpfs):
    repo = git.Repo.init(tmpfs / "repo", initial_branch="main")
    with repo.config_writer() as c:
        c.set_value("user", "name", "t").set_value("user", "email", "t@localhost")
    commit = repo.index.commit("project")
    fill(tmpfs)
    with pytest.raises(LedgerError) as failed:
        write_note(repo, make_row(0), commit)
    message = str(failed.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"refs/notes/{NOTES_REF}: could not add the row to the note of {commit.hexsha[:7]}")
    assert "No space left on device" in message
    assert notes_of(repo) == ""
    (tmpfs / "filler").unlink()
    write_note(repo, make_row(0, commit=commit.hexsha[:7]), commit)
    assert [r for r, _ in notes_rows(repo)] == [make_row(0, commit=commit.hexsha[:7])]
    repo.close()  # its git cat-file children run inside the tmpfs


# ---------------------------------------------------------------------------------------------
# An earlier version's ledger and notes


def old_line(row, columns=OLD):
    return "\t".join(format_row(row).rstrip("\n").split("\t")[: len(columns)]) + "\n"


def test_old_ledger_is_read_and_migrated_on_append(tmp_path):
    path = tmp_path / LEDGER_NAME
    rows = [make_row(i) for i in range(3)]
    old_text = "\t".join(OLD) + "\n" + old_line(rows[0]) + "\n" + old_line(rows[1])  # a blank line too
    path.write_text(old_text)
    defaulted = [make_row(i, harness_seconds=0.0, pin="-") for i in range(2)]
    assert read_ledger(path) == defaulted  # the columns it lacks take their defaults
    append_row(path, rows[2])
    assert path.read_text() == (HEADER + old_line(rows[0]).rstrip("\n") + ADDED_DEFAULTS + "\n"
                                + old_line(rows[1]).rstrip("\n") + ADDED_DEFAULTS + "\n" + format_row(rows[2]))
    assert read_ledger(path) == defaulted + [rows[2]]
    assert side_files(path) == []  # the rewrite left no temporary file
    # versions in between (harness_seconds, no pin; pin, no worker) read too; a row of its own width only
    path.write_text("\t".join(COLUMNS[:-1]) + "\n" + old_line(rows[0], COLUMNS[:-1]))
    assert read_ledger(path) == [rows[0]]
    middle = COLUMNS[:COLUMNS.index("pin")]
    path.write_text("\t".join(middle) + "\n" + old_line(rows[0], middle))
    assert read_ledger(path) == [make_row(0, pin="-")]
    path.write_text("\t".join(middle) + "\n" + format_row(rows[0]))
    with pytest.raises(LedgerError, match=f":2: expected {len(middle)} tab-separated columns, found {len(COLUMNS)}"):
        read_ledger(path)


def test_old_ledger_with_a_bad_row_is_not_rewritten(tmp_path):
    path = tmp_path / LEDGER_NAME
    text = "\t".join(OLD) + "\n" + old_line(make_row(0)).replace("\t1.5\t", "\tfast\t", 1)
    path.write_text(text)
    with pytest.raises(LedgerError, match="column val_bpb is not a number"):
        append_row(path, make_row(1))
    assert path.read_text() == text


def test_note_lines_of_any_version_parse():
    row = make_row(0, status="invalid")
    assert parse_row(old_line(row), 1, "note") == make_row(0, status="invalid", harness_seconds=0.0, pin="-")
    assert parse_row(format_row(row), 1, "note") == row
    for wrong in (OLD[:-1], COLUMNS + ["extra"]):
        line = "\t".join(["x"] * len(wrong))
        with pytest.raises(LedgerError, match=f"note:1: expected {len(COLUMNS)} tab-separated columns"):
            parse_row(line, 1, "note")


# ---------------------------------------------------------------------------------------------
# The ledger rebuilt and restored from the git notes


def test_rebuild_from_notes_equals_the_original(repo):
    rows = [make_row(i) for i in range(4)] + [make_row(4, branch=OTHER)]
    path = record(repo, rows)
    verify = make_row(5, status="verify", description="verify: change 2")  # a second note line on one commit
    verify.commit = rows[2].commit
    append_row(path, verify)
    write_note(repo, verify, repo.commit(rows[2].commit))
    original = path.read_bytes()
    path.write_text("garbage\n")
    assert rebuild_ledger(repo, path) == 6
    assert path.read_bytes() == original
    backups = [name for name in side_files(path) if name.endswith(".bak")]
    assert len(backups) == 1 and (path.parent / backups[0]).read_text() == "garbage\n"  # the old one kept aside
    assert rebuild_ledger(repo, path) == 6 and path.read_bytes() == original
    assert len([name for name in side_files(path) if name.endswith(".bak")]) == 1  # identical: no new backup


def test_deleted_ledger_is_restored_from_the_notes(repo):
    mine = [make_row(i) for i in range(4)]
    theirs = [make_row(4, branch=OTHER)]
    path = record(repo, mine + theirs)
    path.unlink()  # what a train.py did
    assert restore_missing(repo, path, BRANCH) == 4
    assert read_ledger(path) == mine  # the branch's rows only, in time order
    before = path.read_bytes()
    assert restore_missing(repo, path, f"refs/heads/{BRANCH}") == 0  # nothing missing: untouched
    assert path.read_bytes() == before
    assert restore_missing(repo, path, OTHER) == 1
    assert read_ledger(path) == mine + theirs


def test_shortened_ledger_is_restored_rows_only_in_it_kept(repo):
    rows = [make_row(i) for i in range(5)]
    path = record(repo, rows)
    lines = path.read_text().splitlines(keepends=True)
    torn = lines[3][:25]
    local = make_row(2, description="only in this ledger", timestamp=(START + timedelta(minutes=15)).strftime(
        "%Y-%m-%dT%H:%M:%S%z"))  # between rows 2 and 3, never noted
    path.write_text("".join(lines[:3]) + format_row(local) + torn)  # 2 rows, the local one, the third cut mid-line
    assert read_ledger(path) == rows[:2] + [local]
    assert restore_missing(repo, path, BRANCH) == 3
    assert read_ledger(path) == rows[:3] + [local] + rows[3:]
    assert (path.parent / f"{LEDGER_NAME}.torn").read_text() == torn + "\n"
    assert restore_missing(repo, path, BRANCH) == 0


def test_old_format_notes_restore_with_defaults(repo):
    """Notes written by an earlier version (fewer columns) come back under this version's header."""
    row = make_row(0)
    repo.git.checkout("-q", "-b", BRANCH)
    (Path(repo.working_tree_dir) / "train.py").write_text("x = 1\n")
    repo.index.add(["train.py"])
    commit = repo.index.commit("change 0")
    row.commit = commit.hexsha[:7]
    repo.git.notes("--ref", NOTES_REF, "append", "-m", old_line(row).rstrip("\n"), commit.hexsha)
    path = Path(repo.working_tree_dir) / LEDGER_NAME
    assert restore_missing(repo, path, BRANCH) == 1
    assert path.read_text() == HEADER + old_line(row).rstrip("\n") + ADDED_DEFAULTS + "\n"
