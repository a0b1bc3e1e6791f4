"""Bad output from an agent's program: numbers in its summary that are not numbers, a description that is not
text, a flood of output, a checkpoint the harness's scorer must refuse. Each through the real command line or the
real loop, on a real run branch with real (few-second) training, or through the real evaluator on a real exported
checkpoint, with --sandbox off (what the harness itself must do where no OS sandbox exists). After each: a row that
parses back, commands that still work, and where an agent is driving, the next experiment runs."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import git
import numpy as np
import pytest

import prepare
from conftest import BUDGET, ROOT, TINY, cli, copy_checkout, edit, make_checkout
from autoresearch import sandbox
from autoresearch.evaluate import MAX_COPY, evaluate
from autoresearch.experiment import EXIT
from autoresearch.ledger import (COLUMNS, LEDGER_NAME, MISSING_NUMBER, format_row, git_identity, notes_rows,
                                 read_ledger)
from autoresearch.loop import build_prompt
from autoresearch.runner import HEAD_BYTES, TAIL_BYTES

SUMMARY_LINE = 'print(f"num_steps:        {step}")'


@pytest.fixture(autouse=True)
def unsandboxed(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "off")  # every command the tests start, through the environment
    # and the evaluator this process starts: a sandbox chosen earlier in this process is set aside too, so that what
    # a refused checkpoint would have done, had it run, lands where the test looks for it
    monkeypatch.setattr(sandbox, "_active", [sandbox.resolve("off")])


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
# A checkpoint the scoring process refuses or cannot use


# The graph traced for rows of half the profile's length: the harness's rows do not fit it.
HALF_ROWS = ("export_model(model, DEVICE_BATCH_SIZE, seq_len)", "export_model(model, DEVICE_BATCH_SIZE, seq_len // 2)")
# After save(), tensors.npz rewritten as an archive whose array is a pickled object: unpickled, it would run a
# command (MARKER is filled in by the test).
PICKLED = ("        save()\n", """        _folder = save()
        import numpy as _np

        class _Runs:
            def __reduce__(self):
                return (os.system, ("touch " + MARKER,))

        _np.savez(_folder / "tensors.npz", **{"lm_head.weight": _np.array([_Runs()], dtype=object)})
""")

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


def test_a_checkpoint_the_scorer_cannot_use_is_a_crash_and_the_loop_goes_on(repo_dir, tmp_path):
    marker = tmp_path / "unpickled"
    train = (repo_dir / "backends/mlx/train.py").read_text()
    assert HALF_ROWS[0] in train and train.count(PICKLED[0]) == 1
    pickled = (PICKLED[0], PICKLED[1].replace("MARKER", repr(str(marker))))
    agent = tmp_path / "agent.py"
    agent.write_text(BREAKER.replace("EDITS", repr([HALF_ROWS, pickled])))
    proc = cli(repo_dir, "--backend", "mlx", "loop", "--agent", f"{sys.executable} {agent} {tmp_path / 'turn'}",
               "-n", 3, "--budget", BUDGET)
    assert proc.returncode == 0 and "loop ended: 3 experiments" in proc.stdout, proc.stdout + proc.stderr
    assert "interrupted" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    turns = [line for line in proc.stdout.splitlines() if line.startswith("turn ") and ": RESULT " in line]
    assert len(turns) == 3, proc.stdout
    # each a crash of the candidate, its reason in one line
    reasons = [line.split("RESULT crash (evaluation: ", 1)[1].split("); log tail in", 1)[0] for line in turns[:2]]
    assert reasons[0] == "the exported graph takes rows of 128 tokens; the profile's are 256", turns[0]
    assert reasons[1].startswith("the exported model is refused: tensors.npz is not a numpy archive"), turns[1]
    assert not marker.exists(), "the harness unpickled an object train.py put in its checkpoint"
    assert turns[2].startswith("turn 3: RESULT keep") or turns[2].startswith("turn 3: RESULT discard"), turns[2]
    rows = read_ledger(repo_dir / LEDGER_NAME)
    assert [r.status for r in rows[1:3]] == ["crash", "crash"] and rows[3].status in ("keep", "discard")
    assert all(r.val_bpb == 0.0 and r.samples == "-" for r in rows[1:3]) and rows[3].val_bpb > 0
    assert not git.Repo(repo_dir).is_dirty(untracked_files=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cpu_cache):
    """(checkout, checkpoint): a tiny untrained model of the mps train.py (on the CPU) exported by
    prepare.export_model and saved, as train.py does; each test tampers with a copy of it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    try:
        root = make_checkout(tmp_path_factory.mktemp("exported") / "project", backends=("mps",), **TINY)
        spec = importlib.util.spec_from_file_location("bad_output_mps_train", ROOT / "backends/mps/train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)  # importing defines the model and trains nothing
        profile = prepare.load_profile()
        model = train.GPT(train.GPTConfig(sequence_len=profile.seq_len, vocab_size=profile.vocab_size, n_layer=2,
                                          n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL"))
        model.init_weights()
        checkpoint = prepare.export_model(model, 8, profile.seq_len, train.autocast_ctx())(root.parent / "checkpoint")
    finally:
        mp.undo()
    return root, checkpoint


def tampered(exported, tmp_path):
    """A copy of the exported checkpoint, for one test to break."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(exported[1], copy)
    return copy


def test_the_exported_checkpoint_untouched_is_scored(exported, tmp_path, use_cache):
    """The control for the tests below: the checkpoint they break scores before it is broken."""
    result = evaluate("mps", exported[0], tampered(exported, tmp_path), timeout=300)
    assert result.status == "ok" and 0 < result.val_bpb < 100, result.log


def other_operator(target):
    """graph.json's first node calling target instead of its own operator (its arguments as they were)."""
    def tamper(folder, marker):
        program = json.loads((folder / "graph.json").read_text())
        program["graph_module"]["graph"]["nodes"][0]["target"] = target
        (folder / "graph.json").write_text(json.dumps(program))
    return tamper


def eval_call(folder, marker):
    """A node that, if the scorer called its target, would evaluate Python the checkpoint wrote."""
    program = json.loads((folder / "graph.json").read_text())
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "builtins.eval"
    node["inputs"] = [{"name": "source", "arg": {"as_string": f"open({str(marker)!r}, 'w')"}, "kind": 1}]
    (folder / "graph.json").write_text(json.dumps(program))


def nested_graph(folder, marker):
    (folder / "graph.json").write_text("[" * 100_000)  # json.loads raises RecursionError on it


def pickled_tensors(folder, marker):
    """tensors.npz with a weight that is a pickled object: loading it would run a command."""
    class Runs:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with np.load(folder / "tensors.npz") as f:
        arrays = {name: f[name] for name in f.files}
    arrays["lm_head.weight"] = np.array([Runs()], dtype=object)
    np.savez(folder / "tensors.npz", **arrays)


def truncated_tensors(folder, marker):
    data = (folder / "tensors.npz").read_bytes()
    (folder / "tensors.npz").write_bytes(data[: len(data) // 2])


def random_tensors(folder, marker):
    (folder / "tensors.npz").write_bytes(os.urandom(4096))


def no_tensors(folder, marker):
    (folder / "tensors.npz").unlink()


def linked_tensors(folder, marker):
    """tensors.npz a link to a good copy elsewhere: what a link names (the validation rows, say) is never read."""
    elsewhere = folder.parent / "elsewhere.npz"
    (folder / "tensors.npz").rename(elsewhere)
    (folder / "tensors.npz").symlink_to(elsewhere)


def sparse_tensors(folder, marker):
    """tensors.npz grown past what the evaluator copies, a hole that costs train.py no disk at all."""
    os.truncate(folder / "tensors.npz", MAX_COPY["tensors.npz"] + 1)


def fifo_graph(folder, marker):
    """graph.json a FIFO no one writes: opened for reading, it would hold the harness."""
    (folder / "graph.json").unlink()
    os.mkfifo(folder / "graph.json")


REFUSED = re.escape("the exported model is refused: ")
NOT_AN_ARCHIVE = REFUSED + re.escape("tensors.npz is not a numpy archive of arrays")


@pytest.mark.parametrize("tamper, reason", [
    (other_operator("torch.ops.aten.rand.default"), REFUSED + r"the graph calls torch\.ops\.aten\.rand\.default, "
                                                              "which is not among the operators the referee runs"),
    (other_operator("torch.ops.aten.empty.memory_format"), REFUSED + r"the graph calls torch\.ops\.aten\.empty\."),
    (eval_call, REFUSED + r"the graph calls builtins\.eval, which is not among the operators the referee runs"),
    (nested_graph, REFUSED + r"graph\.json is not a torch\.export program$"),
    (pickled_tensors, NOT_AN_ARCHIVE + r" \(ValueError\)$"),
    (random_tensors, NOT_AN_ARCHIVE),
    (truncated_tensors, NOT_AN_ARCHIVE),
    (no_tensors, "train.py saved no checkpoint in "),
    (linked_tensors, "train.py saved no checkpoint in "),  # a link is no checkpoint: never followed
    (fifo_graph, REFUSED + r".*graph\.json"),  # not copied: the scorer's folder has no graph.json
    (sparse_tensors, r"the checkpoint's tensors\.npz is [\d,]+ bytes, over the [\d,]+ the evaluator reads$"),
], ids=["rand", "empty", "eval", "nested", "pickled", "random-bytes", "truncated", "missing", "symlink", "fifo",
        "sparse"])
def test_a_checkpoint_the_scorer_cannot_use_is_a_crash_in_one_line(exported, tmp_path, use_cache, tamper, reason):
    checkpoint, marker = tampered(exported, tmp_path), tmp_path / "ran"
    tamper(checkpoint, marker)
    started = time.time()
    result = evaluate("mps", exported[0], checkpoint, timeout=300)
    assert result.status == "crash" and result.val_bpb is None, result.log
    assert re.match(reason, result.reason) and "\n" not in result.reason, result.reason
    assert "Traceback" not in result.reason and len(result.reason) < 600, result.reason
    assert not marker.exists(), "the harness ran what the checkpoint held"
    assert time.time() - started < 120, "the harness waited on the checkpoint"  # a FIFO is never opened blocking


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
