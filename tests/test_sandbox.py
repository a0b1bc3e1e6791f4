"""The OS sandbox under attack: each thing an untrusted train.py (trainer and evaluator child) or agent command could
try against the referee, run end to end through `autoresearch run` / `loop` on a real run branch set up under
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
import numpy as np
import pytest

import prepare
from autoresearch import sandbox
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
    """code (dedented) as the first statements of train.py's function (main: the trainer; build_model: the
    evaluator child), with probe() defined."""
    body = textwrap.indent(textwrap.dedent(PROBE_HELPER) + textwrap.dedent(code), "    ")
    signature = {"main": "def main():\n", "build_model": "def build_model(config, weights):\n"}[function]
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
        "refs": git_out(root, "for-each-ref", "--format=%(refname) %(objectname)"),
        "notes": git_out(root, "notes", "--ref", "autoresearch", "list"),
        "results.tsv": (Path(root) / "results.tsv").read_bytes(),
        "noise.json": (state / "noise.json").read_bytes() if (state / "noise.json").exists() else None,
        "pid files": sorted(p.name for p in state.glob("*.pid")),
        "config": (gitdir / "config").read_bytes(),
        "hooks": tree_digest(gitdir / "hooks"),
        "info": tree_digest(gitdir / "info"),
        "flags": [line for line in git_out(root, "ls-files", "-v").splitlines() if not line.startswith("H ")],
        "status": git_out(root, "status", "--porcelain", "--untracked-files=all", "--ignored"),
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
    assert row.step_seconds > 0 and row.harness_seconds > 0 and row.description == message
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
