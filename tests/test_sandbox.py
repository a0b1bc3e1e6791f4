"""The OS sandbox under attack: each thing an untrusted train.py (the trainer; the evaluator never imports it) or
agent command could try against the referee, run end to end through `autoresearch run` / `loop` on a real run branch set up under
bubblewrap, with real training. Every attack must leave the branch, the ledger, the notes, the harness's state and
the cache as they were; honest runs on a loaded machine must still be judged, never invalid.

The attack code prints `PROBE key: value` lines; the harness keeps the whole trainer log in .autoresearch/run.log
(and an agent's output in .autoresearch/agent.log), which is what the assertions read. tests/test_trust.py covers
what the in-process checks catch without a sandbox."""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import git
import pytest

import prepare
from autoresearch import sandbox
from autoresearch.clock import Clock
from autoresearch.experiment import SLOWED_MARK
from autoresearch.ledger import read_ledger
from autoresearch.runner import start_time
from conftest import BUDGET, SHARED_DATA, cli, edit

HAS_BWRAP = sandbox.resolve("auto").kind == "bwrap"
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed or cannot make namespaces here")
GIT_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]  # the test's own git reads run nothing
TRAIN = "backends/mlx/train.py"

# ---------------------------------------------------------------------------
# Helpers: writing attacks into train.py, running them, reading what they printed, checking nothing changed
# ---------------------------------------------------------------------------

PROBE_HELPER = '''
import os, sys
from pathlib import Path


def probe(key, value):
    print(f"PROBE {key}: {value}", flush=True)

'''


def fill(template, **values):
    """The attack's source with @NAME@ replaced by repr(value): paths and tokens the test knows."""
    for name, value in values.items():
        template = template.replace(f"@{name}@", repr(value))
    assert not re.search(r"@[A-Z_]+@", template), template
    return template


def cheat(root, old, new):
    train = root / TRAIN
    source = train.read_text()
    assert old in source, old
    train.write_text(source.replace(old, new, 1))


def at_start_of(root, function, code):
    """code (dedented) as the first statements of train.py's function (main: the trainer), with probe() defined."""
    body = textwrap.indent(textwrap.dedent(PROBE_HELPER) + textwrap.dedent(code), "    ")
    signature = {"main": "def main():\n"}[function]
    cheat(root, signature, signature + body)


def run(root, message, *args, env=None, timeout=600):
    proc = cli(root, "--backend", "mlx", "run", "-m", message, "--budget", BUDGET, "--gate", "greedy", *args,
               env=env, timeout=timeout)
    return proc, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def run_log(root):
    path = root / ".autoresearch" / "run.log"
    return path.read_text() if path.exists() else ""


def probes(text):
    """{key: value} of the PROBE lines in a log (the last value of a key wins)."""
    found = {}
    for line in text.splitlines():
        m = re.search(r"PROBE (.+?): (.*)$", line)
        if m:
            found[m[1]] = m[2]
    return found


def git_out(root, *args):
    return subprocess.run(["git", *GIT_SAFE, *args], cwd=root, capture_output=True, text=True).stdout


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(folder, skip=()):
    """{relative path: sha256} of every file under folder, links as their target, folders in skip aside."""
    folder, found = Path(folder), {}
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if str((Path(here) / d).relative_to(folder)) not in skip]
        for name in files:
            path = Path(here) / name
            rel = str(path.relative_to(folder))
            found[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else sha256(path)
    return found


def cache_digest(cache):
    return tree_digest(cache, skip=("runs",))  # runs/: the harness's temporary checkpoints


def snapshot(root):
    """Everything of a checkout the referee decides by or runs: the refs (branch, notes), HEAD, the ledger, the
    harness's state files, git's control files, index flags and the working tree's status."""
    gitdir = Path(root) / ".git"
    state = Path(root) / ".autoresearch"
    return {
        "HEAD": git_out(root, "rev-parse", "HEAD"),
        "refs": git_out(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags",
                        "refs/autoresearch"),
        "notes": git_out(root, "notes", "--ref", "autoresearch", "list"),
        "results.tsv": (Path(root) / "results.tsv").read_bytes(),
        "noise.json": (state / "noise.json").read_bytes() if (state / "noise.json").exists() else None,
        "pid files": sorted(p.name for p in state.glob("*.pid")),
        "config": (gitdir / "config").read_bytes(),
        "hooks": tree_digest(gitdir / "hooks"),
        "info": tree_digest(gitdir / "info"),
        "flags": [line for line in git_out(root, "ls-files", "-v").splitlines() if not line.startswith("H ")],
        "status": git_out(root, "status", "--porcelain", "--untracked-files=all"),
    }


def assert_unchanged(before, after, allow=()):
    changed = sorted(k for k in before if k not in allow and before[k] != after[k])
    assert not changed, {k: (before[k], after[k]) for k in changed}


def assert_not_kept(root, proc, closing, baseline_head, statuses=("crash",)):
    """The attack's run got one row of the given status, exit code to match, and the branch is back at the
    baseline with a clean tree."""
    codes = {"crash": 4, "invalid": 6}
    assert proc.returncode in [codes[s] for s in statuses], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert closing.startswith(tuple(f"RESULT {s}" for s in statuses)), closing
    rows = read_ledger(root / "results.tsv")
    assert [r.status for r in rows] == ["keep", rows[-1].status] and rows[-1].status in statuses, rows
    assert rows[-1].sandbox == "bwrap", rows[-1]
    assert git_out(root, "rev-parse", "HEAD").strip() == baseline_head
    assert not git.Repo(root).is_dirty(untracked_files=True)
    return rows[-1]


def head(root):
    return git_out(root, "rev-parse", "HEAD").strip()


def processes_with(marker):
    """(pid, command line) of every process on the host whose command line holds marker, this one aside."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append((int(entry.name), cmdline.strip()))
    return found


def kill_all(found):
    for pid, _ in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def baseline(repo_dir):
    """(head sha, snapshot) of the freshly copied run branch, before any attack."""
    rows = read_ledger(repo_dir / "results.tsv")
    assert [r.status for r in rows] == ["keep"] and rows[0].sandbox == "bwrap", rows
    return head(repo_dir), snapshot(repo_dir)


def honest_run_is_judged(root, message="honest lr", **constants):
    """An honest edit after an attack: it keeps or discards, confined, timed by the harness."""
    edit(root, **(constants or {"MATRIX_LR": 0.05}))
    proc, closing = run(root, message)
    assert proc.returncode in (0, 3) and closing.startswith(("RESULT keep", "RESULT discard")), \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    row = read_ledger(root / "results.tsv")[-1]
    assert row.status in ("keep", "discard") and row.sandbox == "bwrap" and row.startup_seconds > 0
    # on a busy machine the row may say the machine slowed it (issue 24): that is the harness's note, not a verdict
    assert row.step_seconds > 0 and row.harness_seconds > 0 and row.description.split(f" {SLOWED_MARK} ")[0] == message
    return row


# ---------------------------------------------------------------------------
# Honest runs: judged normally, confined, never invalid
# ---------------------------------------------------------------------------


@needs_bwrap
def test_an_honest_edit_keeps_or_discards_in_the_sandbox(repo_dir, baseline):
    row = honest_run_is_judged(repo_dir)
    assert row.val_bpb > 1.0 and abs(row.val_bpb - read_ledger(repo_dir / "results.tsv")[0].val_bpb) < 0.5


@needs_bwrap
def test_an_honest_edit_on_a_loaded_machine_is_not_invalid(repo_dir, baseline):
    loaders = []
    try:
        for core in sorted(os.sched_getaffinity(0)):
            loader = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            os.sched_setaffinity(loader.pid, {core})
            loaders.append(loader)
        honest_run_is_judged(repo_dir, "honest under load")
    finally:
        for loader in loaders:
            loader.kill()
            loader.wait()

# ---------------------------------------------------------------------------
# The cache: what the harness scores with
# ---------------------------------------------------------------------------

TOKEN_BYTES_ATTACK = '''
import numpy as np
wrote = []
for where, path in (("view", Path(os.environ["AUTORESEARCH_CACHE"]) / "tokenizer" / "token_bytes.npy"),
                    ("real", Path(@CACHE@) / "tokenizer" / "token_bytes.npy")):
    try:
        counts = np.load(path)
        with open(path, "r+b") as f:  # in place, the same inode: what a hard link into the cache would share
            np.save(f, counts * 2)  # twice the bytes per token: half the val_bpb
        wrote.append(where)
        probe(f"token_bytes {where}", "doubled")
    except Exception as e:
        probe(f"token_bytes {where}", f"{type(e).__name__}: {e}")
if not wrote:
    sys.exit("FAIL: the byte counts could not be rewritten")
'''


@needs_bwrap
def test_token_bytes_rewritten_through_the_cache_is_refused(repo_dir, use_cache, baseline):
    before = cache_digest(use_cache)
    at_start_of(repo_dir, "main", fill(TOKEN_BYTES_ATTACK, CACHE=str(use_cache)))
    proc, closing = run(repo_dir, "double the byte counts")
    found = probes(run_log(repo_dir))
    assert "Read-only file system" in found["token_bytes view"], found
    assert found["token_bytes real"].startswith(("FileNotFoundError", "OSError", "PermissionError")), found
    assert_not_kept(repo_dir, proc, closing, baseline[0])
    prepare.check_cache()  # the real cache, as prepare recorded it
    assert cache_digest(use_cache) == before
    assert_unchanged(baseline[1], snapshot(repo_dir), allow=("results.tsv", "notes"))

# ---------------------------------------------------------------------------
# Writing what the harness or a later run reads
# ---------------------------------------------------------------------------

WRITE_ATTACK = '''
import json, py_compile, subprocess, sysconfig, importlib.util
root = Path.cwd()


def attempt(name, action):
    try:
        action()
        probe(f"write {name}", "ok")
    except Exception as e:
        probe(f"write {name}", f"{type(e).__name__}: {e}")


def write(path, text, mode=0o644):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    os.chmod(path, mode)


def same_bytes(path):
    """Write a file's first byte back over itself: proves it writable without changing what others read."""
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(first)


# a post-commit hook that rewrites the ledger's best row, run by the next harness commit
hook = "#!/bin/sh\\nsed -i '2s/\\\\t[0-9.]*\\\\t/\\\\t0.000001\\\\t/' results.tsv\\ntouch " + @HOOK_RAN@ + "\\n"
attempt("hook", lambda: write(root / ".git/hooks/post-commit", hook, 0o755))
attempt("hook via hooksPath", lambda: write(root / ".git/evil-hooks/post-commit", hook, 0o755))
rows = (root / "results.tsv").read_text().splitlines()
forged = rows[-1].split("\\t")
forged[1] = "0.000001"
attempt("results.tsv", lambda: open(root / "results.tsv", "a").write("\\t".join(forged) + "\\n"))
attempt("noise.json", lambda: write(root / ".autoresearch/noise.json",
                                    json.dumps({"forged": {"samples": [0.0], "spread": -5, "commit": "x"}})))
attempt("pid file", lambda: write(root / ".autoresearch/victim.pid", @VICTIM@))
attempt("trainer.pid", lambda: write(root / ".autoresearch/trainer.pid", @VICTIM@))
attempt(".git/config", lambda: open(root / ".git/config", "a").write(
    "[core]\\n\\thooksPath = .git/evil-hooks\\n\\tfsmonitor = touch " + @FSMONITOR_RAN@ + "\\n"))
attempt("new ref", lambda: write(root / ".git/refs/heads/forged", (root / ".git/HEAD").read_text()))
attempt("prepare.py", lambda: open(root / "prepare.py", "a").write("\\n# changed by train.py\\n"))
flags = subprocess.run(["git", "update-index", "--skip-worktree", "prepare.py"], capture_output=True, text=True)
probe("write skip-worktree", "ok" if flags.returncode == 0 else f"git exit {flags.returncode}: "
      + (flags.stderr.strip().splitlines() or ["?"])[-1])
site = Path(sysconfig.get_paths()["purelib"])
attempt("venv .pth", lambda: write(site / @PTH_NAME@, "import os; open(" + repr(@PTH_RAN@) + ", 'w')\\n"))
attempt("checkout bytecode", lambda: py_compile.compile(str(root / "prepare.py"), doraise=True,
        cfile=str(root / "__pycache__" / f"prepare.{sys.implementation.cache_tag}.pyc")))
attempt("harness prepare.py", lambda: same_bytes(@HARNESS_PREPARE@))
evaluator = importlib.util.find_spec("autoresearch.evaluate").origin  # the harness's own package, bound read-only
attempt("harness bytecode", lambda: py_compile.compile(evaluator, doraise=True,
        cfile=importlib.util.cache_from_source(evaluator)))
view = Path(os.environ["AUTORESEARCH_CACHE"])
attempt("view hard link", lambda: same_bytes(next(p for p in sorted((view / "tokens").glob("*")) if p.is_file())))
attempt("view profile.json", lambda: same_bytes(view / "profile.json"))
sys.exit("FAIL: attack done")
'''


@needs_bwrap
def test_writes_to_the_checkout_the_venv_and_the_cache_fail_and_the_next_commit_runs_no_hook(
        repo_dir, use_cache, baseline, tmp_path):
    token = uuid.uuid4().hex[:12]
    markers = {name: tmp_path / f"{name}-ran" for name in ("hook", "fsmonitor", "pth")}
    pth = Path(__import__("sysconfig").get_paths()["purelib"]) / f"zz_sandbox_test_{token}.pth"
    victim = subprocess.Popen(["sleep", "600"], start_new_session=True)  # what a planted pid file would kill
    try:
        time.sleep(0.2)
        victim_line = f"{victim.pid} {start_time(victim.pid)} sleep 600\n"
        cache_before = cache_digest(use_cache)
        prepare_before = (repo_dir / "prepare.py").read_bytes()
        at_start_of(repo_dir, "main", fill(WRITE_ATTACK, HOOK_RAN=str(markers["hook"]), VICTIM=victim_line,
                                           FSMONITOR_RAN=str(markers["fsmonitor"]), PTH_NAME=pth.name,
                                           PTH_RAN=str(markers["pth"]), HARNESS_PREPARE=prepare.__file__))
        proc, closing = run(repo_dir, "write what the harness reads")
        found = probes(run_log(repo_dir))
        writes = {k[len("write "):]: v for k, v in found.items() if k.startswith("write ")}
        assert len(writes) == 16, found
        # the harness's state folder is covered by an empty, private folder: writes there land on the cover and
        # vanish with the run (the snapshot below shows the real files unchanged); every other write is refused
        covered = ("noise.json", "pid file", "trainer.pid")
        assert not [k for k, v in writes.items() if v == "ok" and k not in covered], writes
        assert all("Read-only file system" in v or v.startswith("FileNotFoundError") for k, v in writes.items()
                   if k not in ("skip-worktree", *covered)), writes
        assert_not_kept(repo_dir, proc, closing, baseline[0])
        assert_unchanged(baseline[1], snapshot(repo_dir), allow=("results.tsv", "notes"))
        assert not pth.exists() and not (repo_dir / "__pycache__").exists()
        assert (repo_dir / "prepare.py").read_bytes() == prepare_before
        assert cache_digest(use_cache) == cache_before
        # the next harness commit and everything after it: no hook, no fsmonitor, no .pth, no pid file obeyed
        after_attack = snapshot(repo_dir)
        honest_run_is_judged(repo_dir)
        assert not [m for m in markers.values() if m.exists()], "planted code ran in the harness"
        assert victim.poll() is None, "the harness killed the process a planted pid file named"
        rows = read_ledger(repo_dir / "results.tsv")
        assert [r.status for r in rows][:2] == ["keep", "crash"] and len(rows) == 3
        assert all(r.val_bpb > 1.0 for r in rows if r.status in ("keep", "discard")), rows
        assert_unchanged(after_attack, snapshot(repo_dir), allow=("results.tsv", "notes", "HEAD", "refs", "status"))
    finally:
        victim.kill()
        victim.wait()
        pth.unlink(missing_ok=True)

# ---------------------------------------------------------------------------
# Processes that outlive their run
# ---------------------------------------------------------------------------

DAEMON_ATTACK = '''
import subprocess
root = Path.cwd()
# after the run: a keep row at a fake val_bpb, a git note, the branch moved back to the project's first commit
forge = ("sleep @DELAY@; cd " + str(root) + "; : @MARK@; "
         "tail -n 1 results.tsv | sed 's/\\\\t[0-9.]*\\\\t/\\\\t0.000001\\\\t/' >> results.tsv; "
         "git -c user.name=x -c user.email=x@x notes --ref autoresearch append -m forged HEAD; "
         "git update-ref refs/heads/@BRANCH@ "
         "$(git -c user.name=x -c user.email=x@x commit-tree 'HEAD^{tree}' -m forged); "
         "touch forged-by-daemon")
# 1. setsid, then a background subshell: double-forked, its own session, re-parented away from the trainer
subprocess.run(["setsid", "sh", "-c", "( " + forge + " ) >/dev/null 2>&1 </dev/null &"])
# 2. os.fork + os.setsid + a second fork, exec'ing the forger
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.execvp("sh", ["sh", "-c", forge])
    os._exit(0)
os.waitpid(pid, 0)
# 3. nohup, ignoring every catchable signal, in a new session
subprocess.Popen(["nohup", "sh", "-c", "trap '' HUP TERM INT QUIT; " + forge], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
probe("daemons", "started")
sys.exit("FAIL: the daemons will forge the result")
'''


@needs_bwrap
def test_daemons_started_by_train_py_die_with_the_run(repo_dir, baseline):
    delay = 15 + int(uuid.uuid4().int % 10_000) / 10_000  # a sleep the harness's run ends well inside
    mark = f"{delay:.4f}"
    repo = git.Repo(repo_dir)
    at_start_of(repo_dir, "main", fill(DAEMON_ATTACK, DELAY=mark, MARK=f"sandbox-daemon-{mark}",
                                       BRANCH=repo.active_branch.name))
    try:
        started = time.time()
        proc, closing = run(repo_dir, "daemons")
        assert probes(run_log(repo_dir)).get("daemons") == "started", run_log(repo_dir)[-3000:]
        assert time.time() - started < delay, "the run took longer than the daemons sleep: the test proves nothing"
        left = processes_with(mark)
        assert not left, f"processes started by train.py outlived the run: {left}"
        after = snapshot(repo_dir)
        time.sleep(max(0.0, started + delay + 3 - time.time()))  # past the moment they would have forged
        assert_not_kept(repo_dir, proc, closing, baseline[0])
        assert_unchanged(after, snapshot(repo_dir))
        assert not (repo_dir / "forged-by-daemon").exists()
    finally:
        kill_all(processes_with(mark))

# ---------------------------------------------------------------------------
# Time outside the harness's clock
# ---------------------------------------------------------------------------


@needs_bwrap
def test_work_before_the_first_progress_line_is_invalid(repo_dir, baseline):
    # past the startup allowance the branch's clock gives (twice the baseline's startup, plus slack), by 15 s
    hidden = round(Clock.for_baseline(float(BUDGET), read_ledger(repo_dir / "results.tsv")[0]).startup + 15)
    at_start_of(repo_dir, "main", f'''
        import time
        t0 = time.time()
        while time.time() - t0 < {hidden}:  # training no clock sees: before the first `step` line
            pass
        probe("hidden work", f"{{time.time() - t0:.0f}}s")
    ''')
    # a hard limit past the spin: on a slow machine twice a cold start can be more than the default limit
    proc, closing = run(repo_dir, f"{hidden} s before step 0", "--timeout", hidden + 240)
    assert probes(run_log(repo_dir)).get("hidden work") == f"{hidden}s"
    assert "startup allowance" in closing, closing
    assert_not_kept(repo_dir, proc, closing, baseline[0], statuses=("invalid",))


# Code that runs only where train.py is imported, never where it runs as the trainer: the old evaluator imported
# train.py to rebuild the model, and a minute of work or a print of the rows it was sent would have hidden there.
# The evaluator now runs the graph train.py exported with the harness's code alone.
IMPORTED_ONLY = '''
if __name__ != "__main__":
    import time as _time
    print(f"PROBE imported: as {__name__}", file=sys.stderr, flush=True)
    _time.sleep(70)  # past the evaluator's 60 s to load the graph: where a minute of training would hide
'''


@needs_bwrap
def test_code_that_runs_when_train_py_is_imported_never_runs_in_the_evaluator(repo_dir, baseline):
    cheat(repo_dir, "def main():\n", IMPORTED_ONLY + "\n\ndef main():\n")
    proc, closing = run(repo_dir, "work on import")
    assert proc.returncode in (0, 3) and closing.startswith(("RESULT keep", "RESULT discard")), \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PROBE imported" not in run_log(repo_dir)  # the evaluator's log before it holds rows is in run.log
    row = read_ledger(repo_dir / "results.tsv")[-1]
    assert row.sandbox == "bwrap" and 0 < row.eval_seconds < 60, row  # scored without the 70 s sleep


# ---------------------------------------------------------------------------
# Nothing carries over from one run to the next: weights, validation rows
# ---------------------------------------------------------------------------

PERSIST_PLACES = '''
token = @TOKEN@
places = ["/tmp", os.path.expanduser("~"), "/dev/shm", "/var/tmp", "/run", "/",
          str(Path(os.environ["AUTORESEARCH_CHECKPOINT"]).parent), str(Path(os.environ["AUTORESEARCH_CACHE"]).parent),
          str(Path(os.environ["AUTORESEARCH_CACHE"]) / "tokens"), str(Path.cwd() / ".autoresearch")]
places = [str(Path(p) / f"ar-persist-{token}") for p in places]
'''

SAVE_ATTACK = PERSIST_PLACES + '''
SECRET[:] = [os.urandom(8).hex()]  # stands for this run's trained weights
probe("secret", SECRET[0])
for place in places:
    try:
        Path(place).write_text(SECRET[0])
        probe(f"saved {place}", "ok")
    except Exception as e:
        probe(f"saved {place}", type(e).__name__)
'''

# The secret also travels in the checkpoint: an extra array in tensors.npz, which the evaluator copies and loads
# (it reads only the arrays the graph takes). The graph is traced for rows of half the profile's length, so the
# evaluation crashes once the graph is loaded and the run is not kept.
HALF_ROWS = ("export_model(model, DEVICE_BATCH_SIZE, seq_len)", "export_model(model, DEVICE_BATCH_SIZE, seq_len // 2)")
SECRET_IN_CHECKPOINT = ("        save()\n", """        _folder = save()
        import numpy as _np
        with _np.load(_folder / "tensors.npz") as _f:
            _arrays = {_k: _f[_k] for _k in _f.files}
        _np.savez(_folder / "tensors.npz", ar_secret=_np.frombuffer(SECRET[0].encode(), _np.uint8), **_arrays)
""")

LOAD_ATTACK = PERSIST_PLACES + '''
for place in places:
    if Path(place).exists():
        probe(f"found {place}", Path(place).read_text())
for log in sorted((Path.cwd() / ".autoresearch").glob("*")) + [Path.cwd() / "results.tsv"]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    for line in text.splitlines():
        if "PROBE secret: " in line:  # the last run's trainer printed its weights
            probe(f"log weights {log.name}", line.split("PROBE secret: ", 1)[1])
sys.exit("FAIL: probed")
'''


@needs_bwrap
def test_nothing_a_run_leaves_reaches_the_next_one(repo_dir, baseline):
    token = uuid.uuid4().hex[:12]
    cheat(repo_dir, "def main():\n", "SECRET = []\n\n\ndef main():\n")
    at_start_of(repo_dir, "main", fill(SAVE_ATTACK, TOKEN=token))
    cheat(repo_dir, *HALF_ROWS)
    cheat(repo_dir, *SECRET_IN_CHECKPOINT)
    proc, closing = run(repo_dir, "save everywhere")
    first = probes(run_log(repo_dir))
    secret = first["secret"]
    assert_not_kept(repo_dir, proc, closing, baseline[0])
    assert "the exported graph takes rows of 128 tokens" in closing, closing
    # the host never saw any of the places the first run wrote
    host = [Path(p[len("saved "):]) for p in first if p.startswith("saved ")]
    assert len(host) == 10 and not [p for p in host if p.exists()], [p for p in host if p.exists()]

    (repo_dir / TRAIN).write_text(git.Repo(repo_dir).head.commit.tree[TRAIN].data_stream.read().decode())
    at_start_of(repo_dir, "main", fill(LOAD_ATTACK, TOKEN=token))
    proc, closing = run(repo_dir, "load what the last run left")
    found = probes(run_log(repo_dir))
    assert closing.startswith("RESULT crash") and "FAIL: probed" in run_log(repo_dir)
    assert not [k for k in found if k.startswith("found ")], found
    # the harness's own logs, in the checkout: the last run's output (its weights, here) must be out of reach
    weights = {k: v for k, v in found.items() if k.startswith("log weights") and secret in v}
    assert not weights, f"through the harness's log, the first run's weights reached the second: {weights}"

# ---------------------------------------------------------------------------
# Validation data by any path; other processes; the network
# ---------------------------------------------------------------------------

READ_ATTACK = '''
import socket
view = Path(os.environ["AUTORESEARCH_CACHE"])
hidden = {"val_rows.npy", "holdout_rows.npy", @VAL_FILE@, Path(@VAL_FILE@).stem + ".npy",
          Path(@VAL_FILE@).stem + ".offsets.npy"}
# walk up from the view: every folder it sits in, and everything under them
seen = []
for folder in [view, *view.parents][:-1]:
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".git"]
        seen += [str(Path(here) / f) for f in files if f in hidden]
probe("walk found", sorted(set(seen)) or "none")
probe("root holds", sorted(os.listdir("/")))
for rel in ("tokens/val_rows.npy", "tokens/holdout_rows.npy", "data/" + @VAL_FILE@,
            "tokens/" + Path(@VAL_FILE@).stem + ".npy", "profile.json"):
    try:
        probe(f"read real {rel}", f"{len(Path(@CACHE@, rel).read_bytes())} bytes")
    except Exception as e:
        probe(f"read real {rel}", type(e).__name__)
try:
    from prepare import get_val_rows
    probe("loader val rows", f"{len(get_val_rows())} rows")
except Exception as e:
    probe("loader val rows", type(e).__name__)
for name, path in (("shared data", @SHARED@), ("shared data relative", "../shared/data"),
                   ("project", @PROJECT@)):
    probe(name, sorted(os.listdir(path)) if os.path.isdir(path) else "absent")
probe("processes", len([p for p in os.listdir("/proc") if p.isdigit()]))
try:
    probe("harness environment", f"{len(Path('/proc', str(@HARNESS_PID@), 'environ').read_bytes())} bytes")
except Exception as e:
    probe("harness environment", type(e).__name__)
try:
    socket.create_connection(("127.0.0.1", @PORT@), timeout=3).sendall(b"from the trainer")
    probe("tcp 127.0.0.1", "connected")
except Exception as e:
    probe("tcp 127.0.0.1", type(e).__name__)
try:
    unix = socket.socket(socket.AF_UNIX)
    unix.settimeout(3)
    unix.connect("\\0" + @ABSTRACT@)
    probe("abstract socket", "connected")
except Exception as e:
    probe("abstract socket", type(e).__name__)
try:
    socket.getaddrinfo("pypi.org", 443)
    probe("dns", "resolved")
except Exception as e:
    probe("dns", type(e).__name__)
sys.exit("FAIL: probed")
'''


class Listener:
    """A TCP server on 127.0.0.1 and an abstract unix socket, counting who connects."""

    def __init__(self):
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.unix = socket.socket(socket.AF_UNIX)
        self.name = f"autoresearch-sandbox-{uuid.uuid4().hex[:12]}"
        self.unix.bind("\0" + self.name)
        self.unix.listen()
        self.port = self.tcp.getsockname()[1]
        self.connections, self.open = [], True
        for s in (self.tcp, self.unix):
            s.settimeout(0.5)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        while self.open:
            try:
                conn, _ = s.accept()
                self.connections.append(s.family)
                conn.close()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def close(self):
        self.open = False
        self.tcp.close()
        self.unix.close()


@needs_bwrap
def test_validation_data_other_processes_and_the_network_are_out_of_reach(repo_dir, use_cache, baseline):
    listener = Listener()
    try:
        at_start_of(repo_dir, "main", fill(READ_ATTACK, VAL_FILE=prepare.VAL_FILENAME, CACHE=str(use_cache),
                                           SHARED=str(SHARED_DATA), PROJECT=str(Path(__file__).resolve().parents[1]),
                                           HARNESS_PID=os.getpid(), PORT=listener.port, ABSTRACT=listener.name))
        proc, closing = run(repo_dir, "read and connect")
        found = probes(run_log(repo_dir))
    finally:
        listener.close()
    assert found["walk found"] == "none", found
    for rel in ("tokens/val_rows.npy", "tokens/holdout_rows.npy", "data/" + prepare.VAL_FILENAME, "profile.json"):
        assert found[f"read real {rel}"] == "FileNotFoundError", found
    assert found["loader val rows"] == "PrepareError", found
    assert found["shared data"] == found["shared data relative"] == "absent", found
    assert "tests" not in found["project"] and "README.md" not in found["project"], found  # only what Python needs
    assert int(found["processes"]) <= 4, found  # bwrap's init, the trainer and its threads' helpers at most
    assert found["harness environment"] in ("FileNotFoundError", "PermissionError"), found
    assert found["tcp 127.0.0.1"] != "connected" and found["abstract socket"] != "connected", found
    assert found["dns"] != "resolved" and not listener.connections, (found, listener.connections)
    assert_not_kept(repo_dir, proc, closing, baseline[0])

# ---------------------------------------------------------------------------
# The mounts themselves: a process with capabilities in its namespace could remount its binds writable
# ---------------------------------------------------------------------------

REMOUNT_ATTACK = '''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 2, 4, 32, 4096
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
probe("CapEff", status["CapEff"].strip())


def remount_rw(path):
    for flags in (MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, MS_REMOUNT | MS_BIND):
        if libc.mount(b"none", str(path).encode(), None, flags, None) == 0:
            return "ok"
    return os.strerror(ctypes.get_errno())


for where, path in (("checkout", Path.cwd()), ("view", Path(os.environ["AUTORESEARCH_CACHE"]))):
    probe(f"remount {where}", remount_rw(path))
    try:
        (path / @ESCAPED@).write_text("written from inside the sandbox")
        probe(f"escaped {where}", "wrote")
    except OSError as e:
        probe(f"escaped {where}", type(e).__name__)
# what else would open up, checked without writing a byte: the system, the interpreter, the harness's code
import importlib.util
harness = importlib.util.find_spec("autoresearch").submodule_search_locations[0]
for where, path in (("usr", "/usr"), ("etc", "/etc"), ("venv", sys.prefix), ("harness", harness)):
    probe(f"remount {where}", remount_rw(path))
    probe(f"writable {where}", os.access(path, os.W_OK))
sys.exit("FAIL: probed")
'''


@needs_bwrap
def test_a_trainer_cannot_remount_its_read_only_binds(repo_dir, use_cache, baseline):
    escaped = f"escaped-{uuid.uuid4().hex[:12]}"
    view = prepare.trainer_view()
    at_start_of(repo_dir, "main", fill(REMOUNT_ATTACK, ESCAPED=escaped))
    try:
        proc, closing = run(repo_dir, "remount")
        found = probes(run_log(repo_dir))
        through = [p for p in (repo_dir / escaped, view / escaped) if p.exists()]
        opened = [k for k, v in found.items() if (k.startswith("remount") and v == "ok") or v == "True"]
        assert not through and not opened, (f"train.py wrote through its read-only binds to the host: {through}; "
                                            f"{opened}; {found}")
        assert int(found["CapEff"], 16) == 0, found
        assert_not_kept(repo_dir, proc, closing, baseline[0])
    finally:
        for p in (repo_dir / escaped, view / escaped):
            p.unlink(missing_ok=True)

# ---------------------------------------------------------------------------
# The agent's turn: a scratch clone, the real checkout and the cache out of sight
# ---------------------------------------------------------------------------

AGENT_PREAMBLE = '''#!/bin/sh
probe() { echo "PROBE $1: $2"; }
attempt() { name=$1; shift; if ( "$@" ) >/dev/null 2>&1; then probe "$name" ok; else probe "$name" refused; fi; }
'''

AGENT_ATTACK = AGENT_PREAMBLE + '''
attempt "see checkout" test -e $REAL/results.tsv
attempt "see cache" test -e $CACHE/tokens/val_rows.npy
sed -i 's/^MATRIX_LR = .*/MATRIX_LR = 0.05  # the agent/' backends/mlx/train.py
echo "agent: MATRIX_LR 0.05" > .autoresearch/description
# by absolute path (where the real checkout is hidden, these land on the empty folder that covers it)
attempt "ledger" sh -c "printf 'forged\\t0.000001\\t0.0\\tkeep\\tby the agent\\n' >> $REAL/results.tsv"
attempt "noise floor" sh -c "mkdir -p $REAL/.autoresearch && \\
echo '{\\"forged\\": {\\"samples\\": [0.0], \\"spread\\": -5, \\"commit\\": \\"x\\"}}' > $REAL/.autoresearch/noise.json"
attempt "hook" sh -c "mkdir -p $REAL/.git/hooks && \\
printf '#!/bin/sh\\ntouch $HOOK_RAN\\n' > $REAL/.git/hooks/post-commit"
# the agent's HOME is the user's, read-only but for the CLIs' own state: git configuration there would run code
# in the harness's git commands, were they to obey it (and a program planted on the user's PATH, were they to run
# it): refused at the source
attempt "home gitconfig" sh -c "mkdir -p $HOME/hooks && \\
printf '[core]\\n\\thooksPath = %s\\n\\tfsmonitor = touch %s\\n' \\
$HOME/hooks $FSMONITOR_RAN >> $HOME/.gitconfig && for h in post-commit post-checkout reference-transaction; do \\
printf '#!/bin/sh\\ntouch $HOOK_RAN\\n' > $HOME/hooks/\\$h && chmod +x $HOME/hooks/\\$h; done"
setsid sh -c "sleep $DELAY; : $MARK; printf 'late\\n' >> $REAL/results.tsv" >/dev/null 2>&1 </dev/null &
nohup sh -c "trap '' HUP TERM INT QUIT; sleep $DELAY; : $MARK; printf 'late\\n' >> $REAL/results.tsv" \\
>/dev/null 2>&1 </dev/null &
probe "background" started
exit 0
'''


def agent_script(tmp_path, body, **values):
    """An agent command's script under tmp_path (the agent sees the host read-only), with VAR=value lines."""
    import shlex

    script = tmp_path / f"agent-{uuid.uuid4().hex[:8]}.sh"
    header = "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items())
    script.write_text(body.replace("#!/bin/sh\n", "#!/bin/sh\n" + header, 1))
    return script


def loop(root, script, home, turns=1):
    home.mkdir(exist_ok=True)
    return cli(root, "--backend", "mlx", "loop", "--agent", f"sh {script}", "--max-experiments", turns, "--budget",
               BUDGET, "--gate", "greedy", env={"HOME": str(home)})


def agent_probes(root):
    return probes((root / ".autoresearch" / "agent.log").read_text())


@needs_bwrap
def test_an_agent_turn_changes_nothing_of_the_real_checkout(repo_dir, use_cache, baseline, tmp_path):
    mark = f"sandbox-agent-{uuid.uuid4().hex[:12]}"
    hook_ran, fsmonitor_ran = tmp_path / "hook-ran", tmp_path / "fsmonitor-ran"
    script = agent_script(tmp_path, AGENT_ATTACK, REAL=repo_dir.resolve(), CACHE=use_cache, HOOK_RAN=hook_ran,
                          FSMONITOR_RAN=fsmonitor_ran, DELAY=300, MARK=mark)
    try:
        proc = loop(repo_dir, script, tmp_path / "home")
        left = processes_with(mark)
        assert proc.returncode == 0 and "loop ended: 1 experiments" in proc.stdout, proc.stdout + proc.stderr
        found = agent_probes(repo_dir)
        assert found["background"] == "started" and found["home gitconfig"] == "refused", found
        assert found["see checkout"] == found["see cache"] == "refused", found
        assert not left, f"the agent's background processes outlived its turn: {left}"
        time.sleep(3)
        rows = read_ledger(repo_dir / "results.tsv")
        assert [r.status for r in rows][0] == "keep" and len(rows) == 2, rows
        assert rows[1].status in ("keep", "discard") and rows[1].description == "agent: MATRIX_LR 0.05", rows[1]
        assert rows[1].sandbox == "bwrap" and rows[1].val_bpb > 1.0
        ledger = (repo_dir / "results.tsv").read_text()
        assert "forged" not in ledger and "late" not in ledger
        assert not hook_ran.exists() and not fsmonitor_ran.exists(), "the agent's git configuration ran in the harness"
        allowed = ("results.tsv", "notes") + (("HEAD", "refs") if rows[1].status == "keep" else ())
        assert_unchanged(baseline[1], snapshot(repo_dir), allow=allowed)
        kept = "MATRIX_LR = 0.05" in (repo_dir / TRAIN).read_text()
        assert kept == (rows[1].status == "keep")
    finally:
        kill_all(processes_with(mark))


AGENT_SYMLINK = AGENT_PREAMBLE + '''
attempt "read validation rows" head -c 16 $CACHE/tokens/val_rows.npy
rm backends/mlx/train.py && ln -s $CACHE/tokens/val_rows.npy backends/mlx/train.py
attempt "hard link" ln -f $CACHE/tokens/val_rows.npy .autoresearch/rows
echo "the validation rows as train.py" > .autoresearch/description
exit 0
'''


@needs_bwrap
def test_an_agent_that_links_train_py_to_the_validation_rows_is_refused(repo_dir, use_cache, baseline, tmp_path):
    train_before = (repo_dir / TRAIN).read_bytes()
    script = agent_script(tmp_path, AGENT_SYMLINK, CACHE=use_cache)
    proc = loop(repo_dir, script, tmp_path / "home")
    assert proc.returncode == 0 and "loop ended: 0 experiments" in proc.stdout, proc.stdout + proc.stderr
    found = agent_probes(repo_dir)
    assert found["read validation rows"] == found["hard link"] == "refused", found
    assert "not a regular file" in (repo_dir / ".autoresearch" / "loop.log").read_text()
    train = repo_dir / TRAIN
    assert not train.is_symlink() and train.read_bytes() == train_before
    assert len(read_ledger(repo_dir / "results.tsv")) == 1
    assert_unchanged(baseline[1], snapshot(repo_dir))
    assert not git_out(repo_dir, "stash", "list").strip()


AGENT_ESCAPE = AGENT_PREAMBLE + '''
probe "CapEff" "$(grep CapEff /proc/self/status | cut -f2)"
attempt "unmount the cache's cover" umount $CACHE
if test -r $CACHE/tokens/val_rows.npy; then probe "validation rows" "$(wc -c < $CACHE/tokens/val_rows.npy) bytes"
else probe "validation rows" hidden; fi
attempt "unmount the checkout's cover" umount $REAL
attempt "remount / writable" mount -o remount,bind,rw /
attempt "write the real checkout" touch $REAL/.autoresearch/$ESCAPED
exit 0
'''


@needs_bwrap
def test_an_agent_cannot_unmount_what_hides_the_checkout_and_cache(repo_dir, use_cache, baseline, tmp_path):
    escaped = f"escaped-{uuid.uuid4().hex[:12]}"
    script = agent_script(tmp_path, AGENT_ESCAPE, CACHE=use_cache, REAL=repo_dir.resolve(), ESCAPED=escaped)
    try:
        proc = loop(repo_dir, script, tmp_path / "home")
        assert proc.returncode == 0 and "loop ended: 0 experiments" in proc.stdout, proc.stdout + proc.stderr
        found = agent_probes(repo_dir)
        assert not (repo_dir / ".autoresearch" / escaped).exists(), f"the agent wrote the real checkout: {found}"
        assert found["validation rows"] == "hidden", found
        assert [k for k, v in found.items() if v == "ok"] == [], found
        assert int(found["CapEff"], 16) == 0, found
        assert len(read_ledger(repo_dir / "results.tsv")) == 1
    finally:
        (repo_dir / ".autoresearch" / escaped).unlink(missing_ok=True)

# ---------------------------------------------------------------------------
# --sandbox require and off
# ---------------------------------------------------------------------------


def test_require_without_bubblewrap_refuses_in_one_line(repo_dir, tmp_path):
    before = snapshot(repo_dir)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    edit(repo_dir)
    proc = cli(repo_dir, "--backend", "mlx", "--sandbox", "require", "run", "-m", "lr", "--budget", BUDGET,
               env={"PATH": str(bare)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "apt-get install bubblewrap" in errors[0], proc.stderr
    assert len(read_ledger(repo_dir / "results.tsv")) == 1
    assert_unchanged(before, snapshot(repo_dir), allow=("status",))
    assert git_out(repo_dir, "status", "--porcelain").split() == ["M", TRAIN]  # the edit stays for the retry


@needs_bwrap
def test_sandbox_off_on_a_bubblewrap_branch_is_refused(repo_dir, baseline):
    edit(repo_dir)
    proc = cli(repo_dir, "--backend", "mlx", "--sandbox", "off", "run", "-m", "lr", "--budget", BUDGET)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "never compared" in errors[0], proc.stderr
    assert len(read_ledger(repo_dir / "results.tsv")) == 1
    assert_unchanged(baseline[1], snapshot(repo_dir), allow=("status",))


PLANT = '''
plant = Path("/tmp/mlx") / "planted-by-a-keep"  # the run's compile cache, writable: weights could go here
probe("planted before", str(plant.exists()))
plant.write_text("stands for this run's trained weights")
'''


@needs_bwrap
def test_what_a_kept_candidate_leaves_in_its_compile_cache_reaches_no_later_run(repo_dir, baseline, monkeypatch):
    from autoresearch import experiment
    from autoresearch.gate import Decision, Gate
    from autoresearch.settings import Run

    monkeypatch.setattr(experiment, "decide", lambda gate, c, b, s: Decision(True, False, "forced keep (test)"))
    run = Run.resolve(repo_dir, "mlx", BUDGET, gate=Gate("greedy"))
    at_start_of(repo_dir, "main", PLANT)
    edit(repo_dir, MATRIX_LR=0.05)
    first = experiment.run_experiment(run, "plant in the compile cache", say=lambda text: None)
    assert first.status == "keep" and probes(run_log(repo_dir))["planted before"] == "False", first.message
    edit(repo_dir, MATRIX_LR=0.06)  # the next experiment: a new program on top of the keep
    second = experiment.run_experiment(run, "look for it", say=lambda text: None)
    assert second.status == "keep", second.message
    assert probes(run_log(repo_dir))["planted before"] == "False", "a keep's compile cache carried a file on"
