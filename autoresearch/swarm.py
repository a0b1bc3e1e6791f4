"""The swarm: one run branch explored by several workers at once, on Ray (`pip install -e '.[swarm]'`).

Each worker is a Ray actor holding one GPU, or a share of a CPU box's cores, with its own clone of the repository
and its own copy of the run branch on its node. It runs the loop's turn there: agent edit, experiment, gate. The
driver's checkout is the one ledger and the merged branch: every row lands there tagged with its worker, and a
kept result that still beats the swarm's best becomes it, so every worker starts its next turn from it."""

import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import git

from . import train_file
from . import record as harness_record
from .agents import make_agent
from .branch import BRANCH_PREFIX, STATE_DIR, Lock, Refused, open_branch, open_repo, refuse_dirty, state_dir
from .experiment import (CacheBroken, Measurement, Settings, Timing, check_budget, check_cache, experiment, make_row,
                         record)
from .experiment import setup as setup_run_branch
from .gate import decide, load_noise, noise_path, save_noise
from .hardware import hardware_tag
from .plain import plain
from .progress import describe_step
from .ledger import LEDGER_NAME, NOTES_REF, UNJUDGED, append_row, git_identity, replace_ledger
from .loop import NoEdit, agent_edit, check_turns, close_turn
from .runner import Interrupted, stop_leftover
from .summary import parse_step

BEST_REF = "refs/autoresearch/swarm/best"  # in a worker's clone: the swarm's best as the driver last sent it
OUT_REF = "refs/autoresearch/swarm/out"  # in a worker's clone: its last experiment, bundled for the driver
MAX_LOSSES = 3  # a worker lost this many times in a row without a result is given up
PROGRESS_SECONDS = 10  # the driver's `progress:` line on stderr: at a turn's first step, then this often
START_TIMEOUT = 300  # seconds for every worker to be placed and to answer (a cluster without the resources never does)
LOCKS = Path(tempfile.gettempdir()) / "autoresearch-swarm"  # this node's flocks: a core slot each, the trainer view
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # Ray colours the tracebacks it wraps a worker's error in


class SwarmError(Exception):
    """The swarm cannot go on (every worker lost); what it recorded stays recorded."""


@dataclass(frozen=True)
class Plan:
    """How the swarm runs: the same for every worker, fixed at the start."""
    workers: int
    agent: str = "random"  # random, or a command line
    agent_seed: int = 0  # worker i's random agent is seeded agent_seed + i
    agent_timeout: float = 900
    max_experiments: int | None = None  # agent turns with a result, all workers together
    address: str | None = None  # None or "local": a Ray instance of this machine's; "auto", "ray://...": a cluster
    tag: str | None = None  # set up the run branch autoresearch/<tag>-<workers' hardware> on worker 0 first
    noise_runs: int = 3  # with tag: the baseline's seeds
    calibrate: bool = True  # with tag: size the model for the workers' hardware first
    restart_timeout: float = 180  # seconds a worker that died has to answer again as Ray restarts it, else given up

    def __post_init__(self):
        if isinstance(self.workers, bool) or int(self.workers) != self.workers or self.workers < 1:
            raise ValueError(f"--workers must be a whole number >= 1, got {self.workers}")
        if self.noise_runs < 1:
            raise ValueError(f"--noise-runs must be at least 1, got {self.noise_runs}")
        if not self.restart_timeout > 0:
            raise ValueError(f"--restart-timeout must be more than 0 seconds, got {self.restart_timeout}")
        check_turns(self.max_experiments, self.agent_timeout)


@dataclass(frozen=True)
class Spec:
    """What a worker needs to start: its part of the plan and the series it measures."""
    swarm: str  # names the workers' clones: one swarm per driver checkout
    backend: str
    budget: float
    settings: Settings
    plan: Plan
    cores: int  # CPU cores per worker, pinned where the OS allows; 0 for GPU workers
    cache: str | None  # on a local Ray instance, the driver's AUTORESEARCH_CACHE; on a cluster, each node's own


@dataclass(frozen=True)
class Snapshot:
    """The driver's run branch as a worker copies it: the branch and the notes as a git bundle, the ledger, the
    noise floors."""
    branch: str
    bundle: bytes
    ledger: bytes
    noise: bytes
    notes: bool  # whether the bundle holds refs/notes/autoresearch (a repository without rows has none)

    def refspecs(self, branch_to):
        """What to fetch from the bundle: the branch into branch_to, the notes over the clone's own."""
        notes = f"refs/notes/{NOTES_REF}"
        return [f"+refs/heads/{self.branch}:{branch_to}"] + ([f"+{notes}:{notes}"] if self.notes else [])


@dataclass
class Report:
    """One turn of a worker, as it comes back to the driver."""
    worker: str
    events: list
    message: str = ""
    row: object = None  # the Row it recorded, None for a turn without a measurement (no edit, a repeat)
    commit: str = ""  # the experiment's commit, and the commit it started from
    base: str = ""
    bundle: bytes = b""  # the experiment's commit as a git bundle on top of base


# ---------------------------------------------------------------------------
# Git: what moves between the driver's repository and the workers' clones


def make_bundle(repo, *revs):
    """The objects of revs (refs, and ^commits the other side has) as the bytes of a git bundle."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "swarm.bundle"
        repo.git.bundle("create", "--quiet", str(path), *revs)
        return path.read_bytes()


def fetch_bundle(repo, data, *refspecs):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "swarm.bundle"
        path.write_bytes(data)
        repo.git.fetch("--quiet", str(path), *refspecs)


def snapshot(repo, branch):
    root = Path(repo.working_tree_dir)
    noise = noise_path(root)
    notes = f"refs/notes/{NOTES_REF}" in {r.path for r in repo.refs}
    refs = [f"refs/heads/{branch}"] + ([f"refs/notes/{NOTES_REF}"] if notes else [])
    return Snapshot(branch, make_bundle(repo, *refs),
                    (root / LEDGER_NAME).read_bytes() if (root / LEDGER_NAME).exists() else b"",
                    noise.read_bytes() if noise.exists() else b"{}", notes)


def cache_identity():
    """The prepared data a node measures on: its eval profile and the hash of its validation rows."""
    import prepare

    meta = prepare.load_meta()
    return f"profile {meta['profile']['name']}, validation rows {str(meta.get('val_rows_sha256'))[:12]}"


def node_name():
    """This Ray node as the user finds it: its host name and its address in the cluster (nodes on one host, in
    containers or network namespaces, share a host name)."""
    import ray

    try:
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    except Exception:  # outside a Ray worker
        return socket.gethostname()


def pin_cores(count):
    """Claim `count` cores of this node that no other worker holds (a flock per slot, released when the process
    dies) and run on them only: the worker's trainer inherits the affinity, and its hardware tag says how many
    cores it has. Returns the lock's file descriptor (kept open for the worker's life)."""
    cores = sorted(os.sched_getaffinity(0))
    LOCKS.mkdir(exist_ok=True)
    for slot in range(len(cores) // count):
        fd = os.open(LOCKS / f"cores-{cores[slot * count]}-{count}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.sched_setaffinity(0, cores[slot * count:(slot + 1) * count])
        return fd
    raise Refused(f"no {count} free cores left on {socket.gethostname()} for another worker")


# ---------------------------------------------------------------------------
# The worker: a Ray actor (ray.remote(Worker) in run_swarm)


class Worker:
    """One worker of the swarm (a threaded Ray actor: a turn, and the driver's progress and stop calls beside it)."""

    def __init__(self, spec, index):
        self.spec, self.name = spec, f"w{index}"
        if spec.cache:
            os.environ["AUTORESEARCH_CACHE"] = spec.cache
        self.cores_lock = None  # held open for the worker's life
        self.broken = None  # why this worker cannot run, for hello: Ray would bury an error raised here in a traceback
        if spec.cores and hasattr(os, "sched_setaffinity"):
            try:
                self.cores_lock = pin_cores(spec.cores)
            except Refused as e:
                self.broken = str(e)
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(spec.cores)
        import prepare

        self.root = prepare.cache_dir() / "swarm" / spec.swarm / self.name
        self.agent = make_agent(spec.plan.agent, spec.plan.agent_seed + index)
        self.last_turn = None
        self.step = None  # (turn label, the numbers of train.py's latest progress line), while it trains

    def hello(self):
        """Where this worker runs and what it would measure on, for the driver's checks before any experiment."""
        import prepare

        node = node_name()

        if self.broken:
            return {"error": self.broken, "kind": "start", "node": node}
        try:
            check_cache()
            data = cache_identity()
            LOCKS.mkdir(exist_ok=True)
            with open(LOCKS / "trainer-view.lock", "w") as lock:  # the workers of a node build its view once
                fcntl.flock(lock, fcntl.LOCK_EX)
                prepare.trainer_view()
        except Exception as e:  # no cache, a damaged one: the node's problem, said in one line
            return {"error": " ".join(str(e).split()), "kind": "cache", "node": node}
        return {"node": node, "pid": os.getpid(), "hardware": hardware_tag(self.spec.backend),
                "data": data, "root": str(self.root)}

    def sync(self, shot):
        """The clone made the driver's: the run branch at the swarm's best, the notes, the ledger, the noise floors.
        What an earlier life of this worker left (a trainer, an edit, a branch) is stopped and undone: the clone is
        scratch, and one that git cannot bring in line is made again from nothing."""
        if self.root.exists():
            stop_leftover(state_dir(self.root))
        try:
            repo = self._align(shot)
        except (git.GitCommandError, git.InvalidGitRepositoryError, git.NoSuchPathError, Refused):
            shutil.rmtree(self.root, ignore_errors=True)  # a damaged clone: the driver has everything it held
            repo = self._align(shot)
        state_dir(self.root)  # made where missing (a new clone): the noise floors and the record go there
        replace_ledger(self.root / LEDGER_NAME, shot.ledger)
        tmp = noise_path(self.root).with_suffix(".swarm.tmp")
        tmp.write_bytes(shot.noise)
        tmp.replace(noise_path(self.root))
        harness_record.save(self.root)
        return repo

    def _align(self, shot):
        """The clone's git at the driver's snapshot: its branch checked out, every other branch gone, the notes the
        driver's. The driver's repository is the truth: a branch only this clone has (a setup that failed or was
        killed here) would otherwise refuse the driver's next setup of that name."""
        if not (self.root / ".git").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            git.Repo.init(self.root)
        repo = open_repo(self.root)
        fetch_bundle(repo, shot.bundle, *shot.refspecs(BEST_REF))
        repo.git.checkout("--force", "-B", shot.branch, BEST_REF)
        repo.git.clean("-fdq")
        for head in repo.heads:
            if head.name != shot.branch:
                repo.delete_head(head, force=True)
        notes = f"refs/notes/{NOTES_REF}"
        if not shot.notes and notes in {r.path for r in repo.refs}:
            repo.git.update_ref("-d", notes)  # rows the driver never recorded (a failed setup's baseline)
        return repo

    def setup(self, shot, tag):
        """Set up the swarm's run branch in this clone, for this worker's hardware (calibrated, baseline seeds).
        Returns its Outcome (the baseline row), its noise floor and the new branch as a Snapshot."""
        spec = self.spec
        self.sync(shot)
        outcome = setup_run_branch(self.root, tag, spec.backend, spec.budget, spec.settings.seed,
                                   spec.settings.timeout, noise_runs=spec.plan.noise_runs, gate=spec.settings.gate,
                                   calibrate=spec.plan.calibrate, say=lambda text: None)
        repo, row = open_repo(self.root), outcome.row
        return outcome, load_noise(self.root, *row.key()[1:4]), snapshot(repo, repo.active_branch.name)

    def turn(self, shot, claims, number):
        """Turn `number` of the loop on the swarm's best: agent edit, experiment, gate. Its row is the driver's
        to record."""
        import ray

        spec = self.spec
        label = f"{self.name} turn {number}"
        events = []
        repo = self.sync(shot)
        base = repo.head.commit.hexsha
        with open_branch(self.root, spec.backend, spec.budget, f"swarm {self.name}", say=events.append) as branch:
            try:
                description, record = agent_edit(branch, self.agent, label, self.last_turn,
                                                 spec.plan.agent_timeout, events.append)
            except NoEdit as e:
                self.last_turn = f"no experiment: {e.reason}"
                return Report(self.name, events, f"{label}: {e}")
            check_cache()  # a broken cache is the node's fault: no claim, no row, the driver is told
            source = train_file(spec.backend, self.root).read_text()
            def claim(digest):
                return ray.get(claims.claim.remote(digest, self.name, description, source))

            def on_line(text):
                numbers = parse_step(text)
                if numbers:
                    self.step = (label, numbers)

            try:
                outcome = experiment(branch, description, spec.settings, on_line, claim)
            finally:
                self.step = None
            close_turn(branch, record, outcome)  # in this worker's clone: the driver's results do not show it
        self.last_turn = f"{description}: {outcome.message}"
        if outcome.status == "repeat":
            return Report(self.name, events, f"{label}: {outcome.message}")
        commit = repo.commit(outcome.row.commit)
        repo.git.update_ref(OUT_REF, commit.hexsha)
        return Report(self.name, events, f"{label}: {outcome.message}", outcome.row, commit.hexsha, base,
                      make_bundle(repo, OUT_REF, f"^{base}"))

    def progress(self):
        """(turn label, {step, percent, loss, ...}) of the training running now, or None: for the driver's progress
        lines."""
        return self.step

    def stop(self):
        """Stop this worker's training or evaluation now (the driver is ending): nothing of it will be recorded."""
        return stop_leftover(state_dir(self.root)) if self.root.exists() else []


class Claims:
    """Which programs (train_hash) the swarm's workers run or ran, so that no two run the same one. A Ray actor."""

    def __init__(self):
        self.runs = {}  # train_hash: [worker, description, source, finished]

    def claim(self, digest, worker, description, source):
        """None: the program is worker's to run now. Else where it runs or ran."""
        held = self.runs.get(digest)
        if held:
            return f"{'ran' if held[3] else 'runs'} on {held[0]} (\"{held[1]}\")"
        self.runs[digest] = [worker, description, source, False]
        return None

    def finished(self, digest, judged):
        """The program's row is in the ledger; one that says nothing about the idea (invalid) may run again."""
        if judged and digest in self.runs:
            self.runs[digest][3] = True
        else:
            self.runs.pop(digest, None)

    def lost(self, worker):
        """The programs worker was running when it died, released: [(train_hash, description, source)]."""
        found = [(d, w[1], w[2]) for d, w in self.runs.items() if w[0] == worker and not w[3]]
        for digest, _, _ in found:
            del self.runs[digest]
        return found


# ---------------------------------------------------------------------------
# The driver: the one ledger and the merged run branch


def absorb(branch, report, settings):
    """Record a worker's row in the driver's ledger. A keep moves the run branch to it where it started from the
    branch's head; where the swarm's best moved meanwhile, the gate decides again against the new best, and a
    result that still beats it is committed on top of it (same train.py). Returns (row, closing line)."""
    repo = branch.repo
    fetch_bundle(repo, report.bundle, OUT_REF)  # the experiment's commit, into the driver's objects
    row = replace(report.row, worker=report.worker)
    commit, head = repo.commit(report.commit), repo.head.commit
    message, adopt = report.message, None
    if row.status == "keep" and report.base == head.hexsha:
        adopt = commit
    elif row.status == "keep":
        best = branch.best()
        decision = decide(settings.gate, row.values(), best.values(), branch.noise())
        if decision.keep:
            with repo.git.custom_environment(**git_identity(repo)):
                sha = repo.git.commit_tree(commit.tree.hexsha, "-p", head.hexsha, "-m", commit.message)
            adopt = repo.commit(sha)
            row = replace(row, commit=sha[:7])
            message += (f" | the swarm's best had moved to {best.commit}: still better "
                        f"[{decision.reason}], committed on top of it as {sha[:7]}")
        else:
            row = replace(row, status="discard", description=f"{row.description} [kept by {report.worker} against "
                          f"{report.base[:7]}; the swarm's best had moved to {best.commit}: {decision.reason}]")
            message += f" | discarded: the swarm's best had moved to {best.commit} [{decision.reason}]"
    record(repo, row, adopt or commit)
    if adopt is not None:
        repo.head.reset(adopt, index=True, working_tree=True)
    return row, message


def lost_row(branch, settings, worker, description, source, reason):
    """The row of an experiment whose worker died before it was measured: nothing measured, the idea not judged."""
    head = branch.repo.head.commit
    unmeasured = Timing(0.0, 0.0, 0.0, branch.sandbox)
    row = make_row(branch, [Measurement("lost", 0.0, {}, unmeasured, reason)], "lost", head.hexsha[:7],
                   f"{description} [lost: {reason}]", settings, source)
    return replace(row, worker=worker)


def import_setup(root, outcome, noise, shot, say):
    """The run branch worker 0 set up, into the driver's checkout: the branch and its notes, its baseline row, its
    noise floor; then checked out."""
    repo = open_repo(root)
    fetch_bundle(repo, shot.bundle, *shot.refspecs(f"refs/heads/{shot.branch}"))
    append_row(root / LEDGER_NAME, outcome.row)
    if noise:
        save_noise(root, *outcome.row.key()[1:4], noise["samples"], noise["commit"])
    harness_record.save(root)
    harness_record.pin(root, shot.branch, outcome.row.pin)
    repo.git.checkout(shot.branch)
    say(f"setup on w0: {outcome.message}")
    say(f"run branch {shot.branch} set up on the workers' hardware and checked out here")


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
def _ray_messages_to(note):
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
        raise SwarmError(f"cannot connect to the Ray cluster at {address}: {_one_line(e)} (on a cluster node, "
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


def run_swarm(root, backend, budget, settings, plan, on_event=print):
    """N workers run the loop's turn on one run branch until interrupted or plan.max_experiments turns with a
    result. The driver's checkout (root) holds the merged branch and the one ledger. Returns the rows recorded."""
    try:
        import ray
    except ImportError:
        raise Refused("the swarm runs on Ray: pip install -e '.[swarm]'") from None
    budget = check_budget(budget)
    root = Path(root)
    repo = open_repo(root)
    refuse_dirty(repo)
    check_cache()
    log = state_dir(root) / "swarm.log"

    def logged(text):
        with open(log, "a") as f:  # plain: `tail -f` on the log must not act on what an agent wrote
            f.write(f"{time.strftime('%H:%M:%S')} {plain(text)}\n")

    def event(text):
        logged(text)
        on_event(text)

    # the checkout's lock before Ray starts: a second driver here would share the workers' clones
    with Lock(root, "swarm"), Signals() as signals, _ray_messages_to(logged):
        start_ray(ray, plan.address)
        signals.install()
        actors = []
        try:
            return _swarm(ray, root, backend, budget, settings, plan, event, signals, actors)
        except ray.exceptions.RayError as e:  # a worker's error that no step below caught: its own line, its kind
            raise _unwrapped(e, "the swarm stopped: ") from None
        finally:
            _stop(ray, actors, event)


def _swarm(ray, root, backend, budget, settings, plan, event, signals, actors):
    """run_swarm once Ray is up: the workers started (into actors), checked, set up where asked, then driven."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    repo = open_repo(root)
    swarm = hashlib.sha256(f"{socket.gethostname()}:{root.resolve()}".encode()).hexdigest()[:12]
    spec = Spec(swarm, backend, budget, settings, plan, cores_per_worker(ray, backend, plan.workers),
                os.environ.get("AUTORESEARCH_CACHE") if is_local(plan.address) else None)
    remote = ray.remote(Worker).options(num_cpus=spec.cores or 1, num_gpus=1 if backend == "cuda" else 0,
                                        max_restarts=-1, max_task_retries=0, max_concurrency=2,
                                        scheduling_strategy="SPREAD")  # a node each while there are nodes to spare
    actors.extend(remote.remote(spec, i) for i in range(plan.workers))
    hardware, clones = _check_workers(ray, actors, event, signals)
    if plan.tag:
        name = f"{BRANCH_PREFIX}{plan.tag}-{hardware}"
        if name in repo.heads:
            raise Refused(f"branch {name} already exists: choose another --tag, or check it out and run "
                          f"the swarm on it without --tag")
        event(f"setup: calibrating and measuring the baseline on w0 ({plan.noise_runs} seeds)")
        shot = snapshot(repo, repo.active_branch.name)
        try:
            outcome, noise, shot = signals.get(ray, actors[0].setup.remote(shot, plan.tag))
        except (RayActorError, ActorUnavailableError, RayTaskError) as e:
            # a baseline that crashed or is invalid is setup's SetupFailed: its status's exit code, said once
            raise _unwrapped(e, f"setup on w0 failed, run branch {name} not set up: ", clones[0]) from None
        import_setup(root, outcome, noise, shot, event)
    # the claims live on the driver's node: one on a worker's node would go down with it and take the swarm along
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    claims = ray.remote(Claims).options(num_cpus=0, scheduling_strategy=here).remote()
    with _open_branch(root, backend, budget, event, hardware) as branch:
        return _drive(ray, branch, actors, claims, settings, plan, event, signals,
                      (RayActorError, ActorUnavailableError, RayTaskError))


@contextmanager
def _open_branch(root, backend, budget, event, hardware):
    """open_branch for the workers' hardware; a refusal says how to set up a run branch for them."""
    opener = open_branch(root, backend, budget, "swarm", say=event, hardware=hardware)
    try:
        branch = opener.__enter__()
    except Refused as e:
        raise Refused(f"{e} (the workers measure on {hardware}; `--tag TAG` sets up a run branch for them)") from None
    try:
        yield branch
    finally:
        opener.__exit__(None, None, None)


def _check_workers(ray, actors, event, signals):
    """Every worker placed and answering, on a prepared cache with the driver's data, all on one hardware.
    Returns that hardware tag and the workers' clones."""
    try:
        deadline = time.time() + START_TIMEOUT
        hellos = [signals.get(ray, a.hello.remote(), max(1.0, deadline - time.time())) for a in actors]
    except ray.exceptions.GetTimeoutError:
        raise Refused(f"the workers did not all start within {START_TIMEOUT}s: the Ray cluster lacks the CPUs or "
                      f"GPUs for {len(actors)} of them (ray status shows what it has)") from None
    except ray.exceptions.RayActorError as e:  # its process died before it answered (the harness not installed)
        raise SwarmError(f"a worker could not start: {_one_line(e)}") from None
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


class Progress:
    """The driver's `progress:` line on stderr while workers train: each one's turn, step, % of the budget, loss
    and tokens/s, at a turn's first step and then every PROGRESS_SECONDS (stdout keeps the turns' results)."""

    def __init__(self, ray, budget):
        self.ray, self.budget = ray, budget
        self.asked = self.printed = 0.0
        self.seen, self.last = set(), None

    def poll(self, actors):
        now = time.time()
        if now - self.asked < 2:
            return
        self.asked = now
        try:
            steps = [s for s in self.ray.get([a.progress.remote() for a in actors], timeout=5) if s]
        except Exception:  # a worker dying or restarting: its turn's result says so
            return
        new = {label for label, _ in steps} - self.seen
        line = " | ".join(" ".join([label] + describe_step(numbers, self.budget)) for label, numbers in steps)
        if steps and line != self.last and (new or now - self.printed >= PROGRESS_SECONDS):
            self.seen |= new
            self.printed, self.last = now, line
            print(f"progress: {line}", file=sys.stderr, flush=True)


def _drive(ray, branch, actors, claims, settings, plan, event, signals, died):
    """Give each worker a turn on the latest best, record each result as it comes, until max_experiments. A worker
    that died gets its next turn once Ray has restarted it and it answers again, within plan.restart_timeout: one
    whose node is gone, with no room for it elsewhere, would otherwise be waited for forever."""
    rows, results = [], 0
    pending = {}  # Ray ref -> (worker index, "turn"; or "back": a dead worker's hello, sent as Ray restarts it)
    back_by = {}  # worker index -> when its restart must have answered
    losses, turns, bases = [0] * len(actors), [0] * len(actors), [None] * len(actors)
    alive = set(range(len(actors)))
    shot = ray.put(snapshot(branch.repo, branch.name))
    progress = Progress(ray, branch.budget)

    def training():
        return [i for i, kind in pending.values() if kind == "turn"]

    def more():
        return plan.max_experiments is None or results + len(training()) < plan.max_experiments

    def dispatch(i):
        turns[i] += 1
        head, best = branch.repo.head.commit.hexsha, branch.best()
        if bases[i] not in (None, head) and best.worker != f"w{i}":
            event(f"w{i} turn {turns[i]}: adopts the swarm's best {head[:7]} ({best.worker}'s, "
                  f"val_bpb {best.val_bpb:.6f})")
        bases[i] = head
        pending[actors[i].turn.remote(shot, claims, turns[i])] = (i, "turn")

    def give_up(i, why):
        alive.discard(i)
        event(f"w{i}: {why}: given up ({len(alive)} workers left)")

    for i in sorted(alive):
        if more():
            dispatch(i)
    while training() or (pending and more()):
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        signals.check()
        if not ready:
            for ref, (i, kind) in list(pending.items()):
                if kind == "back" and time.time() > back_by[i]:
                    del pending[ref]
                    give_up(i, f"not back {plan.restart_timeout:g}s after it died (its node gone, and no room for it on "
                               f"another)")
            progress.poll([actors[i] for i in training()])
            continue
        i, kind = pending.pop(ready[0])
        try:
            report = ray.get(ready[0])
        except died as e:
            losses[i] += 1
            failed = isinstance(e, ray.exceptions.RayTaskError)  # the call raised; the worker itself lives
            reason = f"worker w{i}'s turn failed: {_one_line(e)}" if failed else f"worker w{i} died"
            for digest, description, source in ray.get(claims.lost.remote(f"w{i}")):
                row = lost_row(branch, settings, f"w{i}", description, source, reason)
                record(branch.repo, row, branch.repo.head.commit)
                rows.append(row)
                shot = ray.put(snapshot(branch.repo, branch.name))
                event(f"w{i}: RESULT lost ({reason}): \"{description}\" was not measured; it may run again")
            if losses[i] >= MAX_LOSSES:
                give_up(i, f"lost {losses[i]} times in a row")
                continue
            event(f"w{i}: {reason}" + ("" if failed else "; Ray restarts it"))
            if not failed:
                # Ray retries the hello as the worker restarts (a call to it meanwhile would fail at once)
                back_by[i] = time.time() + plan.restart_timeout
                pending[actors[i].hello.options(max_task_retries=-1).remote()] = (i, "back")
                continue
        else:
            if kind == "back":
                if "error" in report:
                    give_up(i, f"back on {report['node']}, but {report['error']}")
                    continue
                event(f"w{i}: back, pid {report['pid']} on {report['node']}")
            else:
                losses[i] = 0
                results += 1
                shot = _absorb_report(ray, branch, claims, settings, report, rows, event) or shot
        if i in alive and more():
            dispatch(i)
    if not alive:
        raise SwarmError("every worker was lost: see the Ray logs (ray status, /tmp/ray/session_latest/logs)")
    return rows


def _absorb_report(ray, branch, claims, settings, report, rows, event):
    """A turn's report, into the driver's ledger and branch; the new snapshot for the next turns, or None where the
    turn recorded no row."""
    for text in report.events:
        event(text)
    message, shot = report.message, None
    if report.row is not None:
        row, message = absorb(branch, report, settings)
        ray.get(claims.finished.remote(row.train_hash, row.status not in UNJUDGED))
        rows.append(row)
        shot = ray.put(snapshot(branch.repo, branch.name))
    best = branch.best()
    event(message + (f" | swarm best {best.val_bpb:.6f} ({best.commit}, {best.worker})" if best else ""))
    return shot


def _stop(ray, actors, event):
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


def _one_line(e):
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


def _unwrapped(e, prefix, clone=None):
    """The exception to raise in the driver for a worker's error e: the harness's kind where it is one of the
    harness's (a refusal, a broken cache: the exit code the contract gives them), else SwarmError; one line. A
    state file it names (a crash log) is named in the worker's clone, where it is."""
    cause = _cause(e)
    line = prefix + _one_line(e)
    if clone:
        line = line.replace(f"in {STATE_DIR}/", f"in {clone}/{STATE_DIR}/")
    if isinstance(cause, Refused) and hasattr(cause, "status"):  # setup's SetupFailed: its status, its exit code
        return type(cause)(line, cause.status)
    kind = Refused if isinstance(cause, Refused) else CacheBroken if isinstance(cause, CacheBroken) else SwarmError
    return kind(line)
