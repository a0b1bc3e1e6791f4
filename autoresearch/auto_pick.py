"""Which backend `--backend auto` takes: cuda with an NVIDIA GPU, mlx on Apple Silicon; on a CPU box with several
paths, the one a measured, interleaved race of their train.py picks (cached per hardware and profile)."""

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import prepare

from . import BACKENDS, hardware, repo_root, train_file
from .calibrate import PROBE_DEPTH, measure
from .hparams import read_constants


def pick_backend(requested="auto", measure=False, on_line=None):
    """(backend, reason). auto: cuda with an NVIDIA GPU, mlx on Apple Silicon; else, of the CPU paths installed,
    the one decide_cpu picks from their interleaved measurement (cpu_measurement: cached per hardware and profile;
    measure=True measures when none is cached), or the default until one was measured."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}: choose auto or one of {', '.join(BACKENDS)}")
        need = "mlx" if requested == "mlx" else "torch"
        if not hardware._has(need):
            raise ValueError(f"backend {requested} needs {need}; install with: pip install -e '.[{requested}]'")
        if requested == "cuda" and not hardware.cuda_device():
            return "cuda", "requested; no NVIDIA GPU, so cuda/train.py runs on the CPU (float32, no compile)"
        return requested, "requested"
    found = hardware.available_backends()
    if "cuda" in found:
        return "cuda", f"NVIDIA GPU found ({hardware.cuda_device()[0]})"
    if hardware.is_apple_silicon() and "mlx" in found:
        return "mlx", "Apple Silicon: MLX on Metal"
    cpu = cpu_paths(found)
    if len(cpu) > 1:
        measured = cpu_measurement(cpu, measure=measure, on_line=on_line)
        if measured and measured.backend:
            return measured.backend, measured.reason
    unmeasured = " (not measured yet)" if len(cpu) > 1 else ""
    default = default_cpu(found)
    if default == "mlx" and hardware.blas_library():
        return "mlx", f"no GPU; MLX on CPU with optimized BLAS ({hardware.blas_library()}){unmeasured}"
    if default == "mps":
        return "mps", f"no GPU; PyTorch's CPU build (mps backend falls back to CPU){unmeasured}"
    if default == "mlx":
        return "mlx", f"no GPU; MLX on CPU with its reference BLAS: slow ({hardware.BLAS_HINT})"
    raise ValueError("no backend installed: pip install -e '.[mlx]' or '.[mps]' or '.[cuda]'")


def cpu_paths(found=None):
    """The CPU paths auto chooses between where there is no GPU: those installed, in the order they are measured."""
    found = hardware.available_backends() if found is None else found
    return [b for b in ("mlx", "mps") if b in found]


def default_cpu(found=None):
    """auto's pick on a CPU without a measurement, and when a measurement cannot tell the paths apart: MLX with an
    optimized BLAS (bench/blas.md), else PyTorch's CPU build, else MLX on its reference BLAS; None with neither."""
    found = hardware.available_backends() if found is None else found
    if "mlx" in found and hardware.blas_library():
        return "mlx"
    if "mps" in found:
        return "mps"
    return "mlx" if "mlx" in found else None


# auto's measurement of the CPU paths. One run is a calibration rung at calibrate.PROBE_DEPTH (a few real training
# steps of train.py, seconds of them); the paths take turns, A B A B A B, so a burst of load (another job, a CI run)
# lands on one run of each path rather than on every run of one, and the median of each path's runs drops the run
# it hit. Three is the fewest runs whose median ignores one bad run.
AUTO_REPEATS = 3
AUTO_VERSION = 2  # the cache's format: version 1 held one figure per path, measured once and never again


@dataclass(frozen=True)
class CpuChoice:
    """A measurement of the CPU paths and the pick from it. runs: (backend, tokens/s) in the order they ran, 0.0 for
    a run that failed; the pick is decided again from them whenever read, so a revised rule takes effect."""
    runs: tuple
    default: str
    measured_at: str
    seconds: float
    backend: str = None
    reason: str = ""

    def samples(self):
        """backend -> its successful runs' tokens/s, in order."""
        out = {}
        for backend, rate in self.runs:
            out.setdefault(backend, [])
            if rate > 0:
                out[backend].append(rate)
        return out

    def figures(self):
        """The runs as one line: each path's tokens/s in run order."""
        return "; ".join(f"{b} " + ", ".join(f"{r:,.0f}" if r else "failed" for bb, r in self.runs if bb == b)
                         for b in dict.fromkeys(b for b, _ in self.runs))


def median_spread(rates):
    """(median, median absolute deviation) of one path's runs: the deviation, like the median, ignores one run in
    three that a burst of load slowed, where a range or a standard deviation would be made of it."""
    mid = statistics.median(rates)
    return mid, statistics.median(abs(r - mid) for r in rates)


def decide_cpu(samples, default):
    """(backend, reason) from each path's measured tokens/s: the faster median when it leads the next by more than the
    spread (the two paths' median absolute deviations added: how far each median may be off), else the default,
    saying so. A path with no successful run is out; none left: (None, reason)."""
    ok = {b: v for b, v in samples.items() if v}
    failed = [b for b in samples if b not in ok]
    out = f"; {' and '.join(failed)} failed every run" if failed else ""
    if not ok:
        return None, f"no GPU; every measured run failed ({', '.join(samples)})"
    stats = {b: median_spread(v) for b, v in ok.items()}
    ranked = sorted(ok, key=lambda b: -stats[b][0])
    if len(ranked) == 1:
        return ranked[0], f"no GPU; {ranked[0]} {stats[ranked[0]][0]:,.0f} tokens/s, the only path that ran{out}"
    fast, slow = ranked[:2]
    margin, spread = stats[fast][0] - stats[slow][0], stats[fast][1] + stats[slow][1]
    counts = sorted({len(v) for v in ok.values()})  # fewer where a run failed
    numbers = (f"no GPU; medians of {' or '.join(map(str, counts))} interleaved runs each at DEPTH "
               f"{PROBE_DEPTH}: {fast} {stats[fast][0]:,.0f} vs {slow} {stats[slow][0]:,.0f} tokens/s, margin "
               f"{margin:,.0f}")
    if margin > spread:
        return fast, f"{numbers} > spread {spread:,.0f}: the faster{out}"
    return default, f"{numbers} within spread {spread:,.0f}: too close to call, the default {default}{out}"


def cpu_cache_path(backends, profile_name):
    """Beside the calibrations, keyed by the paths' hardware tags (the BLAS included) and the eval profile."""
    tags = sorted(hardware.hardware_tag(b) for b in backends)
    return prepare.cache_dir() / "calibration" / f"auto-{profile_name}-{'-vs-'.join(tags)}.json"


def cpu_measurement(backends, root=None, measure=False, force=False, on_line=None):
    """The CpuChoice between backends (CPU paths) here: the cached one, else (measure=True) measured now and cached;
    force=True measures again and replaces the cached figures. None where nothing is prepared to measure with, or
    nothing (of this format) is cached and measure is False."""
    try:
        profile = prepare.load_profile()
    except prepare.PrepareError:
        return None
    path = cpu_cache_path(backends, profile.name)
    default = default_cpu({b: "cpu" for b in backends})
    cached = _read_cpu_cache(path, backends) if not force else None
    if cached is None:
        if not (measure or force):
            return None
        cached = _measure_cpu(backends, root, profile, path, on_line)
    choice = CpuChoice(cached["runs"], default, cached["measured_at"], cached["seconds"])
    backend, reason = decide_cpu(choice.samples(), default)
    return CpuChoice(choice.runs, default, choice.measured_at, choice.seconds, backend, reason)


def _read_cpu_cache(path, backends):
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    # the tags are the key: a version 1 file (one figure each, {tag: tokens/s}) is measured again, interleaved
    tags = {b: hardware.hardware_tag(b) for b in backends}
    if not isinstance(data, dict) or data.get("version") != AUTO_VERSION or data.get("tags") != tags:
        return None
    return dict(data, runs=tuple((b, float(r)) for b, r in data["runs"]))


def _measure_cpu(backends, root, profile, path, on_line):
    """AUTO_REPEATS runs of each path's train.py, interleaved; cached unless a run failed (a broken train.py is
    measured again next time)."""
    say = on_line or (lambda text: None)
    root = Path(root or repo_root())
    order = [b for _ in range(AUTO_REPEATS) for b in backends]
    say(f"auto: measuring {' and '.join(backends)} here, interleaved, {AUTO_REPEATS} runs each (DEPTH {PROBE_DEPTH}; "
        f"cached in {path.parent})")
    start, runs = time.time(), []
    for i, backend in enumerate(order, 1):
        source = train_file(backend, root).read_text()
        with tempfile.TemporaryDirectory(prefix="autoresearch-auto-") as scratch:
            scratch = Path(scratch)
            train_file(backend, scratch).parent.mkdir(parents=True)
            shutil.copy2(root / "prepare.py", scratch / "prepare.py")
            rung, error = measure(backend, source, PROBE_DEPTH, read_constants(source)["DEVICE_BATCH_SIZE"],
                                  prepare.time_budget(profile), scratch)
        runs.append((backend, rung.tokens_per_sec if rung else 0.0))
        say(f"auto: run {i}/{len(order)} {backend} {runs[-1][1]:,.0f} tokens/s"
            + (f" (failed: {error.splitlines()[-1] if error else 'no output'})" if rung is None else ""))
    data = {"version": AUTO_VERSION, "tags": {b: hardware.hardware_tag(b) for b in backends}, "runs": runs,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - start, 1)}
    if all(rate for _, rate in runs):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    return dict(data, runs=tuple(runs))


def auto_plan():
    """What auto will do on a CPU with several paths and no measurement yet: the rule, in one sentence."""
    cpu = cpu_paths()
    return (f"the first training command measures {' and '.join(cpu)} interleaved ({AUTO_REPEATS} runs each at "
            f"DEPTH {PROBE_DEPTH}) and picks the faster median, or the default {default_cpu()} when the margin "
            f"is within the spread")
