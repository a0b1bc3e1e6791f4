"""auto's pick between the CPU paths (issue 24, items 3 and 4): `hardware` says what auto will do before it has
measured; the measurement takes turns between the paths, so a burst of load does not decide the pick; and it is
measured again on request, replacing the cached figures. Real train.py runs (conftest's TINY sizes), real load."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import prepare
from autoresearch import auto_pick, hardware
from conftest import cli, make_repo

pytestmark = [pytest.mark.skipif(
    not (hardware._has("torch") and hardware._has("mlx")) or hardware.cuda_device() or hardware.is_apple_silicon(),
    reason="auto measures only on a CPU with both MLX and PyTorch installed"),
    pytest.mark.serial]  # a race between the CPU paths, on every core

BUSY_PER_CORE = 3  # busy loops per core: the trainer gets about a quarter of each core while they run


def private_cache(cpu_cache, dest):
    """A copy of the prepared cache without calibrations: what a test measures is cached there only."""
    shutil.copytree(cpu_cache, dest, ignore=shutil.ignore_patterns("calibration", prepare.VIEW_NAME))
    return dest


def start_load():
    """Busy-looping processes pinned to each core this process may run on."""
    loop = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    return [subprocess.Popen([sys.executable, "-c", loop, str(core)])
            for core in sorted(os.sched_getaffinity(0)) for _ in range(BUSY_PER_CORE)]


def stop_load(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    procs.clear()


def cached_runs(cache):
    [path] = (cache / "calibration").glob("auto-*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, cpu_cache):
    """A project and its cache; `hardware` before any measurement, then the first training command (calibrate, one
    rung), which measures auto's paths with no load of ours."""
    base = tmp_path_factory.mktemp("auto")
    root, cache = make_repo(base / "project"), private_cache(cpu_cache, base / "cache")
    env = {"AUTORESEARCH_CACHE": str(cache)}
    before = cli(root, "hardware", env=env)
    trained = cli(root, "calibrate", "--budget", 30, "--time-limit", 0, env=env)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return root, cache, before, trained


def test_hardware_before_a_measurement_says_what_auto_will_do_and_the_first_training_command_does_it(quiet):
    root, cache, before, trained = quiet
    cpu = auto_pick.cpu_paths()
    assert cpu == ["mlx", "mps"]
    said = [line for line in before.stdout.splitlines() if line.startswith("auto: ")]
    assert said == [f"auto: not measured yet; the first training command measures mlx and mps interleaved "
                    f"({auto_pick.AUTO_REPEATS} runs each at DEPTH 2) and picks the faster median, or the default "
                    f"{auto_pick.default_cpu()} when the margin is within the spread "
                    "(autoresearch hardware --measure measures now)"], before.stdout
    # what it said: the training command measures the paths in turn and picks by that rule
    assert f"auto: measuring mlx and mps here, interleaved, {auto_pick.AUTO_REPEATS} runs each" in trained.stderr
    order = [line.split()[3] for line in trained.stderr.splitlines() if line.startswith("auto: run ")]
    assert order == cpu * auto_pick.AUTO_REPEATS, trained.stderr
    data = cached_runs(cache)
    choice = auto_pick.CpuChoice(tuple(map(tuple, data["runs"])), auto_pick.default_cpu(), data["measured_at"], 0)
    backend, reason = auto_pick.decide_cpu(choice.samples(), auto_pick.default_cpu())
    assert f"backend: {backend} ({reason})" in trained.stderr, trained.stderr
    assert trained.stdout.startswith(hardware.hardware_tag(backend))  # and it trained on that one


def test_measuring_again_under_a_burst_of_load_replaces_the_figures_and_keeps_the_pick(quiet):
    """`hardware --measure` measures again and replaces the cached figures, while a burst of load runs through its
    first round (one run of each path), as another job's would. Taking turns puts one loaded run in each path's
    three, and each median drops it; in a row (mlx mlx mlx mps mps mps), both loaded runs would have been mlx's and
    its median one of them."""
    root, cache, _, _ = quiet
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    first = cached_runs(cache)
    shown = cli(root, "hardware", env=env)
    assert "measuring" not in shown.stderr, shown.stderr  # a cached measurement is shown, not repeated
    figures = auto_pick.CpuChoice(tuple(map(tuple, first["runs"])), "", "", 0).figures()
    assert f"auto measured {first['measured_at']} in {first['seconds']:g}s, tokens/s per run in turn: {figures}" \
        in shown.stdout, shown.stdout
    quiet_choice = auto_pick.decide_cpu(
        auto_pick.CpuChoice(tuple(map(tuple, first["runs"])), "", "", 0).samples(), auto_pick.default_cpu())

    cpu, said = auto_pick.cpu_paths(), []
    load = start_load()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "autoresearch", "hardware", "--measure"], cwd=root, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for line in proc.stderr:  # the CLI says each run as it ends
            said.append(line)
            if line.startswith(f"auto: run {len(cpu)}/"):  # the first round is over
                stop_load(load)
        out = proc.stdout.read()
        assert proc.wait(timeout=600) == 0, out + "".join(said)
    finally:
        stop_load(load)
    print("".join(said), out, f"quiet: {quiet_choice}", sep="\n")
    assert f"auto: measuring mlx and mps here, interleaved, {auto_pick.AUTO_REPEATS} runs each" in "".join(said)
    second = cached_runs(cache)
    assert second["runs"] != first["runs"] and second["measured_at"] >= first["measured_at"]
    loaded = auto_pick.CpuChoice(tuple(map(tuple, second["runs"])), "", "", 0)
    assert [b for b, _ in loaded.runs] == cpu * auto_pick.AUTO_REPEATS
    samples = loaded.samples()
    assert all(len(samples[b]) == auto_pick.AUTO_REPEATS for b in cpu), loaded.figures()
    assert f"tokens/s per run in turn: {loaded.figures()}" in out, out
    assert f"tokens/s per run in turn: {loaded.figures()}" in cli(root, "hardware", env=env).stdout
    # not vacuous: the loaded round ran slower than the others, taken over both paths (one path's single runs
    # vary too much on a busy 2-core machine to hold each path to it)
    slowdown = sum(samples[b][0] / max(samples[b][1:]) for b in cpu) / len(cpu)
    assert slowdown < 1, f"the load did not slow the first round: {loaded.figures()}"
    # the pick is the one the rounds the burst missed give: what the machine measures without it (a measurement
    # taken at another time, the fixture's, would hold whatever else the machine was doing then)
    backend, reason = auto_pick.decide_cpu(samples, auto_pick.default_cpu())
    unloaded = auto_pick.decide_cpu({b: v[1:] for b, v in samples.items()}, auto_pick.default_cpu())
    assert backend == unloaded[0], f"rounds 2-3 alone: {unloaded[1]}; all three: {reason}; earlier: {quiet_choice[1]}"
