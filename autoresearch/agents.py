"""Agents that edit train.py between experiments: any command line (an LLM CLI), or the built-in random search."""

import math
import os
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import prepare

from . import record, sandbox, train_file
from .hparams import read_constants, set_constants
from .ledger import MAX_DESCRIPTION_CHARS, one_line
from .presets import HOME_STATE
from .runner import become_subreaper, children, end_orphans
from .turns import MAX_READ_BYTES, read_usage

DESCRIPTION_FILE = "description"  # in .autoresearch/: the agent's one-line summary of its change
NOTES_FILE = "notes.md"  # in .autoresearch/: what the agent keeps for its next turns, carried into each prompt
MAX_NOTES_BYTES = 1 << 16  # the notes file taken back at most; the prompt carries less (loop.NOTES_CHARS)
MAX_TRAIN_BYTES = 1 << 20  # a train.py is tens of kilobytes; more is data smuggled in as code
MAX_DESCRIPTION_BYTES = 1 << 16  # the description file read at most; MAX_DESCRIPTION_CHARS of it kept
SESSION_BUSES = ("/run/user", "/run/dbus")  # (/var/run is a link to /run)
MAX_AGENT_FILE_BYTES = 1 << 28  # any one file the agent writes, its output log included: past it, the turn ends
# The agent's command starts behind this: no file it writes (its output's log among them) grows past the cap, a
# write past it ends the process (SIGXFSZ) or fails, instead of filling the disk. An exec, not preexec_fn: the
# swarm's workers run turns from threads, where preexec_fn may deadlock.
FILE_LIMIT = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); " \
             "os.execvp(sys.argv[2], sys.argv[2:])"

# name: (kind, low, high) — sane ranges around upstream's recipe; "log" values move multiplicatively
SEARCH_SPACE = {
    "MATRIX_LR": ("log", 0.005, 0.2),
    "EMBEDDING_LR": ("log", 0.05, 2.0),
    "UNEMBEDDING_LR": ("log", 0.0005, 0.05),
    "SCALAR_LR": ("log", 0.05, 2.0),
    "WEIGHT_DECAY": ("lin", 0.0, 0.5),
    "WARMUP_RATIO": ("lin", 0.0, 0.2),
    "WARMDOWN_RATIO": ("lin", 0.1, 0.9),
    "DEPTH": ("int", 1, 16),
    "ASPECT_RATIO": ("choice", 32, 48, 64, 96, 128),
    "WINDOW_PATTERN": ("choice", "L", "SL", "SSL", "SSSL"),
    "TOTAL_BATCH_SIZE": ("pow2", 2**10, 2**20),
}


class AgentFailed(Exception):
    """The agent did not produce an edit (timeout, non-zero exit); the loop logs it and goes on. output: what it
    printed, for its turn's record."""

    def __init__(self, message, output="", exit=None):
        super().__init__(message)
        self.output = output
        self.exit = exit


@dataclass(frozen=True)
class Reply:
    """What an agent's turn gave back besides its edit of train.py."""
    description: str | None  # its one line, None where it wrote none
    output: str = ""  # what it printed (stdout and stderr)
    exit: int | None = None  # its exit status; None for the built-in agent


def _perturb(name, value, rng):
    kind, *args = SEARCH_SPACE[name]
    if kind == "log":
        low, high = args
        return float(f"{min(high, max(low, value * math.exp(rng.uniform(-0.7, 0.7)))):.4g}")
    if kind == "lin":
        low, high = args
        return round(min(high, max(low, value + rng.uniform(-0.15, 0.15) * (high - low))), 3)
    if kind == "int":
        low, high = args
        return min(high, max(low, value + rng.choice((-2, -1, 1, 2))))
    if kind == "pow2":
        low, high = args
        return min(high, max(low, value * rng.choice((2, 1 / 2))))
    return rng.choice([c for c in args if c != value] or args)


def random_edit(path, rng, min_tokens_per_step=None, n_changes=None):
    """Perturb one or two hyperparameters of the file in place; return the description."""
    source = Path(path).read_text()
    constants = read_constants(source)
    names = sorted(n for n in SEARCH_SPACE if n in constants)
    for _ in range(100):
        picked = rng.sample(names, n_changes or rng.choice((1, 1, 2)))
        updates = {n: _perturb(n, constants[n], rng) for n in picked}
        updates = {n: (int(v) if isinstance(constants[n], int) else v) for n, v in updates.items()}
        updates = {n: v for n, v in updates.items() if v != constants[n]}
        if not updates:
            continue
        total = updates.get("TOTAL_BATCH_SIZE", constants.get("TOTAL_BATCH_SIZE"))
        if min_tokens_per_step and total is not None and total % min_tokens_per_step:
            continue  # the batch must stay a whole number of device batches
        Path(path).write_text(set_constants(source, updates))
        return ", ".join(f"{n} {constants[n]} -> {v}" for n, v in updates.items())
    raise AgentFailed("random agent found no valid perturbation")


class RandomAgent:
    """No-LLM baseline: random search over the hyperparameter block, reproducible from its seed."""

    name = "random"

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def edit(self, root, backend, prompt, timeout):
        source = read_constants(train_file(backend, root).read_text())
        step_tokens = source.get("DEVICE_BATCH_SIZE", 1) * prepare.load_profile().seq_len
        return Reply(random_edit(train_file(backend, root), self.rng, min_tokens_per_step=step_tokens))


class CommandAgent:
    """Any agent CLI, started fresh per experiment, in a scratch clone of the checkout: the harness takes back only
    backends/<backend>/train.py and the description. In the sandbox it keeps its network and sees HOME read-only
    but for its CLI's own state (credentials, sessions), and never sees the real checkout, the cache or the
    harness's state. The prompt goes on stdin, or replaces
    {prompt}. Its notes file goes in with the clone and comes back, whatever became of its edit."""

    def __init__(self, command, name=None):
        self.command = command
        self.name = name or command

    def edit(self, root, backend, prompt, timeout):
        args = shlex.split(self.command)
        stdin = prompt
        if any("{prompt}" in a for a in args):
            args, stdin = [a.replace("{prompt}", prompt) for a in args], None
        log = Path(root) / ".autoresearch" / "agent.log"
        with scratch_clone(root) as work:
            box = sandbox.active()
            limited = [sys.executable, "-I", "-S", "-c", FILE_LIMIT, str(MAX_AGENT_FILE_BYTES), *args]
            argv, inside = box.wrap(limited, work, agent_policy(root, work))
            env = dict(os.environ, PWD=str(work), **inside)
            reaping = not box.confined and become_subreaper()  # unconfined, what it leaves running is ended
            before = children() if reaping else set()
            with open(log, "w") as out:
                try:
                    proc = subprocess.run(argv, cwd=work, env=env, input=stdin, stdout=out, stderr=subprocess.STDOUT,
                                          text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise AgentFailed(f"agent timed out after {timeout:.0f}s", _tail(log)) from None
                except (OSError, ValueError) as e:  # ValueError: a NUL in an argument
                    raise AgentFailed(f"agent could not start: {one_line(str(e), 200)}") from None
                finally:
                    if reaping:
                        end_orphans(before)
            output = _tail(log)
            take_back_notes(work, root)
            said = read_usage(output).error
            if proc.returncode != 0 or said:
                why = f", reporting an error: {said}" if said else f": {_last_line(output)}"
                if proc.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) \
                        or log.stat().st_size >= MAX_AGENT_FILE_BYTES:  # killed, or its write refused (EFBIG)
                    why = f": it wrote a file or output over {MAX_AGENT_FILE_BYTES >> 20} MiB"
                raise AgentFailed(f"agent exited with {proc.returncode}{why} (output in .autoresearch/agent.log)",
                                  output, proc.returncode)
            try:
                take_back(work, root, backend)
                return Reply(read_description(work), output, proc.returncode)
            except AgentFailed as e:
                raise AgentFailed(str(e), output, proc.returncode) from None


def _tail(path):
    """The end of the agent's log as text: where a CLI's closing JSON result and its error are."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - MAX_READ_BYTES))
        return f.read().decode("utf-8", "replace")


def _last_line(output):
    """The agent's last line of output, one printable line (an auth failure says it there), or a note of none."""
    lines = [line for line in output.splitlines() if line.strip()]
    return one_line(lines[-1], 200) if lines else "no output"


def agent_policy(root, work):
    """The agent's turn: its scratch clone writable, the network, the user's HOME read-only but for the CLIs' own
    state (presets.HOME_STATE); the real checkout, the cache and the harness's state out of sight."""
    tmp = Path(work).parent / "tmp"
    tmp.mkdir(exist_ok=True)
    # and the user's session bus and the system's (/run/user/<uid>/bus, /run/dbus): through them `systemd-run
    # --user` or a desktop's services would start a process outside the sandbox
    hidden = (str(Path(root).resolve()), str(prepare.cache_dir()), str(record.state_home()), *SESSION_BUSES)
    return sandbox.Policy(write=(str(Path(work).parent),), hide=hidden, network=True, private_home=False,
                          home_write=HOME_STATE, whole_system=True, env={"TMPDIR": str(tmp)})


@contextmanager
def scratch_clone(root):
    """A clone of the checkout's HEAD (its own objects, no hard links into the real .git) with a copy of the
    ledger, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="autoresearch-agent-"))
    work = parent / Path(root).resolve().name
    try:
        subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "clone", "--quiet", "--no-hardlinks", str(root),
                        str(work)], check=True, capture_output=True)
        (work / ".autoresearch").mkdir()
        for name in ("results.tsv", f".autoresearch/{NOTES_FILE}"):
            if regular_file(Path(root) / name):  # never through a link an unconfined train.py made
                shutil.copyfile(Path(root) / name, work / name)
        yield work
    except subprocess.CalledProcessError as e:
        raise AgentFailed(f"could not make the agent's scratch clone: {e.stderr.decode(errors='replace').strip()}")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def regular_file(path):
    """Whether path is a regular file itself, not a link to one (nor a fifo, a device)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _regular_bytes(work, name, limit):
    """The bytes of the file name in the agent's copy work: a regular file of at most limit bytes, reached through
    no link (the file's folders included: a link there would fetch a file from anywhere the harness can read), or
    None where there is none."""
    path = Path(work) / name
    if not Path(os.path.realpath(path.parent)).is_relative_to(Path(work).resolve()):
        raise AgentFailed(f"{name} in the agent's copy lies behind a link out of it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        raise AgentFailed(f"{name} in the agent's copy is not a regular file of at most {limit:,} bytes") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise AgentFailed(f"{name} in the agent's copy is not a regular file of at most {limit:,} bytes")
        return f.read(limit + 1)[:limit]


def take_back(work, root, backend):
    """The agent's train.py into the real checkout: a regular file's bytes, nothing else of what it did."""
    edited = _regular_bytes(work, f"backends/{backend}/train.py", MAX_TRAIN_BYTES)
    if edited is None:
        raise AgentFailed(f"the agent deleted backends/{backend}/train.py")
    target = train_file(backend, Path(root))
    if edited != target.read_bytes():
        target.write_bytes(edited)


def take_back_notes(work, root):
    """The agent's notes file into the real checkout's state folder (git ignores it: no reset or stash touches
    it), replaced whole; none written leaves the last one."""
    try:
        data = _regular_bytes(work, f".autoresearch/{NOTES_FILE}", MAX_NOTES_BYTES)
    except AgentFailed:
        return  # a link or a huge file: not notes, and no reason to fail an edit
    if data is None:
        return
    target = Path(root) / ".autoresearch" / NOTES_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def read_description(work):
    """The agent's one-line description, as text whatever its bytes (not UTF-8, NULs, escape sequences, many
    lines): one printable line of at most MAX_DESCRIPTION_CHARS, or None."""
    data = _regular_bytes(work, f".autoresearch/{DESCRIPTION_FILE}", MAX_DESCRIPTION_BYTES)
    text = one_line(data.decode("utf-8", "replace"), MAX_DESCRIPTION_CHARS) if data else ""
    return text or None  # None: the loop describes the change from the hyperparameters
