"""Compile caches across sandboxed runs: a branch's own, and a new branch's start from its program's baseline."""

import os
import subprocess
import sys
from pathlib import Path

from autoresearch import kernels, sandbox


def files(run_dir):
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


def test_a_new_branch_starts_from_the_cache_of_its_own_programs_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    first = kernels.checkout("branch a", kernels.program_key("P"))
    assert files(first) == []  # nothing compiled anywhere yet
    (first / "mlx" / "kernel.so").write_text("built by P's baseline")
    kernels.promote("branch a", first)
    kernels.promote(kernels.program_key("P"), first)
    # another branch's baseline of the same program starts warm; of another program, cold
    same, other = kernels.checkout("branch b", kernels.program_key("P")), kernels.checkout("c", kernels.program_key("Q"))
    assert files(same) == ["mlx/kernel.so"] and files(other) == []
    # once a branch has a cache of its own, only that is read
    (same / "mlx" / "kernel.so").write_text("branch b's keep")
    kernels.promote("branch b", same)
    again = kernels.checkout("branch b", kernels.program_key("P"))
    assert (again / "mlx" / "kernel.so").read_text() == "branch b's keep"
    for run in (first, same, other, again):
        kernels.discard(run)
    assert not list((tmp_path / "runs").iterdir())


def test_a_sandboxed_baseline_leaves_its_programs_cache(branch_template, cpu_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    source = (branch_template / "backends/mlx/train.py").read_text()
    home = kernels._home(kernels.program_key(source))
    if sandbox.active().confined:
        assert files(home / "mlx"), "the baseline's compiled kernels were not kept for its program"
    assert not kernels._home(kernels.program_key(source + "\n# edited\n")).exists()


def test_a_warm_baseline_is_credited_the_cold_start_of_the_kernels_it_used(tmp_path, monkeypatch):
    """The clock gives candidates twice the baseline's startup: a baseline that started from its program's kernels
    keeps the cold start of the baseline that compiled them, so a candidate compiling new shapes is not late."""
    from autoresearch.experiment import Measurement, Timing, credited

    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    first = kernels.checkout("branch a", kernels.program_key("P"))
    assert kernels.cold_startup(first) == 0.0
    (first / "mlx" / "kernel.so").write_text("built by P's baseline")
    kernels.promote(kernels.program_key("P"), first, cold=31.5)
    assert not (first / "mlx" / kernels.COLD_FILE).exists()  # beside the kernels: no trainer's bind reaches it
    warm = kernels.checkout("branch b", kernels.program_key("P"))
    assert kernels.cold_startup(warm) == 31.5
    seeds = [Measurement("ok", 3.2, {}, Timing(3.0, startup, 0.4, "bwrap"), "", warm) for startup in (0.8, 40.0)]
    assert [m.timing.startup for m in credited(seeds)] == [31.5, 40.0]
    (warm / kernels.COLD_FILE).write_text("not a number")  # the harness's own file, damaged: no credit, no crash
    assert kernels.cold_startup(warm) == 0.0 and credited(seeds[:1])[0].timing.startup == 0.8
    for run in (first, warm):
        kernels.discard(run)


def test_a_baselines_later_seeds_start_from_its_first_seeds_kernels(run_repo, use_cache):
    """One cold compile per baseline: its first seed's (the clock's measure of a cold start), not one per seed."""
    import pytest

    from conftest import BUDGET, cli, commit_edit

    if not sandbox.resolve("auto").confined:
        pytest.skip("no sandbox here: runs share one unconfined cache")
    line = "use_compile = True  # the whole step"
    count = ("import os as _os\n"
             "if __name__ == '__main__':  # the trainer, not the evaluator's import\n"
             "    print('kernels at start:', sum(len(f) for _, _, f in _os.walk('/tmp/mlx')), flush=True)\n" + line)
    commit_edit(run_repo, "count the kernels a run starts with", line, count)  # a new program
    proc = cli(run_repo, "--backend", "mlx", "setup", "--tag", "k", "--budget", BUDGET, "--noise-runs", 3,
               "--no-calibrate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (run_repo / ".autoresearch" / "run.log").read_text()
    counts = [int(line.split(":")[1]) for line in log.splitlines() if line.startswith("kernels at start:")]
    assert len(counts) == 3 and counts[0] == 0 and counts[1] > 0 and counts[2] >= counts[1], counts



# A harness's run folders, left as a SIGKILL leaves them (no finally removes them): their paths, one a line
LEAVES = """
import os, sys
sys.path.insert(0, sys.argv[2])
os.environ["AUTORESEARCH_CACHE"] = sys.argv[1]
from autoresearch import kernels
for kind in ("checkpoint", "compile"):
    folder = kernels.run_folder(kind)
    (folder / "model.safetensors").write_bytes(b"weights")
    print(folder, flush=True)
"""


def leaver(cache, then=""):
    return subprocess.Popen([sys.executable, "-c", LEAVES + then, str(cache), str(Path(kernels.__file__).parents[1])],
                            stdout=subprocess.PIPE, text=True)


def test_a_killed_harnesss_run_folders_go_with_the_next_run(tmp_path, monkeypatch):
    """The next run on this host removes the run folders whose process is gone, and no live process's."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    gone = leaver(tmp_path / "cache")
    left = [Path(line) for line in gone.stdout.read().split()]
    gone.wait()
    assert len(left) == 2 and all(p.is_dir() for p in left), left
    live = leaver(tmp_path / "cache", "\nimport time; time.sleep(60)")
    try:
        theirs = [Path(live.stdout.readline().strip()) for _ in range(2)]
        assert not any(p.exists() for p in left), left  # the live one's first run_folder removed them
        mine = kernels.run_folder("checkpoint")
        assert mine.is_dir() and all(p.is_dir() for p in theirs), theirs
        assert f".{os.getpid()}." in mine.name and f".{live.pid}." in theirs[0].name
    finally:
        live.kill()
        live.wait()
    new = kernels.run_folder("compile")  # and once it has gone, its folders go too
    assert set((tmp_path / "cache" / "runs").iterdir()) == {mine, new}
