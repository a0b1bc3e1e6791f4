"""What this machine is: available backends, the hardware tag, an optimized BLAS."""

import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys

from . import hub

# Debian/Ubuntu's OpenBLAS packages (libopenblas0-pthread); the mlx[cpu] wheel bundles reference BLAS
BLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

BLAS_HINT = "pip install mkl (x86-64), or apt-get install libopenblas0-pthread"


def _has(module):
    return importlib.util.find_spec(module) is not None


def is_apple_silicon():
    return platform.system() == "Darwin" and platform.machine() == "arm64"


# What cuda/train.py will see: torch's first visible device, as one JSON line
CUDA_PROBE = """import json, torch
gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps([gpu.name, gpu.total_memory // 2**20, getattr(gpu, "major", 0), getattr(gpu, "minor", 0)]
                 if gpu else None))"""
CUDA_PROBE_TIMEOUT = 120  # importing torch from a cold disk and creating a CUDA context can take a while


def cuda_device():
    """(name, memory MiB) of the GPU cuda/train.py would train on, or None. Asked of torch itself rather than
    nvidia-smi: a CPU-only torch on a GPU box has none, a container without nvidia-smi still has one, and
    CUDA_VISIBLE_DEVICES picks which. Once per process and CUDA_VISIBLE_DEVICES."""
    gpu = cuda_properties()
    return gpu[:2] if gpu else None


def cuda_capability():
    """(major, minor) compute capability of that GPU, or None."""
    gpu = cuda_properties()
    return gpu[2] if gpu else None


def cuda_properties():
    """(name, memory MiB, (major, minor)) of the GPU cuda/train.py would train on, or None."""
    if not _has("torch") or platform.system() == "Darwin":  # no CUDA builds of torch for macOS
        return None
    return _probe_cuda(os.environ.get("CUDA_VISIBLE_DEVICES"))


@functools.lru_cache(maxsize=None)
def _probe_cuda(visible_devices):  # the cache key; the probe inherits the variable itself
    """In a subprocess: the harness never imports torch or holds a CUDA context of its own."""
    try:
        done = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True,
                              timeout=CUDA_PROBE_TIMEOUT)
        gpu = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return (str(gpu[0]), int(gpu[1]), tuple(int(n) for n in (gpu[2:4] or (0, 0)))) if gpu else None


def gpu_gb(mib):
    """A GPU's memory in whole GB as sold: torch's total leaves out what the driver reserves, so round up."""
    return math.ceil(mib / 1024)


def gpu_capability(backend):
    """The compute capability of the NVIDIA GPU a child of this backend trains on (where FA3 may load), or None."""
    return cuda_capability() if backend == "cuda" else None


def available_backends():
    """Backends whose framework is installed here, each with the device it would run on."""
    found = {}
    if cuda_device():
        found["cuda"] = "gpu"
    if _has("mlx"):
        found["mlx"] = "gpu" if is_apple_silicon() else "cpu"
    if _has("torch"):
        found["mps"] = "gpu" if is_apple_silicon() else "cpu"
    return found


def blas_library():
    """The optimized BLAS to preload for MLX on Linux CPUs, or None (the wheel's reference BLAS): the `mkl` wheel
    in this environment (the mlx extra installs it on x86-64 Linux, no root needed; bench/blas.md measured it
    ahead of Debian's OpenBLAS), else the system's OpenBLAS. AUTORESEARCH_BLAS=path|none overrides."""
    override = os.environ.get("AUTORESEARCH_BLAS")
    if override:
        return None if override == "none" else override
    if platform.system() != "Linux":
        return None
    return mkl_wheel() or system_openblas()


def preload_blas(env, one_thread=False):
    """Preload the optimized BLAS for an MLX process into env (a dict); the note to print, or None without one.
    one_thread: for a process that runs one BLAS call per core itself (the evaluator's CPU streams)."""
    blas = blas_library()
    if not blas:
        return None
    if blas not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (blas, env.get("LD_PRELOAD")) if p)
    if one_thread:
        env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    threads = ", one thread per stream" if one_thread else ""
    return f"blas: preloading {blas} for MLX{threads} (AUTORESEARCH_BLAS=none to disable)"


def mkl_wheel():
    """libmkl_rt from the `mkl` wheel installed in this Python environment, or None."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate().resolve() for f in files if f.name.startswith("libmkl_rt.so")]
    return next((str(path) for path in found if path.exists()), None)


def system_openblas():
    arch = platform.machine()
    for pattern in BLAS_CANDIDATES:
        path = pattern.format(arch=arch)
        if os.path.exists(path):
            return path
    return None


def blas_name(path):
    """Short name of a BLAS library for the hardware tag: mkl, openblas, refblas (none preloaded), else the file's."""
    if not path:
        return "refblas"
    name = os.path.basename(path).lower()
    if "mkl" in name:
        return "mkl"
    if "openblas" in path.lower():
        return "openblas"
    return _slug(name.split(".so")[0].removeprefix("lib")) or "blas"


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_cores():
    """The cores this process may run on: its affinity where the OS has one (a swarm worker's share, a
    container's cpuset), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def memory_gb():
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)


def cpu_name():
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or platform.machine()
        except OSError:
            pass
    return platform.machine()


def device_name(backend):
    """Human-readable device a backend runs on here."""
    if backend == "cuda":
        gpu = cuda_device()
        return f"{gpu[0]} {gpu_gb(gpu[1])}GB" if gpu else "cpu"
    if is_apple_silicon():
        return f"{cpu_name()} {memory_gb()}GB"
    return f"cpu {platform.machine()} {cpu_cores()}c {memory_gb()}GB"


def package_version(name):
    """An installed distribution's version, read from its metadata (nothing imported), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_tag(backend):
    """The framework's version for the tag, and on CUDA the attention path its runs can load: a ladder measured
    on torch 2.9 with PyTorch's attention is another machine than one with FA3 loaded."""
    if backend == "mlx":
        return f"mlx{package_version('mlx')}"
    tag = f"torch{package_version('torch')}"
    if backend == "cuda" and cuda_capability():
        ready, _ = hub.fetch(cuda_capability())
        tag += f"-{expected_attention(cuda_capability(), package_version('kernels'), ready)}"
    return tag


def expected_attention(capability, kernels_version, cached):
    """What cuda/train.py's attention picks on this GPU as shipped: FA3 (its hub builds: sm80-sm90) where `kernels`
    is installed and a build is in the local hub cache (hub.fetch), else FlexAttention on sm80 and newer, else
    SDPA. The tag's part; the path a run took is in its summary (attention:) and in each calibration rung."""
    if kernels_version and cached and (8, 0) <= capability <= (9, 0):
        return f"fa3-kernels{kernels_version}"
    return "flex" if capability >= (8, 0) else "sdpa"


def apple_gpu_cores(output=None):
    """The GPU core count of this Apple chip (an M3 Max has a 30- and a 40-core variant), from `ioreg`'s
    AGXAccelerator entry ("gpu-core-count" = 40), or `system_profiler`'s "Total Number of Cores: 40"; None where
    neither says. output: a recorded reading, else asked of the machine."""
    if output is None:
        output = _run_quietly("ioreg", "-rc", "AGXAccelerator", "-d", "1") + \
            _run_quietly("system_profiler", "SPDisplaysDataType")
    found = re.search(r'"gpu-core-count"\s*=\s*(\d+)|Total Number of Cores:\s*(\d+)', output)
    return int(found[1] or found[2]) if found else None


@functools.lru_cache(maxsize=None)
def _run_quietly(*argv):
    """A command's output, once per process; "" where it cannot run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# Metal's memory budget for one process, as each framework reports it (bytes on the last line)
WORKING_SET_PROBE = {
    "mlx": "import mlx.core as mx; info = getattr(mx, 'device_info', None) or mx.metal.device_info; "
           "print(info()['max_recommended_working_set_size'])",
    "mps": "import torch; print(torch.mps.recommended_max_memory())",
}


def apple_working_set_mb(backend, output=None):
    """Metal's recommended working set in MiB on Apple Silicon (what a process may keep resident before Metal
    pages: about two thirds to three quarters of the memory, not all of it), or None elsewhere. output: a recorded
    probe's output, else the framework is asked in a subprocess (the harness imports neither)."""
    if output is None:
        if not is_apple_silicon() or backend not in WORKING_SET_PROBE:
            return None
        output = _run_quietly(sys.executable, "-c", WORKING_SET_PROBE[backend])
    lines = output.strip().splitlines()
    return int(lines[-1]) / 2**20 if lines and lines[-1].strip().isdigit() and int(lines[-1]) > 0 else None


def hardware_tag(backend):
    """Stable slug: backend + device + memory + arch (+ framework version and CUDA's attention path), e.g.
    mlx-cpu-x86_64-2c-24gb-mkl. On a Linux CPU, MLX's speed is its BLAS's (bench/blas.md: 7-14x between the
    reference BLAS and MKL), so the BLAS it preloads is part of the tag: results, calibrations and series under
    another BLAS are another hardware. Likewise the GPU's attention path and framework version, and an Apple
    chip's GPU core count (two M3 Max differ by a quarter of their cores)."""
    if backend == "cuda" and cuda_device():
        name, mem = cuda_device()
        return f"cuda-{_slug(name)}-{gpu_gb(mem)}gb-{_slug(software_tag(backend))}"
    if is_apple_silicon():
        return f"{backend}-{_slug(cpu_name())}-{apple_gpu_cores() or 0}gpu-{memory_gb()}gb-{_slug(software_tag(backend))}"
    tag = f"{backend}-cpu-{platform.machine().lower()}-{cpu_cores()}c-{memory_gb()}gb"
    return f"{tag}-{blas_name(blas_library())}" if backend == "mlx" and platform.system() == "Linux" else tag
