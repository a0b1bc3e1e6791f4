"""The OS sandbox every untrusted process runs in: the trainer, calibration rungs, the evaluator's scoring process
(the harness's own code, running the graph the trainer exported, on a checkpoint the trainer wrote) and an agent
command's turn.

A Policy says what one process may see; a Sandbox turns it into the command that enforces it. Linux: bubblewrap,
a whitelist of read-only binds (the system, the interpreter, the venv, the checkout) over an empty root, a private
/tmp and HOME, a new pid namespace that dies with the harness, and no network for trainer and evaluator. macOS:
sandbox-exec with a generated profile to the same effect. Without either, runs go on unconfined and say so.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import prepare

MODES = ("auto", "require", "off")
INSTALL = {"Linux": "apt-get install bubblewrap (or dnf install bubblewrap)",
           "Darwin": "sandbox-exec ships with macOS: /usr/bin/sandbox-exec is missing or blocked"}
# Read-only in every sandbox where they exist: the system's programs, libraries and configuration.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/sys")
NETWORK_DIRS = ("/run/systemd/resolve",)  # where /etc/resolv.conf often points; never all of /run (its sockets)
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")
HOME_INSIDE = "/tmp/home"  # a trainer's or evaluator's HOME: empty at every start, gone at every end


class SandboxUnavailable(Exception):
    """--sandbox require on a machine without one; the message names the install command."""


@dataclass(frozen=True)
class Policy:
    """What one process may see. Paths are absolute; later (deeper) entries win over earlier (shallower) ones."""
    read: tuple = ()  # bound read-only at the same path
    write: tuple = ()  # bound read-write at the same path
    hide: tuple = ()  # covered by an empty directory (the real cache, the harness's state)
    network: bool = False
    private_home: bool = True  # HOME is an empty directory in the private /tmp; False: the user's own, read-only
    home_write: tuple = ()  # with private_home False: what in the user's HOME stays writable (relative paths)
    whole_system: bool = False  # everything else read-only too, as an agent's tools expect (else only the system)
    binds: tuple = ()  # (folder here, path inside) pairs, writable: a run's copy of its compile cache
    env: dict = field(default_factory=dict)  # set inside


def _home_writes(policy):
    """The user's HOME's writable parts for a policy without a private HOME: the rest of HOME is read-only, so
    nothing run there can plant a program on the user's PATH (~/bin, ~/.local/bin) or a git config that the
    harness, unconfined, would run next."""
    home = os.environ.get("HOME")
    if policy.private_home or not home:
        return []
    return [str(Path(home) / p) for p in policy.home_write]


def _existing(paths):
    return [str(Path(p)) for p in paths if Path(p).exists()]


def interpreter_paths():
    """What running this Python and the harness's own code needs: its prefix, the venv's, the real files behind
    the executable, this package and prepare.py where they are installed from (an editable install's finder
    points at them)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent),
             str(Path(__file__).resolve().parent), str(Path(prepare.__file__).resolve())}
    return sorted(paths)


def _depth(path):
    return len(Path(path).parts)


@dataclass(frozen=True)
class Sandbox:
    kind: str  # bwrap, sandbox-exec or none
    reason: str  # one line: why this one

    @property
    def confined(self):
        return self.kind != "none"

    def wrap(self, argv, cwd, policy):
        """(argv, env updates) that run argv under policy; unconfined: argv as it is, with the private HOME
        and /tmp the policy asks for still set where a directory can give them."""
        if self.kind == "bwrap":
            return bwrap_argv(argv, cwd, policy), _inside_env(policy, HOME_INSIDE, "/tmp")
        if self.kind == "sandbox-exec":
            home = tempfile.mkdtemp(prefix="autoresearch-home-")
            profile = seatbelt_profile(policy, home)
            return ["/usr/bin/sandbox-exec", "-p", profile, *argv], _inside_env(policy, home, home)
        return list(argv), dict(policy.env)


def _inside_env(policy, home, tmp):
    env = dict({"TMPDIR": tmp}, **policy.env)
    if policy.private_home:
        env.update(HOME=home, XDG_CACHE_HOME=f"{home}/.cache", XDG_CONFIG_HOME=f"{home}/.config")
    return env


def bwrap_argv(argv, cwd, policy):
    """bubblewrap's command line: an empty root with the policy's binds, parents before children."""
    # No capabilities inside, even for root (bwrap keeps them for a privileged caller): else the process could
    # unmount what hides the cache and the checkout, or remount a read-only bind writable.
    args = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--new-session",
            "--unshare-user-try", "--cap-drop", "ALL"]
    args += ["--ro-bind", "/", "/"] if policy.whole_system else []
    args += ["--proc", "/proc", "--dev", "/dev"] + ([] if policy.whole_system else ["--tmpfs", "/tmp"])
    if not policy.network:
        args.append("--unshare-net")
    system = (*SYSTEM_DIRS, *(NETWORK_DIRS if policy.network else ()))
    mounts = [("/", "--ro-bind")] if policy.whole_system else []
    mounts += [(p, "--ro-bind") for p in _existing((*system, *interpreter_paths(), *policy.read))]
    mounts += [(p, "--bind") for p in _existing(policy.write)]
    mounts += [(p, "--bind") for p in _existing(_home_writes(policy))]
    # what is hidden needs covering only where it lies inside something bound
    mounts += [(p, "--tmpfs") for p in _existing(policy.hide) if any(Path(p).is_relative_to(m) for m, _ in mounts)]
    # Parents first, so a deeper bind lands inside a shallower one; on one path the stricter entry comes last.
    order = {"--bind": 0, "--ro-bind": 1, "--tmpfs": 2}
    for path, how in sorted(set(mounts), key=lambda m: (_depth(m[0]), order[m[1]])):
        if path != "/":
            args += [how, path] if how == "--tmpfs" else [how, path, path]
    for src, dest in policy.binds:
        args += ["--bind", src, dest]
    for pattern in GPU_DEVICES:
        for dev in sorted(Path("/").glob(pattern.lstrip("/"))):
            args += ["--dev-bind", str(dev), str(dev)]
    if policy.private_home:
        args += ["--dir", HOME_INSIDE]
    args += ["--chdir", str(cwd), "--"]
    return args + list(argv)


def seatbelt_profile(policy, home):
    """A sandbox-exec profile: reads everywhere but the hidden paths, writes only to the policy's and home."""
    def quote(p):
        return '"' + str(Path(p).resolve()).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["(version 1)", "(allow default)", "(deny file-write*)",
             '(allow file-write* (subpath "/dev") (subpath "/private/var/folders"))',
             f"(allow file-write* (subpath {quote(home)}))"]
    lines += [f"(allow file-write* (subpath {quote(p)}))" for p in policy.write]
    lines += [f"(allow file-write* (subpath {quote(p)}))" for p in _existing(_home_writes(policy))]
    lines += [f"(deny file-read* file-write* (subpath {quote(p)}))" for p in policy.hide]
    lines += [f"(deny file-write* (subpath {quote(p)}))" for p in policy.read]
    if not policy.network:
        lines.append("(deny network*)")
    return "\n".join(lines) + "\n"


def _bwrap_works():
    """(path, why not): bwrap is installed and can make its namespaces here (a container may forbid them)."""
    path = shutil.which("bwrap")
    if not path:
        return None, "bubblewrap is not installed"
    probe = [path, "--die-with-parent", "--unshare-pid", "--unshare-net", "--cap-drop", "ALL", "--ro-bind", "/", "/",
             "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"bwrap could not run: {e}"
    if done.returncode != 0:
        return None, f"bwrap cannot make namespaces here: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return path, None


def _detect():
    system = platform.system()
    if system == "Darwin":
        if Path("/usr/bin/sandbox-exec").exists():
            return Sandbox("sandbox-exec", "macOS sandbox-exec with a generated profile")
        return Sandbox("none", "sandbox-exec is missing")
    if system == "Linux":
        path, why = _bwrap_works()
        if path:
            return Sandbox("bwrap", f"bubblewrap ({path}): read-only system and checkout, private /tmp and HOME, "
                                    "own pid namespace, no network for training and evaluation")
        return Sandbox("none", why)
    return Sandbox("none", f"no sandbox for {system}")


_resolved = {}


def resolve(mode):
    """The sandbox for --sandbox mode (auto: what exists; require: that, or SandboxUnavailable; off: none)."""
    if mode not in MODES:
        raise ValueError(f"--sandbox must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return Sandbox("none", "--sandbox off")
    if "found" not in _resolved:
        _resolved["found"] = _detect()
    found = _resolved["found"]
    if mode == "require" and not found.confined:
        raise SandboxUnavailable(f"--sandbox require: no sandbox here ({found.reason}); install it: "
                                 f"{INSTALL.get(platform.system(), 'no sandbox is known for this system')}")
    return found


_active = []


def use(mode):
    """Resolve mode once for this process (the CLI's edge); every untrusted process it starts runs under it.
    Child processes of the harness (a swarm's workers) inherit it through AUTORESEARCH_SANDBOX."""
    box = resolve(mode)
    _active[:] = [box]
    os.environ["AUTORESEARCH_SANDBOX"] = mode
    return box


def active():
    """The sandbox this process uses: the one use() chose, else AUTORESEARCH_SANDBOX's (default auto)."""
    if not _active:
        _active.append(resolve(os.environ.get("AUTORESEARCH_SANDBOX", "auto")))
    return _active[0]
