"""
Auto-calibration: pick the model size for the time budget on this machine, by measuring.

For a ladder of depths (width from the file's ASPECT_RATIO and HEAD_DIM), train.py runs a few
real training steps (AUTORESEARCH_CALIBRATE_STEPS: no evaluation) and reports tokens/s, peak
memory and parameters. From those, the rule below picks the configuration; the rule and its
constants live here and nowhere else.

The rule:
  1. predicted tokens = measured tokens/s x budget;
  2. DEPTH: the deepest rung whose predicted tokens per non-embedding parameter (12 d^2 per layer,
     Kaplan's convention: embeddings are lookups, and in small models they would swamp the count)
     reach the compute-dependent ratio R(C) = REF_TOKENS_PER_PARAM x (C / REF_COMPUTE)^RATIO_EXPONENT
     within RULE_TOLERANCE, C = 6 x parameters x tokens, and whose peak memory stays under the device's
     limit (memory_limit_mb); the shallowest rung if none does. The anchors: upstream's tuned H100 default (depth 8,
     25M non-embedding parameters, ~500M tokens in 5 minutes: C = 7.5e16, ~20 tokens/parameter,
     Chinchilla's ratio) and bench/calibration_study.md on a 2-core CPU (C ~ 1e13), where depth 3
     (~1 token/parameter) beat depth 4 (~0.3) on mlx and on PyTorch, and depth 6 (~0.04) lost by 0.1
     bpb on both. The exponent is inside the range that picks depth 3 from all three backends'
     measurements there (0.44-0.49). Small budgets favour bigger models than Chinchilla's ratio,
     large ones approach it;
  3. TOTAL_BATCH_SIZE: predicted tokens / S(C), to the nearest power of two, where the step count
     S(C) = REF_STEPS x (C / REF_COMPUTE)^STEPS_EXPONENT: small budgets want fewer, larger steps.
     Anchors: upstream's ~1000 steps of 2**19 tokens at C = 7.5e16, and theory: the critical batch
     grows about as the square root of the tokens trained (Zhang et al. 2024), compute-optimal tokens
     about as the square root of compute, so steps ~ C^0.25. bench/calibration_study.md agrees on a
     2-core CPU (S ~ 105-120 there): mlx at depth 4 tied at ~110 and ~220 steps and lost 0.07 bpb at
     ~60; PyTorch at depth 4 was 0.06 better at ~165 steps than at ~85. (The third study, on training
     data that repeated 4-6 times, had favoured fewer steps and C^0.3; with the loader keeping cropped
     remainders, the data no longer repeats.) At least one row;
  4. DEVICE_BATCH_SIZE: the one the pick was measured at, lowered to the largest that divides the total
     batch into whole rows. Measuring starts at the file's and halves it on out-of-memory or peak memory
     over the limit (the largest that fits), and for deeper rungs once a step takes over MAX_STEP_SECONDS:
     a device that busy gains no throughput from a bigger batch, and the ladder would overrun its time.
The reason printed with the pick also counts its passes over the prepared training tokens and says so
past MAX_PASSES: the rule assumes text that does not repeat, and a small local dataset can break that.
"""

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import prepare

from . import hardware, kernels, repo_root, sandbox, train_file
from .hardware import hardware_tag, memory_gb
from .hparams import read_constants, set_constants
from .runner import COMPILE_CACHE_ENV, run_training

REF_TOKENS_PER_PARAM = 20  # at REF_COMPUTE FLOPs: upstream's H100 default
REF_COMPUTE = 7.5e16
RATIO_EXPONENT = 0.45  # the fourth study (data that does not repeat): depth 3 beat 4 on mlx and mps
REF_STEPS = 1000  # optimizer steps at REF_COMPUTE: upstream's 2**19-token steps in 5 minutes on an H100
STEPS_EXPONENT = 0.25  # the fourth study: ~110-220 steps tie, ~60 lose at CPU scale (rule 3)
# A rung passes at tokens/parameter >= (1 - RULE_TOLERANCE) x R(C). Upstream's own H100 run (DEPTH 8, 499.6M tokens
# in 300 s) sits 1 % under R(C) (19.85 against 20.05), so without a tolerance an H100 would be sent to DEPTH 6, and
# a 2 % wobble of a 3-step measurement (moving tokens/parameter / R(C) by 2 % x (1 - RATIO_EXPONENT) = 1.1 %) would
# flip the pick between 6 and 8. 5 % covers that wobble four times over and the ~1.5 % a rung's one micro-step per
# optimizer step costs against upstream's two (the Muon and AdamW updates counted per micro-step, not per step).
RULE_TOLERANCE = 0.05
MEMORY_FRACTION = 0.8  # of a CUDA GPU's memory or of system RAM; Apple GPUs: Metal's recommended working set
DEPTH_LADDER = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24)
# On a GPU with bf16 the ladder starts at DEPTH 4: depths 1-3 (widths 64-192) are launch-bound there and never the
# answer (the rule fed upstream's H100 run scaled down by peak FLOP/s passes DEPTH 4 even at an A10G's 70 TF), and
# each rung is a fresh process compiling a new graph (tens of seconds).
GPU_FIRST_DEPTH = 4
CALIBRATE_STEPS = 3  # timed steps per rung, after the steps train.py excludes as warm-up
MAX_STEP_SECONDS = 2.0  # rule 4: e.g. cuda/train.py on a CPU, 128 rows of 256 tokens take ~4 s a step
TIME_LIMIT = 60.0  # seconds of training steps for the whole ladder (not startup, not compiling); a rung that would
# take it past the limit is not started
RUNG_TIMEOUT = 120.0  # seconds of wall time for one rung at least; deeper rungs get three times the last one's
MAX_PASSES = 4  # beyond ~4 epochs repeated text is worth far less than fresh (Muennighoff et al. 2023)
KEYS = ("DEPTH", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE")
PROBE_DEPTH = 2  # auto's comparison of CPU paths: the depth calibration picks on small CPUs, cheap to measure


@dataclass
class Rung:
    depth: int
    model_dim: int
    tokens_per_sec: float
    peak_mb: float
    params_M: float  # all parameters, as train.py reports them
    seconds: float  # wall time of the measurement, startup included
    device_batch: int = 0  # rows per forward/backward it was measured at (0: the file's, in older caches)
    steps: int = 0  # optimizer steps train.py ran, warm-up included (0 in older caches)
    attention: str = ""  # the attention path train.py reported (fa3, flex, sdpa; "" in older caches)

    def predicted_tokens(self, budget):
        return self.tokens_per_sec * budget

    def scaling_params(self):
        """Non-embedding parameters: attention 4 d^2 and MLP 8 d^2 per layer."""
        return 12 * self.model_dim**2 * self.depth

    def tokens_per_param(self, budget):
        return self.predicted_tokens(budget) / self.scaling_params()

    def compute(self, budget):
        """C = 6 x non-embedding parameters x predicted tokens, in FLOPs."""
        return 6 * self.scaling_params() * self.predicted_tokens(budget)

    def required_ratio(self, budget):
        """R(C): the tokens per parameter this rung's compute calls for (module docstring, rule 2)."""
        return REF_TOKENS_PER_PARAM * (self.compute(budget) / REF_COMPUTE) ** RATIO_EXPONENT

    def target_steps(self, budget):
        """S(C): the optimizer steps this rung's compute calls for (module docstring, rule 3)."""
        return REF_STEPS * (self.compute(budget) / REF_COMPUTE) ** STEPS_EXPONENT

    def training_seconds(self, seq_len, device_batch=None):
        """Its steps at the steady rate train.py timed (warm-up steps too, but not startup or compiling: on CUDA
        those take tens of seconds); at device_batch, a lower bound for a deeper rung's."""
        return self.steps * (device_batch or self.device_batch) * seq_len / self.tokens_per_sec


@dataclass
class Calibration:
    hardware: str
    eval_profile: str
    budget: float
    rungs: list
    choice: dict  # {DEPTH, TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE}
    reason: str
    measured_at: str
    seconds: float

    def config(self):
        return ",".join(f"{k}={self.choice[k]}" for k in KEYS)


def cache_path(backend, profile_name, budget):
    return prepare.cache_dir() / "calibration" / f"{hardware_tag(backend)}-{profile_name}-{budget:g}s.json"


def measure(backend, source, depth, device_batch, budget, scratch, timeout=RUNG_TIMEOUT):
    """One rung: a few real training steps of train.py at this depth and device batch, one forward/backward
    per optimizer step (throughput is per token; whole accumulated steps of a large total batch would only
    make the ladder slower), run from a scratch copy of train.py's source. Returns (rung, error tail)."""
    sizes = {"DEPTH": depth, "DEVICE_BATCH_SIZE": device_batch,
             "TOTAL_BATCH_SIZE": device_batch * prepare.load_profile().seq_len}
    train_file(backend, scratch).write_text(set_constants(source, sizes))
    env = dict(os.environ, AUTORESEARCH_CALIBRATE_STEPS=str(CALIBRATE_STEPS),
               AUTORESEARCH_CACHE=str(prepare.trainer_view()))
    key = f"calibration {hardware_tag(backend)}"
    compiled = kernels.checkout(key) if sandbox.active().confined else None
    if compiled:
        env[COMPILE_CACHE_ENV] = str(compiled)
    start = time.time()
    try:
        result = run_training(backend, budget=budget, root=scratch, env=env, timeout=timeout)
        s = result.summary
        # a rung needs its figures as numbers: a missing one (nan: summary.MISSING) fails it like no summary
        needed = ("tokens_per_sec", "num_steps", "peak_vram_mb", "num_params_M")
        if result.returncode != 0 or s is None or not all(math.isfinite(s.get(k, math.nan)) for k in needed) \
                or not s["tokens_per_sec"]:
            return None, result.tail()
        if compiled:
            kernels.promote(key, compiled)  # the next rung's shared kernels
    finally:
        kernels.discard(compiled)
    constants = read_constants(source)
    model_dim = math.ceil(depth * constants["ASPECT_RATIO"] / constants["HEAD_DIM"]) * constants["HEAD_DIM"]
    return Rung(depth, model_dim, float(s["tokens_per_sec"]), float(s["peak_vram_mb"]), float(s["num_params_M"]),
                time.time() - start, device_batch, int(s["num_steps"]), str(s.get("attention", ""))[:20]), None


# What allocators say when a batch does not fit: CUDA's caching allocator, cuBLAS's workspace, MPS, Metal, the host.
# Metal and MPS also refuse one buffer (or NDArray) over the device's maximum length, whatever memory is free.
OUT_OF_MEMORY = re.compile(r"out of memory|unable to allocate|insufficient memory|bad_alloc|CUBLAS_STATUS_ALLOC_FAILED"
                           r"|cudaErrorMemoryAllocation|greater than the maximum allowed buffer size"
                           r"|invalid buffer size|total bytes of NDArray > 2\*\*32", re.I)


def out_of_memory(error):
    """Whether a failed rung ran out of memory, so a smaller batch may fit: anywhere in the error's tail, since an
    allocator's message can sit above a long traceback or a shutdown's warnings."""
    return bool(error) and bool(OUT_OF_MEMORY.search(error))


def reaches_rule(rung, budget):
    """Rule 2's test of one rung: its predicted tokens/parameter reach R(C) within RULE_TOLERANCE."""
    return rung.tokens_per_param(budget) >= (1 - RULE_TOLERANCE) * rung.required_ratio(budget)


def first_depth(backend):
    """The ladder's first rung: GPU_FIRST_DEPTH on a CUDA GPU with bf16 (compute capability 8.0 or newer), else 1."""
    capability = hardware.cuda_capability() if backend == "cuda" else None
    return GPU_FIRST_DEPTH if capability and capability >= (8, 0) else DEPTH_LADDER[0]


def memory_limit_mb(backend):
    """Memory a rung may peak at: Metal's recommended working set on an Apple GPU (the budget Metal itself keeps
    to; above it, it pages), else MEMORY_FRACTION of the CUDA GPU's memory or of system memory."""
    working_set = hardware.apple_working_set_mb(backend)
    return working_set if working_set else MEMORY_FRACTION * device_memory_mb(backend)


def choose(rungs, budget, seq_len, device_batch, memory_limit_mb, train_tokens=None):
    """The rule in the module docstring, applied to measured rungs. Returns (choice, reason)."""
    fits = [r for r in rungs if r.peak_mb <= memory_limit_mb]
    good = [r for r in fits if reaches_rule(r, budget)]
    pick = max(good, key=lambda r: r.depth) if good else min(rungs, key=lambda r: r.depth)
    device_batch = pick.device_batch or device_batch
    tokens = pick.predicted_tokens(budget)
    steps = pick.target_steps(budget)
    total = 2 ** round(math.log2(max(tokens / steps, 1)))
    total = max(total, seq_len)
    rows = total // seq_len
    device_batch = max(d for d in range(1, min(device_batch, rows) + 1) if rows % d == 0)
    reason = (f"DEPTH {pick.depth}: {pick.scaling_params() / 1e6:.2f}M non-embedding parameters, "
              f"{pick.tokens_per_sec:,.0f} tokens/s -> {tokens / 1e6:.1f}M tokens in {budget:g}s = "
              f"{pick.tokens_per_param(budget):.2f} tokens/parameter "
              f"(rule: deepest with >= {1 - RULE_TOLERANCE:g} x R(C) = {1 - RULE_TOLERANCE:g} x "
              f"{pick.required_ratio(budget):.2f} = {(1 - RULE_TOLERANCE) * pick.required_ratio(budget):.2f}); "
              f"TOTAL_BATCH_SIZE {total} "
              f"(~{tokens / total:.0f} steps, S(C) = {steps:.0f})")
    if train_tokens:
        passes = tokens / train_tokens
        reason += f"; {passes:.1f} passes over the {train_tokens / 1e6:.2f}M training tokens"
        if passes > MAX_PASSES:
            reason += f" (over {MAX_PASSES}: repeated text overfits, prepare more)"
    if not good:
        reason = "no rung reaches the rule; the shallowest: " + reason
    return {"DEPTH": pick.depth, "TOTAL_BATCH_SIZE": total, "DEVICE_BATCH_SIZE": device_batch}, reason


def calibrate(backend, root=None, force=False, budget=None, on_line=None, time_limit=TIME_LIMIT):
    """The cached choice for this hardware, profile and budget, or measure the ladder and choose."""
    root = Path(root or repo_root())
    profile = prepare.load_profile()
    budget = float(budget) if budget is not None else prepare.time_budget(profile)
    path = cache_path(backend, profile.name, budget)
    source = train_file(backend, root).read_text()
    constants = read_constants(source)
    memory_limit = memory_limit_mb(backend)
    train_tokens = prepare.load_meta().get("train_tokens")
    if path.exists() and not force:
        data = json.loads(path.read_text())
        data["rungs"] = [Rung(**r) for r in data["rungs"]]
        # the measurements are what is cached; the rule is applied to them again, so a revised rule takes effect
        data["choice"], data["reason"] = choose(data["rungs"], budget, profile.seq_len, constants["DEVICE_BATCH_SIZE"],
                                                memory_limit, train_tokens)
        return Calibration(**data), True
    say = on_line or (lambda text: None)
    start, rungs = time.time(), []
    scratch = Path(tempfile.mkdtemp(prefix="autoresearch-calibrate-"))
    train_file(backend, scratch).parent.mkdir(parents=True)
    shutil.copy2(root / "prepare.py", scratch / "prepare.py")
    batch = constants["DEVICE_BATCH_SIZE"]
    trained, timeout = 0.0, max(RUNG_TIMEOUT, time_limit * 2)  # seconds of training steps so far; one rung's wall limit
    start_depth = first_depth(backend)
    for depth in (d for d in DEPTH_LADDER if d >= start_depth):
        if rungs and trained + rungs[-1].training_seconds(profile.seq_len, batch) > time_limit:
            # a deeper rung's steps take at least as long as the last one's: starting it would overrun the limit
            say(f"calibrate: depth {depth} would end past the {time_limit:g}s limit; stopping")
            break
        rung, error = measure(backend, source, depth, batch, budget, scratch, timeout)
        while batch > 1 and (out_of_memory(error) or (rung and rung.peak_mb > memory_limit)):
            batch //= 2  # the largest device batch that fits: deeper rungs start from it
            say(f"calibrate: depth {depth} does not fit at device batch {batch * 2}; trying {batch}")
            rung, error = measure(backend, source, depth, batch, budget, scratch, timeout)
        if rung is None:
            say(f"calibrate: depth {depth} failed ({error.splitlines()[-1] if error else 'no output'}); stopping")
            break
        rungs.append(rung)
        trained += rung.training_seconds(profile.seq_len)
        ratio, need = rung.tokens_per_param(budget), rung.required_ratio(budget)
        attention = f"  {rung.attention}" if rung.attention else ""
        say(f"calibrate: depth {depth:2d}  d {rung.model_dim:4d}  {rung.scaling_params() / 1e6:7.2f}M non-embedding "
            f"params  batch {rung.device_batch:3d}  {rung.tokens_per_sec:10,.0f} tokens/s  "
            f"{rung.peak_mb:8.0f} MB  {ratio:7.2f} tokens/param (R(C) {need:.2f})  "
            f"({rung.seconds:.0f}s, {rung.training_seconds(profile.seq_len):.1f}s of it training steps){attention}")
        timeout = max(timeout, 3 * rung.seconds)  # a deeper rung starts up and compiles for longer
        if not reaches_rule(rung, budget) or rung.peak_mb > memory_limit:
            break  # deeper rungs are only slower and larger
        while batch > 1 and batch * profile.seq_len / rung.tokens_per_sec > MAX_STEP_SECONDS:
            batch //= 2  # rule 4: deeper rungs measure at a batch whose steps stay short
    shutil.rmtree(scratch, ignore_errors=True)
    if not rungs:
        raise RuntimeError(f"calibration of {backend} failed: no rung could train")
    steps = sum(r.training_seconds(profile.seq_len) for r in rungs)
    say(f"calibrate: {len(rungs)} rungs from DEPTH {start_depth} in {time.time() - start:.0f}s: {steps:.1f}s of "
        f"training steps, the rest startup and compiling")
    choice, reason = choose(rungs, budget, profile.seq_len, constants["DEVICE_BATCH_SIZE"], memory_limit, train_tokens)
    result = Calibration(hardware_tag(backend), profile.name, budget, rungs, choice, reason,
                         time.strftime("%Y-%m-%dT%H:%M:%S%z"), round(time.time() - start, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(result)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return result, False


def device_memory_mb(backend):
    """Memory a model may use: the GPU's for cuda, else system memory (unified on Apple Silicon)."""
    if backend == "cuda":
        gpu = hardware.cuda_device()
        if gpu:
            return gpu[1]
    return memory_gb() * 1024
