"""What this machine is: available backends, the auto choice, the hardware tag, an optimized BLAS."""

import importlib.util
import os
import platform
import re
import shutil
import subprocess

from . import BACKENDS

# Debian/Ubuntu's OpenBLAS packages (libopenblas0-pthread); the mlx[cpu] wheel bundles reference BLAS
BLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def _has(module):
    return importlib.util.find_spec(module) is not None


def is_apple_silicon():
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def cuda_device():
    """(name, memory MiB) of the first NVIDIA GPU, or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        name, mem = out.splitlines()[0].rsplit(",", 1)
        return name.strip(), int(float(mem))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def available_backends():
    """Backends whose framework is installed here, each with the device it would run on."""
    found = {}
    if _has("torch") and cuda_device():
        found["cuda"] = "gpu"
    if _has("mlx"):
        found["mlx"] = "gpu" if is_apple_silicon() else "cpu"
    if _has("torch"):
        found["mps"] = "gpu" if is_apple_silicon() else "cpu"
    return found


def pick_backend(requested="auto"):
    """(backend, reason). auto: cuda with an NVIDIA GPU, mlx on Apple Silicon, else the best CPU path."""
    found = available_backends()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}: choose auto or one of {', '.join(BACKENDS)}")
        if requested == "cuda" and "cuda" not in found and _has("torch"):
            return "cuda", "requested; no NVIDIA GPU, so cuda/train.py runs on the CPU (float32, no compile)"
        if requested not in found:
            need = "torch" if requested in ("cuda", "mps") else "mlx"
            raise ValueError(f"backend {requested} needs {need}; install with: pip install -e '.[{requested}]'")
        return requested, "requested"
    if "cuda" in found:
        return "cuda", f"NVIDIA GPU found ({cuda_device()[0]})"
    if is_apple_silicon() and "mlx" in found:
        return "mlx", "Apple Silicon: MLX on Metal"
    if "mlx" in found and blas_library():
        return "mlx", f"no GPU; MLX on CPU with optimized BLAS ({blas_library()})"
    if "mps" in found:
        return "mps", "no GPU; PyTorch's CPU build (mps backend falls back to CPU)"
    if "mlx" in found:
        return "mlx", "no GPU; MLX on CPU (reference BLAS: slow, see README to install OpenBLAS)"
    raise ValueError("no backend installed: pip install -e '.[mlx]' or '.[mps]' or '.[cuda]'")


def blas_library():
    """An optimized BLAS to preload for MLX on Linux CPUs, or None. AUTORESEARCH_BLAS=path|none overrides."""
    override = os.environ.get("AUTORESEARCH_BLAS")
    if override:
        return None if override == "none" else override
    if platform.system() != "Linux":
        return None
    arch = platform.machine()
    for pattern in BLAS_CANDIDATES:
        path = pattern.format(arch=arch)
        if os.path.exists(path):
            return path
    return None


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


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
        return f"{gpu[0]} {round(gpu[1] / 1024)}GB" if gpu else "cpu"
    if is_apple_silicon():
        return f"{cpu_name()} {memory_gb()}GB"
    return f"cpu {platform.machine()} {os.cpu_count()}c {memory_gb()}GB"


def hardware_tag(backend):
    """Stable slug: backend + device + memory + arch, e.g. mlx-cpu-x86_64-2c-24gb."""
    if backend == "cuda" and cuda_device():
        name, mem = cuda_device()
        return f"cuda-{_slug(name)}-{round(mem / 1024)}gb"
    if is_apple_silicon():
        return f"{backend}-{_slug(cpu_name())}-{memory_gb()}gb"
    return f"{backend}-cpu-{platform.machine().lower()}-{os.cpu_count()}c-{memory_gb()}gb"
