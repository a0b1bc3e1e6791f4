"""Shared fixtures: real text from ../shared/data, a prepared CPU-profile cache, throwaway checkouts."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import git

import pytest

import prepare
from autoresearch.hparams import set_constants

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MIXED_EN = SHARED_DATA / "mixed-en"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

# The shared cache's eval profile: the cpu profile's sizes with 64 validation rows, so that scoring does not take
# most of each few-second experiment (prepare.PROFILES says so too).
PROFILE = "smoke"

# Small enough that a CPU step takes well under a second, large enough to learn something.
TINY = {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": 8, "TOTAL_BATCH_SIZE": 2048}


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: needs the machine's every core (Ray's workers, auto's race between the "
                                       "CPU paths): run alone, after the parallel part (README's test command)")
    # Under pytest-xdist each worker is a machine of its own share of the cores, pinned, and every process a test
    # starts inherits it: one worker's training never slows another's, whose clock and pace would notice.
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= count:
            os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count::count])


def pytest_sessionstart(session):
    if not MIXED_EN.is_dir() or not SHAKESPEARE.is_file():
        raise pytest.UsageError(f"test data missing: expected ../shared/data (looked in {SHARED_DATA})")
    # the harness's record of each test checkout, in a folder of this session's, not the user's ~/.local/state
    os.environ.setdefault("AUTORESEARCH_STATE", tempfile.mkdtemp(prefix="autoresearch-state-"))


@pytest.fixture(scope="session")
def cpu_cache(tmp_path_factory):
    """A cache prepared from ../shared/data/mixed-en with PROFILE (shared, read-only)."""
    path = tmp_path_factory.mktemp("cache-cpu")
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_CACHE", str(path))
    prepare.prepare(profile=PROFILE, sources=[MIXED_EN])
    mp.undo()
    return path


@pytest.fixture
def use_cache(cpu_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    return cpu_cache


def make_checkout(dest, backends=("cuda", "mps", "mlx"), **constants):
    """A copy of the harness files (prepare.py, backends/) with hyperparameters set, as an agent would."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "prepare.py", dest / "prepare.py")
    for name in backends:
        src = ROOT / "backends" / name / "train.py"
        (dest / "backends" / name).mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        if constants:
            text = set_constants(text, constants)
        (dest / "backends" / name / "train.py").write_text(text)
    return dest


def make_repo(dest, backends=("mps", "mlx")):
    """A fresh project checkout (tiny hyperparameters, program.md) committed on main, as a real git repo."""
    root = make_checkout(dest, backends=backends, **TINY)
    shutil.copy(ROOT / "program.md", root / "program.md")
    repo = git.Repo.init(root, initial_branch="main")
    repo.git.add(A=True)
    repo.index.commit("project")
    return root


@pytest.fixture
def run_repo(tmp_path, use_cache):
    return make_repo(tmp_path / "project")


def commit_edit(root, message, old, new):
    """Change the mlx train.py on the checked-out branch and commit it, as the project's own code."""
    train = root / "backends/mlx/train.py"
    text = train.read_text()
    assert text.count(old) == 1
    train.write_text(text.replace(old, new))
    repo = git.Repo(root)
    repo.index.add(["backends/mlx/train.py"])
    repo.index.commit(message)


@pytest.fixture
def quick_repo(run_repo):
    """The project with the trainer's step compile off (MLX builds C++ kernels for it on a CPU, a minute and more on
    a fresh run branch): about as fast on a CPU, and a run takes seconds from its start."""
    commit_edit(run_repo, "no compile", "use_compile = True", "use_compile = False")
    return run_repo


def cli(root, *args, env=None, timeout=600):
    """The real command line, in a fresh process, in checkout root."""
    return subprocess.run([sys.executable, "-m", "autoresearch", *map(str, args)], cwd=root, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=timeout)


BUDGET = 3  # seconds of training in end-to-end tests


def set_up_template(tmp_path_factory, cpu_cache, sandbox="auto"):
    """A checkout with its mlx run branch set up (baseline at BUDGET s, one seed) under the sandbox mode."""
    root = make_repo(tmp_path_factory.mktemp("template") / "project", backends=("mlx",))
    proc = cli(root, "--backend", "mlx", "--sandbox", sandbox, "setup", "--tag", "f", "--budget", BUDGET,
               "--noise-runs", 1, "--no-calibrate", env={"AUTORESEARCH_CACHE": str(cpu_cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture(scope="session")
def branch_template(tmp_path_factory, cpu_cache):
    """The run branch every end-to-end test copies (repo_dir), under the sandbox this machine has."""
    return set_up_template(tmp_path_factory, cpu_cache)


@pytest.fixture(scope="session")
def unsandboxed_template(tmp_path_factory, cpu_cache):
    """The same, set up with --sandbox off: what the in-process checks catch where no sandbox exists."""
    return set_up_template(tmp_path_factory, cpu_cache, "off")


def copy_checkout(template, tmp_path):
    """A test's own copy of a session's checkout, its run branch, ledger and state included."""
    dest = tmp_path / "project"
    shutil.copytree(template, dest, symlinks=True)
    return dest


@pytest.fixture
def repo_dir(branch_template, tmp_path, use_cache):
    return copy_checkout(branch_template, tmp_path)


def edit(root, **constants):
    """Change hyperparameters of the mlx train.py as an agent would (MATRIX_LR by default)."""
    train = root / "backends/mlx/train.py"
    train.write_text(set_constants(train.read_text(), constants or {"MATRIX_LR": 0.05}))


def one_commit_repo(root):
    """A git repository with a user configured and one commit (a train.py), for ledger and notes tests."""
    root.mkdir(parents=True)
    repo = git.Repo.init(root, initial_branch="main")
    with repo.config_writer() as c:
        c.set_value("user", "name", "t").set_value("user", "email", "t@localhost")
    (root / "train.py").write_text("x = 0\n")
    repo.index.add(["train.py"])
    repo.index.commit("project")
    return repo
