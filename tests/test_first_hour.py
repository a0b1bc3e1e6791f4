"""The first hour on a machine: auto picks the faster CPU path by measuring it, the BLAS is part of a CPU result's
identity, and progress can be seen while a command trains."""

import io
import json
import platform
import shutil

import pytest
from rich.console import Console

import prepare
from autoresearch import calibrate as cal
from autoresearch import hardware
from autoresearch.ledger import read_ledger
from autoresearch.progress import LiveProgress
from conftest import BUDGET, TINY, cli, make_checkout, make_repo, PROFILE

linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="the harness preloads a BLAS on Linux only")


@pytest.fixture
def own_cache(cpu_cache, tmp_path, monkeypatch):
    """A private copy of the prepared cache: what these tests measure is cached in it."""
    path = tmp_path / "cache"
    shutil.copytree(cpu_cache, path, ignore=shutil.ignore_patterns("calibration", prepare.VIEW_NAME))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(path))
    return path


@linux_only
def test_the_blas_is_part_of_the_mlx_cpu_tag_and_calibration_key(monkeypatch):
    optimized = hardware.blas_library()
    if not optimized:
        pytest.skip("no optimized BLAS here (neither the mkl wheel nor OpenBLAS)")
    tag, torch_tag, key = hardware.hardware_tag("mlx"), hardware.hardware_tag("mps"), cal.cache_path("mlx", PROFILE, 30.0)
    assert tag.endswith("-" + hardware.blas_name(optimized)) and hardware.blas_name(optimized) in ("mkl", "openblas")
    monkeypatch.setenv("AUTORESEARCH_BLAS", "none")
    assert hardware.hardware_tag("mlx") == tag.rsplit("-", 1)[0] + "-refblas"
    assert cal.cache_path("mlx", PROFILE, 30.0) != key and "-refblas-" in cal.cache_path("mlx", PROFILE, 30.0).name
    assert hardware.hardware_tag("mps") == torch_tag  # torch brings its own BLAS, whatever is preloaded for MLX


@linux_only
def test_a_calibration_measured_under_one_blas_is_not_reused_under_another(tmp_path, own_cache, monkeypatch):
    if not hardware.blas_library():
        pytest.skip("no optimized BLAS here (neither the mkl wheel nor OpenBLAS)")
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    fast, cached = cal.calibrate("mlx", root=root, budget=30, time_limit=0)
    assert not cached
    assert cal.calibrate("mlx", root=root, budget=30, time_limit=0)[1]  # the same BLAS: cached
    monkeypatch.setenv("AUTORESEARCH_BLAS", "none")
    slow, cached = cal.calibrate("mlx", root=root, budget=30, time_limit=0)
    assert not cached and slow.hardware.endswith("-refblas") and slow.hardware != fast.hardware
    stored = {json.loads(p.read_text())["hardware"] for p in (own_cache / "calibration").glob("mlx-*.json")}
    assert stored == {fast.hardware, slow.hardware}


def test_rows_and_runs_carry_the_blas_the_trainer_preloaded(repo_dir):
    row = read_ledger(repo_dir / "results.tsv")[0]
    assert row.hardware == hardware.hardware_tag("mlx")
    log = (repo_dir / ".autoresearch/run.log").read_text()
    blas = hardware.blas_library()
    if platform.system() == "Linux":
        assert row.hardware.endswith("-" + hardware.blas_name(blas))
        assert (f"blas: preloading {blas} for MLX" in log) == bool(blas)


def test_auto_on_a_run_branch_is_the_branch_backend(repo_dir):
    done = cli(repo_dir, "run", "-m", "nothing changed", "--budget", BUDGET)
    assert done.returncode == 2 and "backend: mlx (the run branch's)" in done.stderr, done.stderr


def test_live_progress_in_a_terminal_shows_seed_step_loss_and_eta(repo_dir):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    lines = (repo_dir / ".autoresearch/run.log").read_text().splitlines()  # a real run's output, as it came
    frames = []
    with LiveProgress(console, BUDGET, "baseline", runs=3) as live:
        for text in lines:
            live.line(text)
            frames.append(live.status())
        eta = live.eta(live.run_started + 1)
    assert any(f.startswith("baseline | seed 1/3 | step ") and "% of 3s) | loss " in f and " tok/s" in f for f in frames)
    assert frames[-1].endswith("evaluating") or "step" in frames[-1]
    assert 2 * BUDGET < eta < 3 * (BUDGET + 60)  # two more seeds to go
    rendered = out.getvalue()
    assert "seed 1/3" in rendered and "eta" in rendered and "\x1b[" in rendered  # drawn live, with escapes
