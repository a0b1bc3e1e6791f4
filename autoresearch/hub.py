"""The Hugging Face hub, for the one thing the harness takes from it: cuda/train.py's Flash Attention 3 kernel
(prepare.FA3_KERNELS, loaded through `kernels`).

No trainer, calibration rung or evaluator has a network in the sandbox, and huggingface_hub's client waits without a
timeout (on a network that drops packets, an import would hang for the OS's TCP timeout, ~2 minutes). So the harness
fetches the kernel itself, once per command and ahead of every child, after one short probe of the hub; each child
on an NVIDIA GPU then runs offline (HF_HUB_OFFLINE=1) and is shown, read-only, only those kernel repositories'
folders of the local hub cache, never the user's models or datasets there. The attention path in the hardware tag
is therefore the one a child can load (fa3 only when the kernel is in that cache)."""

import functools
import http.client
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import prepare

from . import sandbox

PROBE_SECONDS = 5.0
FETCH_SECONDS = 600.0  # every build tried, together: one is a few hundred MB
STALL_SECONDS = 30.0  # a hub that answered the probe, then sends nothing
DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE = ("1", "on", "yes", "true")
COMMIT = re.compile(r"[0-9a-f]{40}")  # what a ref in the cache holds; anything else names no snapshot
# The fetch child. kernels fetches a build by its commit, which leaves no refs/v<version> in the cache, and an
# offline load looks the version up there: the same files fetched again by the branch's name record it (no file is
# downloaded twice). huggingface_hub 2.4 names each blob by the ETag the hub sends, unchecked, so a hostile hub or
# mirror could name any path: only a hash is let through (git's 40 hex digits, LFS's 64), sandbox or not.
FETCH = """
import re, sys
from huggingface_hub import file_download, snapshot_download
from kernels import install_kernel

normalize = file_download._normalize_etag

def hash_only(etag):
    etag = normalize(etag)
    if etag is not None and not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag):
        raise ValueError(f"the hub sent an ETag that is not a hash: {etag[:80]!r}")
    return etag

file_download._normalize_etag = hash_only
repo, version = sys.argv[1], int(sys.argv[2])
build = install_kernel(repo, version=version, trust_remote_code=[repo])
snapshot_download(repo, repo_type="kernel", revision=f"v{version}", allow_patterns=[f"build/{build.name}/*"])
"""


def endpoint():
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_by_choice():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def cache_root():
    """The hub cache `kernels` reads, resolved as huggingface_hub resolves it."""
    for name in ("KERNELS_CACHE", "HF_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser().absolute()  # a relative one would bind and hide nothing
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser().absolute() / "hub"


def repo_folders(repo, root):
    """Where one repository lies in a hub cache: newer huggingface_hub files kernels as kernels--, older as models--."""
    name = repo.replace("/", "--")
    return [Path(root) / f"{kind}--{name}" for kind in ("kernels", "models")]


def cached(repo, version, root):
    """Whether this kernel version is in the hub cache at root, where cuda/train.py loads it from (its
    cached_kernel: the snapshot refs/v<version> names)."""
    for folder in repo_folders(repo, root):
        try:
            commit = (folder / "refs" / f"v{version}").read_text().strip()
        except (OSError, ValueError):
            continue
        if COMMIT.fullmatch(commit) and (folder / "snapshots" / commit).is_dir():
            return True
    return False


def builds_for(capability):
    """The FA3 builds for a GPU of this compute capability, best first: (repository, version) pairs."""
    return [(repo, version) for repo, version, caps in prepare.FA3_KERNELS if tuple(capability) in caps]


@functools.lru_cache(maxsize=None)
def probe(url, timeout):
    """None when the hub at url answered within timeout (any HTTP status is an answer), else why not. The limit is
    the whole answer's: a socket's timeout is per read, and a hub that sends a byte at a time would hold it forever."""
    answer = []
    asking = threading.Thread(target=lambda: answer.append(_ask(url, timeout)), daemon=True)
    asking.start()
    asking.join(timeout)
    return answer[0] if answer else f"no whole answer within {timeout:g}s"


def _ask(url, timeout):
    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/models?limit=1", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, timed out, dropped, no such host
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"[:160]
    return None


def download(repo, version, root, deadline):
    """Fetch one kernel build for this machine's torch into the hub cache at root, in a child process stopped at
    deadline (time.time()) or once no byte has reached the cache for STALL_SECONDS; None when the build is there
    after, else why not (one line)."""
    env = dict(os.environ, HF_HUB_CACHE=str(root), KERNELS_CACHE=str(root))
    # kernels 0.17 with telemetry off sends a user agent that ends in "; ", which huggingface_hub 2's HTTP client
    # refuses before any request leaves: every download would fail
    env.pop("HF_HUB_DISABLE_TELEMETRY", None)
    # In the sandbox, with a network and the hub cache its only writable folder: huggingface_hub 2.4 names a blob
    # by the ETag the hub sends, unchecked, so a hostile hub or mirror could otherwise write any file of the user's.
    argv, inside = sandbox.active().wrap([sys.executable, "-I", "-c", FETCH, repo, str(version)], root,
                                         sandbox.Policy(write=(str(root),), network=True))
    try:
        root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(argv, env=dict(env, **inside), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except OSError as e:  # a cache folder that cannot be made, a sandbox that cannot start
        return f"{type(e).__name__}: {e}"[:200]
    progress, moved = None, time.time()
    while True:
        try:
            _, err = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            now, seen = time.time(), _bytes_under(repo, root)
            if seen != progress:
                progress, moved = seen, now
            if now > deadline or now - moved > STALL_SECONDS:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return (f"nothing arrived for {STALL_SECONDS:g}s" if now - moved > STALL_SECONDS
                        else f"not fetched within {FETCH_SECONDS:g}s")
    if proc.returncode != 0:
        lines = err.strip().splitlines() or [f"exit {proc.returncode}"]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b.*:", line)]  # the traceback's end
        return (raised or lines)[-1][:200]
    return None if cached(repo, version, root) else "fetched, but its version is not recorded in the cache"


def _bytes_under(repo, root):
    """How much of the repository is in the cache so far, partial downloads included."""
    total = 0
    for folder in repo_folders(repo, root):
        for path in folder.rglob("*") if folder.is_dir() else ():
            try:
                total += path.lstat().st_size
            except OSError:
                continue
    return total


@functools.lru_cache(maxsize=None)
def fetch(capability):
    """(ready, note) for a GPU of this compute capability, once per command: ready when an FA3 build for it is in
    the local hub cache, fetched now if the hub answers; note: why a cuda child will use PyTorch's attention."""
    wanted = builds_for(capability)
    if not wanted:
        return False, None  # no build for this GPU: train.py says so itself
    root = cache_root()
    if any(cached(repo, version, root) for repo, version in wanted):
        return True, None
    names = " or ".join(f"{repo} v{version}" for repo, version in wanted)
    fallback = f"{root} holds no {names}: cuda runs use PyTorch's attention"
    if importlib.util.find_spec("kernels") is None:
        return False, f"hub: kernels is not installed (pip install -e '.[cuda]') and {fallback}"
    if offline_by_choice():
        return False, f"hub: HF_HUB_OFFLINE is set and {fallback}"
    why = probe(endpoint(), PROBE_SECONDS)
    if why:
        return False, f"hub: {endpoint()} did not answer in {PROBE_SECONDS:g}s ({why}) and {fallback}"
    errors, deadline = [], time.time() + FETCH_SECONDS
    for repo, version in wanted:
        # the one slow thing a command may do before it starts: say why it waits
        print(f"hub: fetching {repo} v{version} for sm{capability[0]}{capability[1]} into {root} (once: every cuda "
              f"run loads it from there, offline)", file=sys.stderr, flush=True)
        error = download(repo, version, root, deadline)
        if error is None:
            return True, None
        errors.append(f"{repo} v{version}: {error}")
        if time.time() > deadline or error.startswith("nothing arrived"):  # the hub stalls: the next would too
            break
    return False, f"hub: fetching FA3 failed ({'; '.join(errors)}) and {fallback}"


def child_env(capability):
    """(variables, note) for a child on an NVIDIA GPU of this compute capability (None: not on one, nothing to
    set): offline, on the hub cache the kernel was fetched into; note: why FA3 will not load, or None."""
    if capability is None:
        return {}, None
    _, note = fetch(tuple(capability))
    root = str(cache_root())
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": root, "KERNELS_CACHE": root}, note


def hidden(env):
    """The hub cache of a child with these variables (child_env's), covered: where it lies inside something the
    sandbox binds anyway (/opt, the checkout), only readable()'s folders show through."""
    return (env["KERNELS_CACHE"],) if env.get("KERNELS_CACHE") and env.get("HF_HUB_OFFLINE") == "1" else ()


def readable(env):
    """What of the hub cache a sandboxed child with these variables (child_env's) may read: the FA3 repositories'
    own folders, nothing else of the user's cache."""
    root = env.get("KERNELS_CACHE")
    if not root or env.get("HF_HUB_OFFLINE") != "1":
        return ()
    return tuple(str(f) for repo, _, _ in prepare.FA3_KERNELS for f in repo_folders(repo, root) if f.is_dir())
