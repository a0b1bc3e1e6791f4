"""Bad output from an agent's program: numbers in its summary that are not numbers, a description that is not
text, a flood of output, an evaluator child that breaks the protocol. Each through the real command line or the
real loop, on a real run branch with real (few-second) training, with --sandbox off (what the harness itself
must do where no OS sandbox exists). After each: a row that parses back, commands that still work, and where an
agent is driving, the next experiment runs."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import git
import pytest

from conftest import BUDGET, cli, copy_checkout, edit
from autoresearch.evaluate import Child, EvaluatorFailed
from autoresearch.experiment import EXIT
from autoresearch.ledger import (COLUMNS, LEDGER_NAME, MISSING_NUMBER, format_row, git_identity, notes_rows,
                                 read_ledger)
from autoresearch.loop import build_prompt
from autoresearch.runner import HEAD_BYTES, TAIL_BYTES

SUMMARY_LINE = 'print(f"num_steps:        {step}")'


@pytest.fixture(autouse=True)
def unsandboxed(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "off")  # every command the tests start, through the environment


@pytest.fixture
def repo_dir(unsandboxed_template, tmp_path, use_cache):
    return copy_checkout(unsandboxed_template, tmp_path)


def rewrite(root, old, new):
    """Replace text in the mlx train.py, as an agent would."""
    train = root / "backends/mlx/train.py"
    source = train.read_text()
    assert old in source, old
    train.write_text(source.replace(old, new, 1))


def run(root, message):
    return cli(root, "--backend", "mlx", "run", "-m", message, "--budget", BUDGET, "--gate", "greedy")


def closing(proc):
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def assert_ledger_commands_work(root, rows):
    """results (text and JSON), ledger rebuild from the notes and the loop's prompt all read the ledger's rows."""
    for args in (["results"], ["results", "--json"]):
        proc = cli(root, *args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    json.loads(cli(root, "results", "--json").stdout)  # JSON has no NaN: a missing number is null
    before = (root / LEDGER_NAME).read_bytes()
    proc = cli(root, "ledger", "rebuild")
    assert proc.returncode == 0 and f"{len(rows)} rows rebuilt" in proc.stdout, proc.stdout + proc.stderr
    assert "skipped" not in proc.stderr, proc.stderr  # no row's note is unreadable
    assert (root / LEDGER_NAME).read_bytes() == before  # the notes hold exactly the ledger's rows


# ---------------------------------------------------------------------------------------------
# Numbers in the summary block that are not finite numbers


@pytest.mark.parametrize("printed", [
    {"num_steps": "nan"},
    {"num_steps": "inf", "total_tokens_M": "inf", "num_params_M": "about a million", "peak_vram_mb": "1e999"},
])
def test_a_summary_number_that_is_not_finite_is_recorded_as_missing(repo_dir, printed):
    for name, value in printed.items():
        line = next(line for line in (repo_dir / "backends/mlx/train.py").read_text().splitlines()
                    if line.strip().startswith(f'print(f"{name}:'))
        rewrite(repo_dir, line.strip(), f'print("{name}: {value}")')
    proc = run(repo_dir, "a summary with " + ", ".join(f"{k} {v}" for k, v in printed.items()))
    # the harness scored the checkpoint and timed the run itself: the run is judged as any other
    assert proc.returncode in (0, 3) and closing(proc).startswith(("RESULT keep", "RESULT discard")), \
        proc.stdout + proc.stderr
    rows = read_ledger(repo_dir / LEDGER_NAME)
    assert len(rows) == 2 and rows[-1].val_bpb > 0
    for name in printed:
        column = {"total_tokens_M": "tokens", "peak_vram_mb": "memory_gb"}.get(name, name)
        assert getattr(rows[-1], column) is MISSING_NUMBER, (column, rows[-1])
        assert format_row(rows[-1]).split("\t")[COLUMNS.index(column)] == "nan"
    assert rows[-1].training_seconds > 0  # the fields it printed well are kept
    assert_ledger_commands_work(repo_dir, rows)
    assert "The run so far: 1 experiment after the baseline" in build_prompt(repo_dir, "mlx", BUDGET)  # the loop's reader


def test_old_rows_with_nan_or_inf_text_read_as_missing(repo_dir):
    """A ledger and notes written before this fix: "nan" and "inf" in any numeric column (the old harness wrote
    them there) read as missing; text that is no number at all is still an error naming its line."""
    repo = git.Repo(repo_dir)
    path = repo_dir / LEDGER_NAME
    header, baseline = path.read_text().splitlines()
    parts = baseline.split("\t")
    for column, text in (("num_steps", "nan"), ("tokens", "inf"), ("memory_gb", "-inf"), ("eval_seconds", "inf")):
        parts[COLUMNS.index(column)] = text
    old = "\t".join(parts)
    path.write_text(f"{header}\n{old}\n")
    row, = read_ledger(path)
    assert row.num_steps is MISSING_NUMBER and row.tokens is MISSING_NUMBER and row.eval_seconds is MISSING_NUMBER
    assert row.memory_gb is MISSING_NUMBER and row.val_bpb > 0 and row == read_ledger(path)[0]
    proc = cli(repo_dir, "results")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # a note of the old harness's with such a row: read too, so a rebuild keeps it
    with repo.git.custom_environment(**git_identity(repo)):
        repo.git.notes("--ref", "autoresearch", "add", "-f", "-m", old, repo.head.commit.hexsha)
    assert [r.num_steps for r, _ in notes_rows(repo)] == [MISSING_NUMBER]
    # a word where a number belongs is still malformed: one line naming the line and column
    path.write_text(f"{header}\n" + old.replace("\tnan\t", "\tmany\t", 1) + "\n")
    proc = cli(repo_dir, "results")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {path.name}:2: column num_steps is not a number: " \
                                                            "'many'", proc.stderr


# ---------------------------------------------------------------------------------------------
# A description that is not text


AGENT = """
import sys
from pathlib import Path

turn_file = Path(sys.argv[1])
turn = int(turn_file.read_text()) + 1 if turn_file.exists() else 1
turn_file.write_text(str(turn))
p = Path("backends/mlx/train.py")
p.write_text(p.read_text().replace("MATRIX_LR = ", f"MATRIX_LR = {1 - 0.1 * turn} * ", 1))
Path(".autoresearch/description").write_bytes(DESCRIPTION)
"""
NOT_TEXT = b"lr \xff\xfe down \xe9t\xe9, NUL\x00 ESC\x1b[31m red BEL\x07\r\nsecond\tline \xe2\x80\xae reversed\n"


def test_a_description_that_is_not_text_is_taken_as_text_and_the_loop_goes_on(repo_dir, tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT.replace("DESCRIPTION", repr(NOT_TEXT)))
    proc = cli(repo_dir, "--backend", "mlx", "loop", "--agent", f"{sys.executable} {agent} {tmp_path / 'turn'}",
               "-n", 2, "--budget", BUDGET)
    assert proc.returncode == 0 and "loop ended: 2 experiments" in proc.stdout, proc.stdout + proc.stderr
    rows = read_ledger(repo_dir / LEDGER_NAME)
    assert len(rows) == 3 and rows[1].status in ("keep", "discard") and rows[2].status in ("keep", "discard")
    expected = "lr \ufffd\ufffd down \ufffdt\ufffd, NUL ESC [31m red BEL second line reversed"
    assert rows[1].description == rows[2].description == expected
    repo = git.Repo(repo_dir)
    assert sorted(format_row(r) for r, _ in notes_rows(repo)) == sorted(format_row(r) for r in rows)
    assert [repo.commit(r.commit).message for r in rows[1:]] == [expected, expected]  # kept or not, committed
    assert expected in (repo_dir / ".autoresearch/loop.log").read_text()


# ---------------------------------------------------------------------------------------------
# A flood of output


FLOOD = """def main():
    _line = "flood " * 682 + "\\n"  # 4 KiB a line, 200 MiB in all, before training starts
    for _ in range(51_200):
        sys.stdout.write(_line)
"""


def run_measured(root, message):
    """`autoresearch run` in a fresh process, with the harness's own peak resident memory (VmHWM in /proc, the
    kernel's high-water mark of that process alone, not of the trainer it starts) read until it exits."""
    proc = subprocess.Popen([sys.executable, "-m", "autoresearch", "--backend", "mlx", "run", "-m", message,
                             "--budget", str(BUDGET), "--gate", "greedy"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            text = status.read_text()
        except OSError:
            break  # exited between poll() and the read: the last reading stands
        for line in text.splitlines():
            if line.startswith("VmHWM:"):  # "VmHWM:   123456 kB"
                peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.02)
    out, err = proc.communicate()
    return proc.returncode, out, err, peak


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the harness's peak memory from /proc")
def test_a_flood_of_output_keeps_the_harness_small_and_the_log_capped(repo_dir):
    log = repo_dir / ".autoresearch/run.log"
    edit(repo_dir)  # an honest edit first: the harness's peak on an ordinary run
    code, out, err, ordinary = run_measured(repo_dir, "honest")
    assert code in (0, 3), out + err
    assert ordinary > 0 and log.stat().st_size < 1 << 20
    rewrite(repo_dir, "def main():\n", FLOOD)
    code, out, err, flooded = run_measured(repo_dir, "flood")
    # judged as any run: it trained, its summary (after the flood) parsed, the harness scored its checkpoint
    assert code in (0, 3) and out.strip().splitlines()[-1].startswith(("RESULT keep", "RESULT discard")), out + err
    rows = read_ledger(repo_dir / LEDGER_NAME)
    assert len(rows) == 3 and rows[-1].val_bpb > 0 and rows[-1].num_steps > 0 and rows[-1].tokens > 0
    # 200 MiB printed: run.log holds its first and last megabytes and says where it was cut
    size = log.stat().st_size
    assert size <= HEAD_BYTES + TAIL_BYTES + 4096, size
    text = log.read_text()
    assert "lines of output (" in text and " MiB) cut here" in text
    assert "\nstep 00000" in text and "\nnum_steps:" in text and "evaluation: " in text.rsplit("cut here", 1)[1]
    # the harness kept a bounded part in memory: its peak grew by far less than the 200 MiB it read (unbounded, it
    # held the output three times over)
    assert flooded < ordinary + (64 << 20), (flooded >> 20, ordinary >> 20)


# ---------------------------------------------------------------------------------------------
# An evaluator child that breaks the protocol


# The evaluator's child imports train.py: there, and only there, DEVICE_BATCH_SIZE is 0 (training sets its own).
BATCH_OF_NONE = ("DEVICE_BATCH_SIZE = ", "DEVICE_BATCH_SIZE = 0 if __name__ != '__main__' else ")
# In the evaluator's child, train.py rewrites the json module the harness's code in that process writes its
# first message with: the message asks for chunks of Infinity rows, which no code of the harness's expected.
INFINITE_HELLO = ("import mlx.core as mx\n", textwrap.dedent("""\
    import mlx.core as mx
    import sys as _sys
    if "autoresearch.model_server" in _sys.modules:
        import json as _json
        _dumps = _json.dumps
        _json.dumps = lambda obj, *a, **k: _dumps(
            dict(obj, rows_per_chunk=float("inf")) if isinstance(obj, dict) and "rows_per_chunk" in obj else obj,
            *a, **k)
    """))

BREAKER = """
import sys
from pathlib import Path

turn_file = Path(sys.argv[1])
turn = int(turn_file.read_text()) + 1 if turn_file.exists() else 1
turn_file.write_text(str(turn))
p = Path("backends/mlx/train.py")
source = p.read_text().replace("MATRIX_LR = ", f"MATRIX_LR = {1 - 0.1 * turn} * ", 1)
if turn <= len(EDITS):
    old, new = EDITS[turn - 1]
    source = source.replace(old, new, 1)
p.write_text(source)
Path(".autoresearch/description").write_text(f"turn {turn}")
"""


def test_an_evaluator_that_breaks_the_protocol_is_a_crash_and_the_loop_goes_on(repo_dir, tmp_path):
    train = (repo_dir / "backends/mlx/train.py").read_text()
    assert BATCH_OF_NONE[0] in train and INFINITE_HELLO[0] in train
    agent = tmp_path / "agent.py"
    agent.write_text(BREAKER.replace("EDITS", repr([BATCH_OF_NONE, INFINITE_HELLO])))
    proc = cli(repo_dir, "--backend", "mlx", "loop", "--agent", f"{sys.executable} {agent} {tmp_path / 'turn'}",
               "-n", 3, "--budget", BUDGET)
    assert proc.returncode == 0 and "loop ended: 3 experiments" in proc.stdout, proc.stdout + proc.stderr
    assert "interrupted" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    turns = [line for line in proc.stdout.splitlines() if line.startswith("turn ") and ": RESULT " in line]
    assert len(turns) == 3, proc.stdout
    for line in turns[:2]:  # each a crash of the candidate, its reason in one line
        reason = line.split("RESULT crash (evaluation: ", 1)[1].split("); log tail in", 1)[0]
        assert reason.strip(), line
    assert turns[2].startswith("turn 3: RESULT keep") or turns[2].startswith("turn 3: RESULT discard"), turns[2]
    rows = read_ledger(repo_dir / LEDGER_NAME)
    assert [r.status for r in rows[1:3]] == ["crash", "crash"] and rows[3].status in ("keep", "discard")
    assert all(r.val_bpb == 0.0 and r.samples == "-" for r in rows[1:3]) and rows[3].val_bpb > 0
    assert not git.Repo(repo_dir).is_dirty(untracked_files=True)


def test_a_first_message_nested_past_the_recursion_limit_is_the_evaluators_failure(tmp_path):
    """json.loads raises RecursionError on 60,000 open brackets: a crash of the candidate, not of the harness."""
    child = Child([sys.executable, "-c", "import sys; sys.stdin.readline(); print('[' * 60000)"],
                  tmp_path, dict(os.environ), "evaluator", os.memfd_create("logits"))
    child.start({}, timeout=60)
    try:
        with pytest.raises(EvaluatorFailed, match=r"^the evaluator exited with code 0$"):
            child.hello()
    finally:
        child.close()


@contextlib.contextmanager
def cache_on_tmpfs(tmp_path, cache, spare):
    """The prepared cache copied onto a tmpfs with spare bytes beside it. Needs root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and not {"runs", "compile"} &
               set(f.relative_to(cache).parts)) + spare  # what is copied, plus the spare
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(cache, disk / "cache", symlinks=True, ignore=shutil.ignore_patterns("runs", "compile"))
        yield disk / "cache"
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.fixture
def small_disk(tmp_path, use_cache):
    """1 MiB to spare: the candidate's checkpoint does not fit."""
    with cache_on_tmpfs(tmp_path, use_cache, 1 << 20) as cache:
        yield cache


def test_a_checkpoint_that_finds_the_disk_full_is_an_error_and_no_row(repo_dir, small_disk):
    """The machine's fault, not the program's: recorded as a crash, the same program would be refused as a repeat."""
    ledger = (repo_dir / LEDGER_NAME).read_text()
    head = git.Repo(repo_dir).head.commit.hexsha
    edit(repo_dir, MATRIX_LR=0.03)
    proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "lr 0.03", "--budget", BUDGET,
               env={"AUTORESEARCH_CACHE": str(small_disk)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: train.py failed for want of disk space ([Errno 28] No space left on device): 0.0 MiB free"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (repo_dir / LEDGER_NAME).read_text() == ledger
    assert git.Repo(repo_dir).head.commit.hexsha == head and "not measured (kept as " in proc.stderr, proc.stderr


# A candidate that fills the disk itself (fallocate: no data written, at once), says the words and fails (found by an
# attack): as the disk's fault it would have dodged its crash row
FILLS_THE_DISK = ("def main():", """def main():
    import prepare as _p
    ckpt = _p.checkpoint_dir()
    free = os.statvfs(ckpt).f_bavail * os.statvfs(ckpt).f_frsize
    fd = os.open(ckpt / "fill.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, max(0, free - (1 << 20)))
    print("OSError: [Errno 28] No space left on device", flush=True)
    sys.exit(1)


def _honest_main():""")


def test_a_candidate_that_fills_the_disk_itself_is_its_own_crash(repo_dir, tmp_path, use_cache):
    train = repo_dir / "backends/mlx/train.py"
    assert train.read_text().count(FILLS_THE_DISK[0]) == 1
    train.write_text(train.read_text().replace(*FILLS_THE_DISK))
    with cache_on_tmpfs(tmp_path, use_cache, 300 << 20) as cache:
        proc = cli(repo_dir, "--backend", "mlx", "run", "-m", "fills the disk", "--budget", BUDGET,
                   env={"AUTORESEARCH_CACHE": str(cache)})
    assert proc.returncode == EXIT["crash"], proc.stdout + proc.stderr
    assert read_ledger(repo_dir / LEDGER_NAME)[-1].status == "crash"
