"""Calibration: the rule on controlled measurements, and a real ladder on this CPU."""

import json
import math
import subprocess
import sys

import git
import pytest

from autoresearch import calibrate as cal
from autoresearch.calibrate import Rung, choose
from autoresearch.experiment import setup
from autoresearch.hparams import read_constants
from autoresearch.ledger import read_ledger
from autoresearch.settings import Run
from conftest import TINY, make_checkout, PROFILE

GB = 24 * 1024


def rung(depth, dim, tokens_per_sec, peak_mb=500.0, device_batch=16):
    return Rung(depth, dim, tokens_per_sec, peak_mb, params_M=1.0, seconds=5.0, device_batch=device_batch)


def test_rule_picks_the_deepest_rung_that_reaches_its_ratio():
    # the tokens/s mlx measured on this 2-core CPU. Budget 300 s: depth 3 (d 192) predicts 1.14M tokens for
    # 1.33M parameters = 0.86 tokens/param, where R(C) = 20 (6 * 1.33M * 1.14M / 7.5e16) ** 0.45 = 0.35: it
    # passes; depth 4 (0.25 against 0.43) does not
    rungs = [rung(1, 64, 7866), rung(2, 128, 5956), rung(3, 192, 3801), rung(4, 256, 2599), rung(6, 384, 1240)]
    assert rungs[2].tokens_per_param(300) == pytest.approx(3801 * 300 / (12 * 192**2 * 3))
    compute = 6 * 12 * 192**2 * 3 * 3801 * 300
    assert rungs[2].required_ratio(300) == pytest.approx(20 * (compute / 7.5e16) ** 0.45)
    assert 0.34 < rungs[2].required_ratio(300) < 0.35 < 0.85 < rungs[2].tokens_per_param(300)
    assert rungs[3].tokens_per_param(300) < 0.25 < 0.42 < rungs[3].required_ratio(300)
    # steps: S(C) = 1000 (C / 7.5e16) ** 0.25 = 105; 1.14M / 105 = 10.9k tokens a step -> 2 ** 13
    assert rungs[2].target_steps(300) == pytest.approx(1000 * (compute / 7.5e16) ** 0.25)
    assert 104 < rungs[2].target_steps(300) < 105
    choice, reason = choose(rungs, budget=300, seq_len=256, device_batch=16, memory_limit_mb=GB)
    assert choice == {"DEPTH": 3, "TOTAL_BATCH_SIZE": 8192, "DEVICE_BATCH_SIZE": 16}
    assert "DEPTH 3" in reason and "R(C)" in reason and "S(C) = 105" in reason
    # 6,621 tokens/s (the PyTorch CPU path at depth 3): 2.0M tokens, S(C) = 121 steps, 16.4k a step -> 2 ** 14
    assert choose([rung(3, 192, 6621)], 300, 256, 16, GB)[0]["TOTAL_BATCH_SIZE"] == 16384
    # a tenth of the budget: depth 2 is the deepest that reaches R(C) (0.45 >= 0.09; depth 3: 0.086 < 0.12);
    # 179k tokens / S(C) = 49 steps = 3.7k -> 2 ** 12 = 16 rows of 256
    short = choose(rungs, budget=30, seq_len=256, device_batch=16, memory_limit_mb=GB)[0]
    assert short == {"DEPTH": 2, "TOTAL_BATCH_SIZE": 4096, "DEVICE_BATCH_SIZE": 16}
    # a hundredth: depth 2, 18k tokens / S(C) = 27 steps = 660 -> 2 ** 9 = 2 rows: the device batch comes down to 2
    tiny = choose(rungs, budget=3, seq_len=256, device_batch=16, memory_limit_mb=GB)[0]
    assert tiny == {"DEPTH": 2, "TOTAL_BATCH_SIZE": 512, "DEVICE_BATCH_SIZE": 2}


def test_rule_respects_memory_and_falls_back_to_the_shallowest():
    rungs = [rung(1, 64, 8500), rung(2, 128, 6700), rung(3, 192, 4100), rung(4, 256, 9000)]
    assert choose(rungs, 300, 256, 16, memory_limit_mb=GB)[0]["DEPTH"] == 4  # fast enough for the ratio
    rungs[3].peak_mb = 30_000
    assert choose(rungs, 300, 256, 16, memory_limit_mb=GB)[0]["DEPTH"] == 3  # but it does not fit
    slow = [rung(4, 256, 10), rung(6, 384, 5)]
    choice, reason = choose(slow, 300, 256, 16, GB)
    assert choice["DEPTH"] == 4 and reason.startswith("no rung reaches the rule")
    # the device batch is the one the pick was measured at (halved there until it fit), not the file's
    halved = [rung(1, 64, 8500, device_batch=4), rung(2, 128, 6700, device_batch=4)]
    assert choose(halved, 300, 256, 16, GB)[0]["DEVICE_BATCH_SIZE"] == 4


def test_reason_counts_passes_over_the_training_text():
    # depth 4 at 3,000 tokens/s sees 0.9M tokens in 300 s
    fits = choose([rung(4, 256, 3000)], 300, 256, 16, GB, train_tokens=1_000_000)[1]
    assert "0.9 passes over the 1.00M training tokens" in fits and "prepare more" not in fits
    repeats = choose([rung(4, 256, 3000)], 300, 256, 16, GB, train_tokens=200_000)[1]
    assert "4.5 passes over the 0.20M training tokens (over 4: repeated text overfits, prepare more)" in repeats


def test_large_budget_total_batch_and_device_batch_division():
    # an H100-like rung: 500M tokens in 300 s at depth 8, d 512: C = 7.5e16, S(C) = 1000 steps -> 2 ** 19
    fast = [rung(8, 512, 500e6 / 300, device_batch=128)]
    choice, _ = choose(fast, 300, 2048, 128, memory_limit_mb=80_000)
    assert choice == {"DEPTH": 8, "TOTAL_BATCH_SIZE": 2**19, "DEVICE_BATCH_SIZE": 128}
    assert math.isclose(fast[0].required_ratio(300), 20 * (6 * 12 * 512**2 * 8 * 500e6 / 7.5e16) ** 0.45)
    # 48 rows of 2048 do not divide 2 ** 19 / 2048 = 256 rows: the largest that does is 32
    odd = [rung(8, 512, 500e6 / 300, device_batch=48)]
    assert choose(odd, 300, 2048, 128, memory_limit_mb=80_000)[0]["DEVICE_BATCH_SIZE"] == 32


def test_out_of_memory_messages_are_recognised():
    assert cal.out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert cal.out_of_memory("RuntimeError: MPS backend out of memory (MPS allocated: 17.00 GB)")
    assert cal.out_of_memory("[metal::malloc] Unable to allocate 4294967296 bytes.")
    assert cal.out_of_memory("terminate called after throwing an instance of 'std::bad_alloc'")
    assert cal.out_of_memory(METAL_BUFFER)
    assert cal.out_of_memory(MPS_BUFFER)
    assert not cal.out_of_memory("ValueError: shapes (4,3) and (2,) not aligned")
    assert not cal.out_of_memory(None)


METAL_BUFFER = ("RuntimeError: [metal::malloc] Attempting to allocate 17179869184 bytes which is greater than the "
                "maximum allowed buffer size of 9663676416 bytes.")
MPS_BUFFER = "RuntimeError: Invalid buffer size: 16.00 GB"


def edit_main(root, backend, lines):
    """Put lines at the start of train.py's main(): a stand-in for what only a GPU would do."""
    path = root / "backends" / backend / "train.py"
    body = "".join(f"    {line}\n" for line in lines)
    path.write_text(path.read_text().replace("def main():\n", "def main():\n" + body, 1))


@pytest.mark.parametrize("message", [METAL_BUFFER, MPS_BUFFER])
def test_real_ladder_halves_the_batch_on_a_buffer_over_the_device_maximum(tmp_path, use_cache, message):
    # Metal and MPS refuse a single buffer past their maximum length: here, any device batch over 1
    root = make_checkout(tmp_path / "project", backends=("mlx",), **dict(TINY, DEVICE_BATCH_SIZE=2, TOTAL_BATCH_SIZE=512))
    edit_main(root, "mlx", ["if DEVICE_BATCH_SIZE > 1:", f"    raise RuntimeError({message.split(': ', 1)[1]!r})"])
    lines = []
    result, _ = cal.calibrate("mlx", root=root, budget=30, force=True, on_line=lines.append, time_limit=0)
    assert "calibrate: depth 1 does not fit at device batch 2; trying 1" in lines
    assert [(r.depth, r.device_batch) for r in result.rungs] == [(1, 1)]


def test_real_ladder_limits_training_steps_not_startup(tmp_path, use_cache):
    # as on CUDA, where compiling takes tens of seconds: a startup longer than the ladder's whole limit
    root = make_checkout(tmp_path / "project", backends=("mlx",), **dict(TINY, DEVICE_BATCH_SIZE=2, TOTAL_BATCH_SIZE=512))
    first, _ = cal.calibrate("mlx", root=root, budget=30, force=True, time_limit=0)
    steps = first.rungs[0].training_seconds(256)
    assert first.rungs[0].steps == 1 + cal.CALIBRATE_STEPS and 0 < steps < first.rungs[0].seconds
    limit = 5 * steps  # room for depth 1 and 2 at depth 1's rate even on a busy machine, then a few more
    edit_main(root, "mlx", [f"time.sleep({limit + 1:.2f})"])
    lines = []
    result, _ = cal.calibrate("mlx", root=root, budget=30, force=True, on_line=lines.append, time_limit=limit)
    assert [r.depth for r in result.rungs][:2] == [1, 2], lines
    assert result.rungs[0].seconds > limit  # the old rule (wall time) would have stopped after depth 1
    assert sum(r.training_seconds(256) for r in result.rungs[:-1]) <= limit


def test_real_ladder_halves_the_device_batch_that_does_not_fit(tmp_path, use_cache, monkeypatch):
    # a device with 1 MB of memory: depth 1 is measured at the file's 2 rows, over the limit, then at 1
    root = make_checkout(tmp_path / "project", backends=("mlx",), **dict(TINY, DEVICE_BATCH_SIZE=2, TOTAL_BATCH_SIZE=512))
    monkeypatch.setattr(cal, "device_memory_mb", lambda backend: 1.0 / cal.MEMORY_FRACTION)
    lines = []
    result, _ = cal.calibrate("mlx", root=root, budget=30, force=True, on_line=lines.append, time_limit=20)
    assert "calibrate: depth 1 does not fit at device batch 2; trying 1" in lines
    assert [(r.depth, r.device_batch) for r in result.rungs] == [(1, 1)]  # still over: deeper rungs only grow
    assert result.choice["DEVICE_BATCH_SIZE"] == 1 and result.reason.startswith("no rung reaches the rule")


def test_real_ladder_does_not_start_a_rung_that_would_overrun_the_limit(tmp_path, use_cache):
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    first, _ = cal.calibrate("mlx", root=root, budget=30, force=True, time_limit=0)  # depth 1 only
    assert [r.depth for r in first.rungs] == [1]
    # a limit of one rung's training steps: depth 1 is measured whatever the limit, depth 2 (its steps at least as
    # long) would take the ladder to about twice it, so it is not started, even if this run's steps are 40% faster
    limit = 1.2 * first.rungs[0].training_seconds(256)
    lines = []
    result, _ = cal.calibrate("mlx", root=root, budget=30, force=True, on_line=lines.append, time_limit=limit)
    assert [r.depth for r in result.rungs] == [1]
    assert f"calibrate: depth 2 would end past the {limit:g}s limit; stopping" in lines


def test_real_ladder_is_cached_and_written_by_setup(tmp_path, use_cache):
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    repo = git.Repo.init(root, initial_branch="main")
    repo.git.add(A=True)
    repo.index.commit("project")
    lines = []
    result, cached = cal.calibrate("mlx", root=root, budget=30, force=True, on_line=lines.append, time_limit=20)
    assert not cached and result.rungs and result.rungs[0].depth == 1
    assert all(r.tokens_per_sec > 0 and r.peak_mb > 0 for r in result.rungs)
    assert any(line.startswith("calibrate: depth  1") for line in lines)
    assert result.choice["DEPTH"] in [r.depth for r in result.rungs]
    assert result.choice["TOTAL_BATCH_SIZE"] % (result.choice["DEVICE_BATCH_SIZE"] * 256) == 0
    stored = json.loads(cal.cache_path("mlx", PROFILE, 30.0).read_text())
    assert stored["choice"] == result.choice
    again, cached = cal.calibrate("mlx", root=root, budget=30)
    assert cached and again.choice == result.choice  # the same machine gives the same answer
    # nothing in the checkout was edited by measuring
    assert not repo.is_dirty(untracked_files=True)
    # setup commits the calibrated sizes as the run branch's first commit, and every row records them
    out = setup(Run.resolve(root, "mlx", 2), "c", noise_runs=1, calibrate=False)
    assert out.row.config == "-"
    repo.git.checkout("main")
    # the 30 s measurements stand in for the 2 s budget, so this setup trains briefly without measuring again;
    # the rule is applied to them for 2 s, so the decision is the cached measurements' for that budget
    cal.cache_path("mlx", PROFILE, 2.0).write_text(cal.cache_path("mlx", PROFILE, 30.0).read_text())
    expected, cached = cal.calibrate("mlx", root=root, budget=2)
    assert cached and [r.tokens_per_sec for r in expected.rungs] == [r.tokens_per_sec for r in result.rungs]
    assert expected.choice == cal.choose(result.rungs, 2, 256, TINY["DEVICE_BATCH_SIZE"], 1e9)[0]
    out = setup(Run.resolve(root, "mlx", 2), "d", noise_runs=1, calibrate=True)
    assert out.row.config == expected.config()
    head = repo.head.commit
    assert head.message.startswith("calibrate mlx-") and expected.config() in head.message
    constants = read_constants((root / "backends/mlx/train.py").read_text())
    assert {k: constants[k] for k in cal.KEYS} == expected.choice
    assert read_ledger(root / "results.tsv")[-1].config == expected.config()


@pytest.mark.parametrize("backend", ["mps", "cuda"])
def test_torch_backends_calibrate_through_the_cli_on_this_cpu(tmp_path, use_cache, backend):
    torch = pytest.importorskip("torch")
    root = make_checkout(tmp_path / "project", backends=(backend,), **TINY)
    done = subprocess.run([sys.executable, "-m", "autoresearch", "--backend", backend, "calibrate", "--budget", "30",
                           "--time-limit", "5", "--force"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    if backend == "cuda" and not torch.cuda.is_available():
        assert "no NVIDIA GPU, so cuda/train.py runs on the CPU" in done.stderr
    assert "calibrate: depth  1" in done.stderr  # progress on stderr, the decision on stdout
    stored = json.loads(cal.cache_path(backend, PROFILE, 30.0).read_text())
    choice = stored["choice"]
    assert f"DEPTH={choice['DEPTH']},TOTAL_BATCH_SIZE={choice['TOTAL_BATCH_SIZE']}" in done.stdout
    assert choice["DEPTH"] in [r["depth"] for r in stored["rungs"]]
    assert choice["TOTAL_BATCH_SIZE"] % (choice["DEVICE_BATCH_SIZE"] * 256) == 0


# Upstream autoresearch's published H100 run: DEPTH 8 (d 512), 499.6M tokens in 300 s, MFU 39.8 %, 2**19 tokens a step
UPSTREAM_TOKENS_PER_SEC = 499.6e6 / 300


def test_rule_fed_upstreams_h100_run_lands_on_upstreams_recipe():
    depth8 = rung(8, 512, UPSTREAM_TOKENS_PER_SEC, peak_mb=40_000, device_batch=128)
    assert depth8.tokens_per_param(300) == pytest.approx(19.85, abs=0.01)  # 1 % under R(C):
    assert depth8.required_ratio(300) == pytest.approx(20.05, abs=0.01)
    # a shallower rung that passes easily, a deeper one that fails by far (estimates: tokens/s by FLOPs per token)
    rungs = [rung(6, 384, 2.6 * UPSTREAM_TOKENS_PER_SEC / 1.7, 20_000, 128), depth8,
             rung(10, 640, UPSTREAM_TOKENS_PER_SEC / 1.6, 60_000, 128)]
    choice, reason = choose(rungs, 300, 2048, 128, memory_limit_mb=0.8 * 81_559)
    assert choice == {"DEPTH": 8, "TOTAL_BATCH_SIZE": 2**19, "DEVICE_BATCH_SIZE": 128}
    assert "19.85 tokens/parameter" in reason and "0.95 x 20.05 = 19.05" in reason
    # inside measurement noise (a 3-step rung's tokens/s off by up to 4 %) the pick does not flip
    for wobble in (0.96, 0.98, 1.02, 1.04):
        noisy = [rung(r.depth, r.model_dim, r.tokens_per_sec * wobble, r.peak_mb, 128) for r in rungs]
        assert choose(noisy, 300, 2048, 128, 0.8 * 81_559)[0] == choice, wobble


def test_gpu_ladder_starts_at_depth_4_where_bf16_runs(monkeypatch):
    import autoresearch.hardware as hw

    for capability, first in (((9, 0), 4), ((8, 0), 4), ((7, 5), 1), (None, 1)):
        monkeypatch.setattr(hw, "cuda_capability", lambda c=capability: c)
        assert cal.first_depth("cuda") == first
    assert cal.first_depth("mlx") == 1


def test_apple_memory_limit_is_metals_working_set(monkeypatch):
    import autoresearch.hardware as hw

    # a 36 GB M3 Pro: MLX's device_info says 28.6 GB (recorded), not 0.8 x 36 GB
    assert hw.apple_working_set_mb("mlx", output="28991029248\n") == 28991029248 / 2**20
    assert hw.apple_working_set_mb("mps", output="Traceback ...\nModuleNotFoundError\n") is None
    monkeypatch.setattr(hw, "apple_working_set_mb", lambda backend: 27648.0)
    assert cal.memory_limit_mb("mlx") == 27648.0
    monkeypatch.setattr(hw, "apple_working_set_mb", lambda backend: None)
    assert cal.memory_limit_mb("mlx") == cal.MEMORY_FRACTION * cal.device_memory_mb("mlx")


def test_out_of_memory_found_anywhere_in_the_tail_and_for_mps_and_cublas():
    mps = ("/AppleInternal/Library/BuildRoots/.../MPSNDArray.mm:850: failed assertion `[MPSNDArrayDescriptor "
           "sliceDimension:withSubrange:] error: the range subRange.start + subRange.length does not fit in "
           "dimension[1] (total bytes of NDArray > 2**32)'")
    cublas = "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    for message in (mps, cublas):
        assert cal.out_of_memory(message)
        assert cal.out_of_memory("\n".join([message] + [f"  warning line {i}" for i in range(10)]))
