"""The swarm across two Ray nodes, joined as README says: two network namespaces of this machine linked by a veth
pair (addresses of 198.51.100.0/24, a range kept for documentation), a real `ray start` in each, token
authentication on. A worker runs on each node, a core each; the second node is killed mid-experiment (every process
in its namespace): its row is `lost`, its worker, with no core left for it on the head, is given up once its restart
timeout passes rather than waited for, and the swarm goes on and ends normally. Needs root and `ip netns`."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import git
import pytest

from conftest import BUDGET, make_repo

pytestmark = pytest.mark.serial  # Ray nodes, a core each

pytest.importorskip("ray")

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, NODE_IP = "198.51.100.1", "198.51.100.2"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60, check=check)


def netns_usable():
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root: it makes network namespaces and a veth pair"
    if not shutil.which("ip"):
        return "needs the `ip` command (iproute2)"
    probe = f"arprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def kill_namespace(ns):
    """Every process in namespace ns killed at once (a node's raylet, its workers, their trainers): the node is
    gone as a machine that lost power is. `ray stop` would not do: it kills every Ray process of the machine."""
    pids = ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def in_ns(ns, *args, env=None, timeout=180):
    return subprocess.run(["ip", "netns", "exec", ns, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture
def two_nodes(tmp_path, cpu_cache):
    """Namespaces A (the head, 1 CPU) and B (1 CPU) joined by a veth pair, a Ray node started in each with the
    prepared cache and token authentication. Everything is removed afterwards, whatever happened."""
    reason = netns_usable()
    if reason:
        pytest.skip(reason)
    tag = str(os.getpid())[-5:]
    a, b, va, vb = f"ar{tag}a", f"ar{tag}b", f"arv{tag}a", f"arv{tag}b"
    # the nodes' environment: what README tells each node to have (the cache, the token mode; the token file is
    # ~/.ray/auth_token of this HOME, which `ray start --head` writes where it is missing)
    env = {"AUTORESEARCH_CACHE": str(cpu_cache), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path(tempfile.mkdtemp(prefix="array-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        for ns, dev, addr in ((a, va, HEAD_IP), (b, vb, NODE_IP)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        head = in_ns(a, RAY, "start", "--head", "--port", 6379, "--node-ip-address", HEAD_IP, "--num-cpus", 1,
                     "--include-dashboard=false", "--temp-dir", temp / "a", env=env)
        assert head.returncode == 0, head.stdout + head.stderr
        node = in_ns(b, RAY, "start", "--address", f"{HEAD_IP}:6379", "--node-ip-address", NODE_IP, "--num-cpus", 1,
                     "--temp-dir", temp / "b", env=env)
        assert node.returncode == 0, node.stdout + node.stderr
        yield a, b
    finally:
        for ns in (b, a):
            kill_namespace(ns)
        time.sleep(1)
        for ns in (b, a):
            ip("netns", "del", ns, check=False)  # its end of the veth pair goes with it
        shutil.rmtree(temp, ignore_errors=True)


def test_a_worker_per_node_and_a_node_killed_mid_experiment(two_nodes, tmp_path, cpu_cache):
    a, b = two_nodes
    root = make_repo(tmp_path / "project", backends=("mlx",))
    cmd = ["ip", "netns", "exec", a, sys.executable, "-m", "autoresearch", "--backend", "mlx", "swarm",
           "--address", f"{HEAD_IP}:6379", "--workers", 2, "--tag", "nn", "--noise-runs", 1, "--no-calibrate",
           "--budget", BUDGET, "--gate", "greedy", "--agent", "random", "-n", 4, "--restart-timeout", 15]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=root, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env=dict(os.environ, AUTORESEARCH_CACHE=str(cpu_cache), RAY_AUTH_MODE="token"))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # the worker on node B, and its clone (the nodes share this machine's disk, so the test can watch it)
        deadline, found = time.time() + 240, None
        while time.time() < deadline and not found and proc.poll() is None:
            found = next((re.match(r"(w\d): pid \d+ on .*\(" + re.escape(NODE_IP) + r"\), .*, clone (\S+)", t)
                          for t in list(lines) if re.match(r"w\d: pid .*\(" + re.escape(NODE_IP) + r"\)", t)), None)
            time.sleep(0.2)
        assert found, "no worker started on node B:\n" + "".join(lines)
        worker, clone = found.group(1), Path(found.group(2))
        assert any(re.match(r"w\d: pid \d+ on .*\(" + re.escape(HEAD_IP) + r"\)", t) for t in lines), "".join(lines)
        # mid-experiment: once node B's worker is training a turn (not the setup's baseline)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(t.startswith(f"progress: ") and f"{worker} turn" in t for t in list(lines)) and \
                    (clone / ".autoresearch/trainer.pid").exists():
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{worker} never trained a turn:\n" + "".join(lines))
        assert kill_namespace(b)
        assert proc.wait(timeout=480) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    print(out)
    assert f"{worker}: RESULT lost (worker {worker} died)" in out, out
    assert f"{worker}: not back 15s after it died (its node gone, and no room for it on another): given up " \
           f"(1 workers left)" in out, out
    assert "swarm ended: " in out and "Traceback" not in out, out
    # Ray's own notice of the dead node (colour codes, a "(raylet)" prefix) goes to the swarm's log, not the user
    assert "\x1b[" not in out and "(raylet)" not in out, out
    ended = re.search(r"swarm ended: (\d+) rows, .* (\d+) lost", out)
    assert int(ended.group(2)) >= 1, out
    repo = git.Repo(root)
    assert repo.active_branch.name.startswith("autoresearch/nn-mlx-cpu-")
    ledger = (root / "results.tsv").read_text()
    assert "\tlost\t" in ledger and not repo.is_dirty(untracked_files=True)
