"""Compile caches across sandboxed runs: MLX's CPU kernels (compiled C++ under /tmp/mlx), inductor's and triton's.

A sandboxed trainer's /tmp is empty at every start, so without this every run would compile every kernel again
(MLX on a CPU: 40-70 s for step 0 instead of 1 s). A cache a run can write is also a way to plant code in a later
run, so each run gets a copy of its run branch's cache, and only a kept baseline's copy becomes the branch's:
what a later run loads was compiled by the project's own train.py, never left by an agent's candidate, kept or
not (a candidate's new shapes compile again in each run, within the clock's cold-start allowance).
A new branch has no cache yet: its baseline starts from the cache a kept baseline of the very same train.py left
(program_key), which only a run of that program wrote, so it loads nothing another program could have planted."""

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import prepare

INSIDE_MLX = "/tmp/mlx"  # where MLX keeps its CPU kernels (the temporary directory's mlx/)
INSIDE_TORCH = "/tmp/compile-cache"
# Beside a cache's kernels, out of every trainer's reach (only mlx/ and torch/ are bound): the startup of the baseline
# that compiled them from nothing. A later baseline that starts from them is credited it, so its clock still allows
# an honest candidate a cold compile of new shapes.
COLD_FILE = "cold-startup"
TORCH_ENV = {"TORCHINDUCTOR_CACHE_DIR": f"{INSIDE_TORCH}/inductor", "TRITON_CACHE_DIR": f"{INSIDE_TORCH}/triton"}


def _home(key):
    return prepare.cache_dir() / "compile" / hashlib.sha256(key.encode()).hexdigest()[:16]


def program_key(source):
    """The key of one program's own cache: a baseline of exactly this train.py, on whatever run branch."""
    return "program " + hashlib.sha256(source.encode()).hexdigest()


def checkout(key, fallback=None):
    """A fresh, private copy of the cache of key (a run branch's name) for one run, or of fallback's where key
    has none yet; remove it with discard()."""
    home = _home(key)
    if fallback and not home.exists():
        home = _home(fallback)
    return _copy(home)


def copy_of(run_dir):
    """A fresh, private copy of one run's folder: a baseline's later seeds start from its first seed's kernels (the
    same program compiled them), so only the first compiles cold, and its startup stays the baseline's."""
    return _copy(Path(run_dir))


def run_folder(kind):
    """A new folder for one run in the cache's runs/ (kind: checkpoint, compile or evaluator), named for this host and process.
    First, this host's folders whose process is gone (a harness killed before it could remove them) are removed."""
    runs = prepare.cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"\W", "_", socket.gethostname())
    for old in runs.iterdir():
        owner = RUN_FOLDER.match(old.name)
        if owner and owner["host"] == host and not _alive(int(owner["pid"])):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{host}.{os.getpid()}.", dir=runs))


RUN_FOLDER = re.compile(r"^(?:checkpoint|compile|evaluator)-(?P<host>\w+)\.(?P<pid>\d+)\.\w+$")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's: alive; a number no pid can be: not ours to judge
        return True
    return True


def _copy(home):
    run_dir = run_folder("compile")
    for sub in ("mlx", "torch"):
        if (home / sub).is_dir():
            shutil.copytree(home / sub, run_dir / sub, symlinks=True)
        else:
            (run_dir / sub).mkdir()
    if (home / COLD_FILE).is_file():
        shutil.copy2(home / COLD_FILE, run_dir / COLD_FILE)
    return run_dir


def cold_startup(run_dir):
    """The cold startup recorded with the cache a run checked out (seconds), or 0.0."""
    try:
        return max(0.0, float((Path(run_dir) / COLD_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return 0.0


def promote(key, run_dir, cold=None):
    """A kept run's cache becomes key's: copied whole (the run's folder is discarded after), then swapped in.
    cold: a baseline's startup, recorded with it (COLD_FILE)."""
    if cold:
        (Path(run_dir) / COLD_FILE).write_text(f"{cold:.2f}\n")
    home = _home(key)
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = home.with_name(f"{home.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(run_dir, staging, symlinks=True)
    old = home.with_name(f"{home.name}.old-{os.getpid()}")
    if home.exists():
        os.replace(home, old)
    os.replace(staging, home)
    shutil.rmtree(old, ignore_errors=True)


def discard(run_dir):
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def binds(run_dir):
    """(folder here, path inside) pairs a trainer gets writable."""
    return ((str(Path(run_dir) / "mlx"), INSIDE_MLX), (str(Path(run_dir) / "torch"), INSIDE_TORCH))
