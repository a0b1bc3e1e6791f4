"""Ray itself, for the driver: starting it or joining a cluster, the workers' first answers, signals while Ray's
calls run, and a worker's error as the harness's own kind and one line."""

import logging
import re
import signal
import threading
import time
from contextlib import contextmanager

from ..branch import STATE_DIR, Refused
from ..experiment import CacheBroken
from ..runner import Interrupted
from .plan import SwarmError
from .worker import cache_identity

START_TIMEOUT = 300  # seconds for every worker to be placed and to answer (a cluster without the resources never does)


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # Ray colours the tracebacks it wraps a worker's error in


class Signals:
    """Ctrl-C, SIGTERM and SIGHUP while the driver works with Ray: noted, then raised between Ray's calls as the
    harness's own (KeyboardInterrupt, Interrupted), since an exception raised inside one breaks it. ray.init takes
    SIGTERM over: install() again after it. On exit the handlers from before are back."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.signum = None
        self.main = threading.current_thread() is threading.main_thread()
        self.before = {sig: signal.getsignal(sig) for sig in self.CAUGHT} if self.main else {}
        return self.install()

    def install(self):
        for sig in self.before:
            signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.signum = self.signum or signum

    def check(self):
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum:
            raise Interrupted(self.signum)

    def get(self, ray, ref, timeout=None):
        """ray.get(ref), waiting in short steps so that a signal is raised at once; GetTimeoutError after timeout."""
        deadline = None if timeout is None else time.time() + timeout
        while not ray.wait([ref], timeout=1.0)[0]:
            self.check()
            if deadline is not None and time.time() > deadline:
                raise ray.exceptions.GetTimeoutError(f"not ready after {timeout}s")
        return ray.get(ref)

    def __exit__(self, *exc):
        for sig, handler in self.before.items():
            signal.signal(sig, handler)


@contextmanager
def ray_messages_to(note):
    """The cluster's messages that Ray's driver prints to stderr whatever log_to_driver says (a node marked dead, an
    actor it cannot place yet), in colour and beside the harness's own line for the same event, go to the swarm's
    log instead. Ray has no option for it: its listener looks the printer up in its worker module at each message."""
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)

    def to_log(data, ignore_prefix=False):
        for line in data.get("lines", ()):
            note(f"ray ({data.get('pid', '')}): {' '.join(ANSI.sub('', str(line)).split())}")

    if printer is not None:
        ray_worker.print_to_stdstream = to_log
    try:
        yield
    finally:
        if printer is not None:
            ray_worker.print_to_stdstream = printer


def is_local(address):
    return address in (None, "local")


def start_ray(ray, address):
    """Start a Ray instance of this machine's (None or "local": a new one, even beside a running cluster), or
    connect to the cluster at address ("auto": the one `ray start` made on this node; "ray://HOST:PORT")."""
    # Ray's notice that a local instance uses token authentication (kept on) is not the harness's to print
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if is_local(address):
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster there, or it refused this node's token
        raise SwarmError(f"cannot connect to the Ray cluster at {address}: {one_line(e)} (on a cluster node, "
                         f"`ray start` first; RAY_AUTH_MODE=token and ~/.ray/auth_token as the head has them: see "
                         f"README, Swarm)") from None


def cores_per_worker(ray, backend, workers):
    """CPU cores for each worker: 0 on GPUs (a whole GPU each); on CPUs an even share of the largest node's."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if backend == "cuda":
        gpus = sum(int(n.get("GPU", 0)) for n in nodes)
        if gpus < workers:
            raise Refused(f"{workers} cuda workers need {workers} GPUs; the Ray cluster has {gpus}")
        return 0
    largest = max(int(n.get("CPU", 0)) for n in nodes)
    total = sum(int(n.get("CPU", 0)) for n in nodes)
    share = min(largest, total // workers)
    if share < 1:
        raise Refused(f"{workers} workers need a CPU core each; the Ray cluster has {total}")
    return share


def check_workers(ray, actors, event, signals):
    """Every worker placed and answering, on a prepared cache with the driver's data, all on one hardware.
    Returns that hardware tag and the workers' clones."""
    try:
        deadline = time.time() + START_TIMEOUT
        hellos = [signals.get(ray, a.hello.remote(), max(1.0, deadline - time.time())) for a in actors]
    except ray.exceptions.GetTimeoutError:
        raise Refused(f"the workers did not all start within {START_TIMEOUT}s: the Ray cluster lacks the CPUs or "
                      f"GPUs for {len(actors)} of them (ray status shows what it has)") from None
    except ray.exceptions.RayActorError as e:  # its process died before it answered (the harness not installed)
        raise SwarmError(f"a worker could not start: {one_line(e)}") from None
    mine = cache_identity()
    for i, h in enumerate(hellos):
        if h.get("kind") == "start":
            raise Refused(f"worker w{i} on {h['node']} could not start: {h['error']}")
        if "error" in h:
            raise CacheBroken(f"worker w{i} on {h.get('node', 'its node')}: {h['error']} (prepare the data on every "
                              f"node, or share one cache: AUTORESEARCH_CACHE in the environment of `ray start`)")
        if h["data"] != mine:
            raise Refused(f"worker w{i} on {h['node']} has other prepared data ({h['data']}) than this checkout "
                          f"({mine}): prepare from the same source with the same profile on every node")
        event(f"w{i}: pid {h['pid']} on {h['node']}, {h['hardware']}, clone {h['root']}")
    tags = sorted({h["hardware"] for h in hellos})
    if len(tags) > 1:
        raise Refused(f"the workers run on different hardware ({', '.join(tags)}): results of different hardware "
                      f"are never compared, so run one swarm per hardware")
    return tags[0], [h["root"] for h in hellos]


def stop_workers(ray, actors, event):
    """No trainer outlives the swarm: each worker stops its own, then Ray goes."""
    stopped = []
    for a in actors:
        try:
            stopped += ray.get(a.stop.remote(), timeout=30)
        except Exception:  # a dead or restarting worker: its trainer is stopped by its clone's next recovery
            pass
    if stopped:
        event(f"stopped {len(stopped)} training run(s) in flight: not measured, no rows")
    ray.shutdown()


def _cause(e):
    """What a worker raised, out of Ray's wrapping: a RayTaskError carries the original exception as its cause."""
    cause = getattr(e, "cause", None)
    while isinstance(cause, BaseException) and cause is not e:
        e, cause = cause, getattr(cause, "cause", None)
    return e


def one_line(e):
    """A worker's error as one line for the user: the original exception's message, without Ray's traceback, its
    colour codes or its `ray::Worker.setup() (pid=..., ip=...)` header."""
    cause = _cause(e)
    text = ANSI.sub("", str(cause))
    if type(cause).__module__.startswith("ray"):  # Ray's own (a worker process died): its last line says why
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else type(cause).__name__
        text = re.sub(r"^(?:\w+\.)+\w+: ", "", text)  # "autoresearch.branch.Refused: why" from a creation task
    elif not type(cause).__module__.startswith("autoresearch"):  # a bug, not a refusal: its type says which
        text = f"{type(cause).__name__}: {text}"
    return " ".join(text.split()) or type(cause).__name__


def unwrapped(e, prefix, clone=None):
    """The exception to raise in the driver for a worker's error e: the harness's kind where it is one of the
    harness's (a refusal, a broken cache: the exit code the contract gives them), else SwarmError; one line. A
    state file it names (a crash log) is named in the worker's clone, where it is."""
    cause = _cause(e)
    line = prefix + one_line(e)
    if clone:
        line = line.replace(f"in {STATE_DIR}/", f"in {clone}/{STATE_DIR}/")
    if isinstance(cause, Refused) and hasattr(cause, "status"):  # setup's SetupFailed: its status, its exit code
        return type(cause)(line, cause.status)
    kind = Refused if isinstance(cause, Refused) else CacheBroken if isinstance(cause, CacheBroken) else SwarmError
    return kind(line)
