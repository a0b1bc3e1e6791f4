"""Run one backend's train.py in a subprocess: the right environment, a hard timeout, the summary parsed."""

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import repo_root, train_file
from .hardware import blas_library
from .summary import parse_summary

MIN_GRACE_SECONDS = 120  # startup, compilation and evaluation on top of the training budget
TAIL_LINES = 60


@dataclass
class RunResult:
    returncode: int
    summary: dict | None
    log: str
    elapsed: float
    timed_out: bool

    @property
    def ok(self):
        return self.returncode == 0 and self.summary is not None and self.summary["val_bpb"] == self.summary["val_bpb"]

    def tail(self, n=TAIL_LINES):
        return "\n".join(self.log.splitlines()[-n:])


def train_env(backend, budget=None, seed=None, base=None):
    """Environment for train.py: budget and seed overrides, and an optimized BLAS for MLX on Linux."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if budget is not None:
        env["AUTORESEARCH_BUDGET"] = str(budget)
    if seed is not None:
        env["AUTORESEARCH_SEED"] = str(seed)
    notes = []
    blas = blas_library() if backend == "mlx" else None
    if blas:
        env["LD_PRELOAD"] = ":".join(p for p in (blas, env.get("LD_PRELOAD")) if p)
        notes.append(f"blas: preloading {blas} for MLX (AUTORESEARCH_BLAS=none to disable)")
    return env, notes


def run_training(backend, budget=None, seed=None, timeout=None, root=None, on_line=None, env=None):
    """Run backends/<backend>/train.py to completion or timeout. on_line(str) sees each output line."""
    root = Path(root or repo_root())
    env, notes = train_env(backend, budget, seed, base=env)
    for note in notes:
        if on_line:
            on_line(note)
    if timeout is None:
        from prepare import time_budget  # the harness reads the budget the same way train.py does

        seconds = float(budget) if budget is not None else time_budget()
        timeout = seconds + max(seconds, MIN_GRACE_SECONDS)  # 10 minutes for the 5-minute budget
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(train_file(backend, root))], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = list(notes)

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if on_line:
                on_line(lines[-1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: compile workers and data threads too
        proc.wait()
        lines.append(f"TIMEOUT: killed after {timeout:.0f}s")
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    reader.join(timeout=5)
    log = "\n".join(lines)
    return RunResult(proc.returncode, None if timed_out else parse_summary(log), log, time.time() - start, timed_out)
