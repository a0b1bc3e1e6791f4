"""The Hugging Face hub, asked once per command: cuda/train.py loads Flash Attention 3 through `kernels` at import,
in every trainer, evaluator and calibration rung, and huggingface_hub's client waits without a timeout, so on a
network that drops packets each import would hang for the OS's TCP timeout (~2 minutes). The harness asks the hub
once, with a short timeout; if it does not answer, every child runs offline (HF_HUB_OFFLINE=1): a kernel in the
local hub cache still loads, none is fetched, and train.py falls back to PyTorch's attention and says so."""

import functools
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

PROBE_SECONDS = 5.0
DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE = ("1", "on", "yes", "true")


def endpoint():
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_by_choice():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


@functools.lru_cache(maxsize=None)
def probe(url, timeout):
    """None when the hub at url answered within timeout (any HTTP status is an answer), else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/models?limit=1", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, timed out, dropped, no such host
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"[:160]
    return None


def online():
    """Whether the children may ask the hub: not when the user set HF_HUB_OFFLINE, nor when it did not answer."""
    return not offline_by_choice() and probe(endpoint(), PROBE_SECONDS) is None


def child_env(on_cuda_gpu):
    """(variables, note) for a child: one on an NVIDIA GPU (hardware.on_cuda_gpu) gets HF_HUB_OFFLINE=1 when the hub
    did not answer the one probe, with a one-line note saying so; elsewhere (no FA3 to load) nothing, and no
    probe."""
    if not on_cuda_gpu or offline_by_choice():
        return {}, None
    why = probe(endpoint(), PROBE_SECONDS)
    if why is None:
        return {}, None
    return {"HF_HUB_OFFLINE": "1"}, (f"hub: {endpoint()} did not answer in {PROBE_SECONDS:g}s ({why}): every child "
                                     f"runs offline (HF_HUB_OFFLINE=1), FA3 only from the local hub cache")


def cached_kernels(word):
    """Whether the local hub cache (where `kernels` looks) holds a kernel repository whose name contains word."""
    root = os.environ.get("KERNELS_CACHE") or os.environ.get("HF_HUB_CACHE")
    root = Path(root) if root else Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
    return any(word in p.parent.parent.name.lower() for kind in ("kernels", "models")
               for p in root.glob(f"{kind}--*/refs/*"))
