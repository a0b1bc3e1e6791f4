"""Compile caches across sandboxed runs: a branch's own, and a new branch's start from its program's baseline."""

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
