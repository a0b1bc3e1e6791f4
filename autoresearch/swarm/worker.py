"""The worker: a Ray actor (ray.remote(Worker) in the driver) with its own clone of the repository on its node,
pinned to its share of the node's cores, running the loop's turn there."""

import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

import git

import prepare

from .. import record as harness_record
from .. import train_file
from ..branch import Refused, open_branch, open_repo, state_dir
from ..experiment import check_cache, experiment
from ..experiment import setup as setup_run_branch
from ..gate import load_noise, noise_path
from ..hardware import hardware_tag
from ..ledger import LEDGER_NAME, NOTES_REF, replace_ledger
from ..loop import NoEdit, agent_edit, close_turn, make_agent
from ..runner import stop_leftover
from ..summary import parse_step
from .transport import BEST_REF, OUT_REF, Report, fetch_bundle, make_bundle, snapshot

LOCKS = Path(tempfile.gettempdir()) / "autoresearch-swarm"  # this node's flocks: a core slot each, the trainer view


def cache_identity():
    """The prepared data a node measures on: its eval profile and the hash of its validation rows."""
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
        self.root = prepare.cache_dir() / "swarm" / spec.swarm / self.name
        self.run = spec.run.at(self.root)
        self.agent = make_agent(spec.plan.agent, spec.plan.agent_seed + index)
        self.last_turn = None
        self.step = None  # (turn label, the numbers of train.py's latest progress line), while it trains

    def hello(self):
        """Where this worker runs and what it would measure on, for the driver's checks before any experiment."""
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
        return {"node": node, "pid": os.getpid(), "hardware": hardware_tag(self.run.backend),
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
        plan = self.spec.plan
        self.sync(shot)
        outcome = setup_run_branch(self.run, tag, plan.noise_runs, plan.calibrate, say=lambda text: None)
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
        with open_branch(self.run, f"swarm {self.name}", say=events.append) as branch:
            try:
                description, record = agent_edit(branch, self.agent, label, self.last_turn,
                                                 spec.plan.agent_timeout, events.append)
            except NoEdit as e:
                self.last_turn = f"no experiment: {e.reason}"
                return Report(self.name, events, f"{label}: {e}")
            check_cache()  # a broken cache is the node's fault: no claim, no row, the driver is told
            source = train_file(self.run.backend, self.root).read_text()
            def claim(digest):
                return ray.get(claims.claim.remote(digest, self.name, description, source))

            def on_line(text):
                numbers = parse_step(text)
                if numbers:
                    self.step = (label, numbers)

            try:
                outcome = experiment(branch, description, on_line, claim)
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
