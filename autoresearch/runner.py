"""Run a child process of the harness (train.py, the evaluator): its own process group, a hard timeout,
a pid file so a later harness can stop it, every line timestamped on arrival."""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import prepare

from . import hub, kernels, record, repo_root, sandbox, train_file
from .hardware import gpu_capability, preload_blas
from .summary import STEP_LINE, parse_summary
from .settings import default_timeout

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
TAIL_LINES = 60
# A child's output is the agent's to fill: the harness keeps a bounded part of it, in memory and in run.log. The
# first HEAD_BYTES hold every line of an honest run (a 5-minute GPU run prints a few thousand progress lines, well
# under 1 MiB); the last TAIL_BYTES hold the summary block and a crash's traceback, the output contract's end.
HEAD_BYTES, TAIL_BYTES = 6 << 20, 2 << 20
LINE_BYTES = 64 << 10  # one line at most: the rest of a longer one (a megabyte without a newline) is dropped
LINE_OVERHEAD = 100  # bytes of memory a kept line costs beyond its text (its str and tuple): a flood of empty lines
MAX_STEP_TIMES = 100_000  # progress lines whose arrival the clock keeps: the first times it, their gaps its step
COMPILE_CACHE_ENV = "AUTORESEARCH_COMPILE_CACHE"  # the run's copy of its compile cache (kernels.checkout)
UNNAMED_CACHE = "runs of no run branch"
STATE_DIR = ".autoresearch"  # untracked: run.log, last_crash.log, the lock, the pid files, the agent's description
PID_FILE = "trainer.pid"  # in .autoresearch/: "pid command" while train.py runs (evaluate.py keeps its own)


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: handled like Ctrl-C, then the harness exits 128 + signum."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def handle_signals():
    """SIGTERM and SIGHUP (kill, a closed terminal, preemption) raise Interrupted in the main thread."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


class HeadTail:
    """Lines within a fixed size: every line while the first `head` bytes last, then only the last `tail` bytes'
    worth, those between counted and dropped. A train.py printing in a loop costs the harness head + tail at
    most, and one line says where and how much was cut. A line of `size` bytes costs size + overhead (what keeping
    it in memory costs beyond its text). keep(item), if given, takes each head line as it comes (a file); else they
    stay in .head."""

    def __init__(self, head, tail, overhead=0, keep=None):
        self.limits = (head, tail)
        self.head_room, self.tail_room, self.overhead, self.keep = head, tail, overhead, keep
        self.head, self.tail, self.tail_size = [], deque(), 0
        self.full = False  # the head is spent: every later line goes to the tail
        self.cut_lines = self.cut_bytes = 0
        self.lock = threading.Lock()  # the reader thread adds lines, and the harness its own notes after a kill

    def add(self, item, size):
        cost = size + self.overhead
        with self.lock:
            if not self.full and cost <= self.head_room:
                self.head_room -= cost
                (self.keep or self.head.append)(item)
                return
            self.full = True
            self.tail.append((item, cost))
            self.tail_size += cost
            while self.tail_size > self.tail_room:
                _, dropped = self.tail.popleft()
                self.tail_size -= dropped
                self.cut_lines += 1
                self.cut_bytes += dropped - self.overhead

    def note(self):
        """The line that stands where lines were cut, or None where none were. Its first word has no colon after
        it, so a summary block it lands in does not read it as a field."""
        if not self.cut_lines:
            return None
        head, tail = (n / 2**20 for n in self.limits)
        return (f"[harness] {self.cut_lines:,} lines of output ({self.cut_bytes / 2**20:.1f} MiB) cut here; the "
                f"lines kept are its first {head:g} MiB and its last {tail:g} MiB at most")

    def kept_tail(self):
        return [item for item, _ in self.tail]


def output_lines(stream):
    """Each line a child prints, as text (bytes that are not UTF-8 replaced), at most LINE_BYTES of it: a longer
    line is cut there, marked, and the rest of it dropped unread into memory."""
    cutting = False
    while True:
        raw = stream.readline(LINE_BYTES)
        if not raw:
            return
        whole = raw.endswith(b"\n")
        if cutting:  # the rest of a line already cut
            cutting = not whole
            continue
        text = raw.decode("utf-8", "replace").rstrip("\n")
        if not whole and len(raw) == LINE_BYTES:
            cutting = True
            text += f" [harness] line cut at {LINE_BYTES >> 10} KiB"
        yield text


class CappedLog:
    """One run's part of a log file (run.log: a seed's training and evaluation), at most HEAD_BYTES + TAIL_BYTES and
    two notes: lines are written as they come until the head is spent, then the last TAIL_BYTES' worth is held
    and written when the run ends (close), after a note of what was cut between."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8", errors="replace")
        self.kept = HeadTail(HEAD_BYTES, TAIL_BYTES, keep=self._write)

    def _write(self, text):
        self.file.write(text + "\n")
        self.file.flush()  # a human or the dashboard reads the log while the run goes on

    def write(self, text):
        was_full = self.kept.full
        self.kept.add(text, len(text.encode("utf-8", "replace")) + 1)
        if self.kept.full and not was_full:
            self._write(f"[harness] this run's output passed {HEAD_BYTES >> 20} MiB: the rest is held back, and "
                        f"its last {TAIL_BYTES >> 20} MiB written here when the run ends")

    def close(self):
        note = self.kept.note()
        if note:
            self._write(note)
        for text in self.kept.kept_tail():
            self._write(text)
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ProcessResult:
    returncode: int
    log: str
    elapsed: float
    timed_out: bool
    lines: list = field(default_factory=list)  # (seconds since start, text) of the lines kept, as each arrived
    steps: list = field(default_factory=list)  # seconds since start at which each progress line arrived

    def tail(self, n=TAIL_LINES):
        return "\n".join(self.log.splitlines()[-n:])


def stop_leftover(state):
    """Kill the process groups a killed harness left running (trainer, evaluator: their *.pid files); returns
    their pids. A pid file kills only the process it names: the same pid, start time and command line."""
    stopped = []
    for path in sorted(Path(state).glob("*.pid")):
        text, copy = path.read_text(), record.pid_copy(state, path.name)
        trusted = copy.exists() and copy.read_text() == text  # a pid file the harness did not write kills nothing
        remove_pid_file(path)
        pid, started, command = (text.strip().split(" ", 2) + ["", ""])[:3]
        if not trusted or not pid.isdigit() or int(pid) == os.getpid() or not _runs(int(pid), started, command):
            continue
        try:
            os.killpg(int(pid), signal.SIGKILL)  # the child leads its own group (start_new_session)
        except (ProcessLookupError, PermissionError):
            continue
        stopped.append(int(pid))
    return stopped


def start_time(pid):
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or "-" where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


def write_pid_file(path, pid, argv):
    """"pid start-time command": enough for a later harness to know the process is still the one it started."""
    line = f"{pid} {start_time(pid)} {' '.join(map(str, argv))}\n"
    for target in (record.pid_copy(Path(path).parent, Path(path).name), Path(path)):
        tmp = Path(f"{target}.tmp")
        tmp.write_text(line)
        tmp.replace(target)


def remove_pid_file(path):
    Path(path).unlink(missing_ok=True)
    record.pid_copy(Path(path).parent, Path(path).name).unlink(missing_ok=True)


def _runs(pid, started, command):
    """Whether pid is still the recorded process (a reused pid belongs to someone else). Where /proc is missing
    (macOS), whether it runs at all."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.parent.exists() and Path("/proc/self").exists():
        try:
            now = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return False
        return now == command and start_time(pid) == started
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def become_subreaper():
    """Orphans of what this process starts come back to it (Linux's PR_SET_CHILD_SUBREAPER) instead of to init, so
    a double-forked daemon of a run without a sandbox can still be found and ended after it. Whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children():
    """The pids whose parent is this process, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def end_orphans(before):
    """Kill (and reap) the processes that became this process's children since `before` was taken: a run's
    daemons, come back to the subreaper. Returns how many."""
    ended = 0
    for _ in range(5):  # killing one can hand its own children to us
        orphans = children() - before
        if not orphans:
            break
        for pid in orphans:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
            ended += 1
    return ended


def run_process(argv, cwd, env, timeout, on_line=None, state=None, stdin_data=None):
    """Run argv to completion or timeout; the whole group is killed on timeout, on Ctrl-C and on Interrupted, and
    unsandboxed, every process it left behind that came back to this subreaper. stdin_data, if given, is written
    to the child's stdin (bytes) after it starts, then stdin is closed."""
    start = time.time()
    reaping = not sandbox.active().confined and become_subreaper()  # a sandbox's pid namespace does this itself
    before = children() if reaping else set()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                            start_new_session=True)
    pid_file = Path(state) / PID_FILE if state else None
    if pid_file:
        write_pid_file(pid_file, proc.pid, argv)
    output, steps = HeadTail(HEAD_BYTES, TAIL_BYTES, LINE_OVERHEAD), []

    def keep(text):
        t = time.time() - start
        output.add((t, text), len(text) + 1)
        if len(steps) < MAX_STEP_TIMES and STEP_LINE.match(text):
            steps.append(t)

    def pump():
        for text in output_lines(proc.stdout):
            keep(text)
            if on_line:
                on_line(text)

    def feed():
        try:
            proc.stdin.write(stdin_data)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child exited or closed its stdin: its exit code tells

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if stdin_data is not None:
        threading.Thread(target=feed, daemon=True).start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # timeout, Ctrl-C, Interrupted: no child outlives the harness
        _kill_group(proc)
        if reaping and end_orphans(before):
            keep("harness: ended processes the run left behind")
        if pid_file:
            remove_pid_file(pid_file)
    reader.join(timeout=5)
    if timed_out:
        keep(f"TIMEOUT: killed after {timeout:.0f}s")
    with output.lock:
        note = output.note()
        lines = output.head + ([(output.head[-1][0] if output.head else 0.0, note)] if note else []) + \
            output.kept_tail()
    return ProcessResult(proc.returncode, "\n".join(t for _, t in lines), time.time() - start, timed_out, lines,
                         list(steps))


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # compile workers and data threads too, even after the leader exited
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@dataclass
class RunResult:
    returncode: int
    summary: dict | None
    log: str
    elapsed: float
    timed_out: bool
    lines: list = field(default_factory=list)  # (seconds since start, text) of the lines kept (ProcessResult's)
    sandbox: str = "none"  # what confined the run: bwrap, sandbox-exec or none
    steps: list = field(default_factory=list)  # when each progress line arrived, the first MAX_STEP_TIMES

    @property
    def ok(self):
        return self.returncode == 0 and self.summary is not None

    def tail(self, n=TAIL_LINES):
        return "\n".join(self.log.splitlines()[-n:])

    def measured_training(self):
        """(seconds from the first progress line to the exit, startup seconds before it), or None without one:
        the harness's own clock, whatever train.py prints about its time."""
        if not self.steps:
            return None
        return self.elapsed - self.steps[0], self.steps[0]

    def step_interval(self):
        """Median seconds between progress lines after the first two (the first gap can hold a second compile);
        with only two lines, the one gap: a run of one long step overruns the budget by that step."""
        steps = self.steps
        gaps = sorted(b - a for a, b in zip(steps[1:], steps[2:])) or [b - a for a, b in zip(steps, steps[1:])]
        return gaps[len(gaps) // 2] if gaps else 0.0


def train_env(backend, budget=None, seed=None, base=None):
    """Environment for train.py: budget and seed overrides, and an optimized BLAS for MLX on Linux."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the checkout: the tree stays as the commit
    if budget is not None:
        env["AUTORESEARCH_BUDGET"] = str(budget)
    if seed is not None:
        env["AUTORESEARCH_SEED"] = str(seed)
    blas = preload_blas(env) if backend == "mlx" else None
    offline, hub_note = hub.child_env(gpu_capability(backend))
    env.update(offline)
    return env, [n for n in (blas, hub_note) if n]


def state_of(root):
    """The checkout's state folder, where the pid files of its trainer and evaluators go so that a harness started
    after a killed one can stop what it left; None for a folder the harness never set up (a scratch copy)."""
    path = Path(root) / STATE_DIR
    return path if path.is_dir() else None


def run_training(backend, budget=None, seed=None, timeout=None, root=None, on_line=None, env=None):
    """Run backends/<backend>/train.py to completion or timeout, in the sandbox (sandbox.active()): it sees the
    checkout read-only, the cache only as the trainer's view and may write only to env's AUTORESEARCH_CHECKPOINT.
    on_line(str) sees each output line."""
    root = Path(root or repo_root())
    env, notes = train_env(backend, budget, seed, base=env)
    env["AUTORESEARCH_CACHE"] = str(prepare.trainer_view())  # training only ever sees the view
    if env.get("AUTORESEARCH_CHECKPOINT"):
        Path(env["AUTORESEARCH_CHECKPOINT"]).mkdir(parents=True, exist_ok=True)  # to be bound, it must exist
    box = sandbox.active()
    # a caller that names no compile cache (a benchmark, a test) shares one, kept after every run that trains
    own = kernels.checkout(UNNAMED_CACHE) if box.confined and not env.get(COMPILE_CACHE_ENV) else None
    if own:
        env[COMPILE_CACHE_ENV] = str(own)
    if not box.confined and backend == "cuda":  # unconfined: one inductor and triton cache under the cache, for
        for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):  # every run
            env.setdefault(name, str(prepare.cache_dir() / "compile" / "unconfined" / sub))
    argv, inside = box.wrap([sys.executable, "-B", str(train_file(backend, root))], root, trainer_policy(root, env))
    env.update(inside)
    for note in notes:
        if on_line:
            on_line(note)
    if timeout is None:
        timeout = default_timeout(float(budget) if budget is not None else prepare.time_budget())
    try:
        result = run_process(argv, root, env, timeout, on_line, state_of(root))
        if own and result.returncode == 0:
            kernels.promote(UNNAMED_CACHE, own)
    finally:
        kernels.discard(own)
    lines = [(0.0, n) for n in notes] + result.lines
    log = "\n".join(t for _, t in lines)
    summary = None if result.timed_out else parse_summary(log)
    return RunResult(result.returncode, summary, log, result.elapsed, result.timed_out, lines, box.kind, result.steps)


def trainer_policy(root, env):
    """What a trainer may see: the checkout and its view of the cache, read-only; its checkpoint folder, writable;
    nothing of the real cache (where the view sits) or of anything else on the machine."""
    view, checkpoint = env.get("AUTORESEARCH_CACHE"), env.get("AUTORESEARCH_CHECKPOINT")
    compiled = env.get(COMPILE_CACHE_ENV)
    read = (*(p for p in (str(root), view) if p), *hub.readable(env))  # FA3 from the hub cache, on a GPU
    return sandbox.Policy(read=read, write=(checkpoint,) if checkpoint else (),
                          hide=(str(prepare.cache_dir()), str(record.state_home()), str(Path(root) / STATE_DIR),
                                *hub.hidden(env)),
                          network=False, binds=kernels.binds(compiled) if compiled else (),
                          env=kernels.TORCH_ENV if compiled else {})
