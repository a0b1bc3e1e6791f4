"""The driver: the one ledger and the merged run branch. It starts the workers, sets the run branch up on worker 0
where asked, then gives each worker a turn on the swarm's best and records every result as it comes."""

import hashlib
import os
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace

from .. import record as harness_record
from ..branch import Lock, Refused, open_branch, open_repo, refuse_dirty, run_branch_name, state_dir
from ..experiment import Measurement, Timing, check_cache, make_row, record
from ..gate import decide, save_noise
from ..ledger import LEDGER_NAME, UNJUDGED, append_row, git_identity
from ..plain import plain
from ..progress import describe_step
from .cluster import (Signals, check_workers, cores_per_worker, is_local, one_line, ray_messages_to, start_ray,
                      stop_workers, unwrapped)
from .plan import Spec, SwarmError
from .transport import OUT_REF, fetch_bundle, snapshot
from .worker import Worker

MAX_LOSSES = 3  # a worker lost this many times in a row without a result is given up


PROGRESS_SECONDS = 10  # the driver's `progress:` line on stderr: at a turn's first step, then this often


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


def absorb(branch, report):
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
        decision = decide(branch.run.gate, row.values(), best.values(), branch.noise())
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


def lost_row(branch, worker, description, source, reason):
    """The row of an experiment whose worker died before it was measured: nothing measured, the idea not judged."""
    head = branch.repo.head.commit
    unmeasured = Timing(0.0, 0.0, 0.0, branch.sandbox)
    row = make_row(branch, [Measurement("lost", 0.0, {}, unmeasured, reason)], "lost", head.hexsha[:7],
                   f"{description} [lost: {reason}]", source)
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


def run_swarm(run, plan, on_event=print):
    """N workers run the loop's turn on one run branch until interrupted or plan.max_experiments turns with a
    result. The driver's checkout (run.root) holds the merged branch and the one ledger. Returns the rows
    recorded."""
    try:
        import ray
    except ImportError:
        raise Refused("the swarm runs on Ray: pip install -e '.[swarm]'") from None
    root = run.root
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
    with Lock(root, "swarm"), Signals() as signals, ray_messages_to(logged):
        start_ray(ray, plan.address)
        signals.install()
        actors = []
        try:
            return _swarm(Crew(ray, actors, signals, event), run, plan)
        except ray.exceptions.RayError as e:  # a worker's error that no step below caught: its own line, its kind
            raise unwrapped(e, "the swarm stopped: ") from None
        finally:
            stop_workers(ray, actors, event)


@dataclass
class Crew:
    """The swarm's Ray side, for the driver: Ray, the worker actors, the claims actor, the signals, the log."""
    ray: object
    actors: list
    signals: Signals
    event: object  # event(text): one line to the swarm's log and the user
    claims: object = None  # the Claims actor, started once the workers answer

    def died(self):
        """What ray.get raises for a worker that died or whose turn raised."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        return RayActorError, ActorUnavailableError, RayTaskError


def _swarm(crew, run, plan):
    """run_swarm once Ray is up: the workers started (into crew.actors), checked, set up where asked, then driven."""
    ray, event = crew.ray, crew.event
    repo = open_repo(run.root)
    swarm = hashlib.sha256(f"{socket.gethostname()}:{run.root.resolve()}".encode()).hexdigest()[:12]
    spec = Spec(swarm, run, plan, cores_per_worker(ray, run.backend, plan.workers),
                os.environ.get("AUTORESEARCH_CACHE") if is_local(plan.address) else None)
    remote = ray.remote(Worker).options(num_cpus=spec.cores or 1, num_gpus=1 if run.backend == "cuda" else 0,
                                        max_restarts=-1, max_task_retries=0, max_concurrency=2,
                                        scheduling_strategy="SPREAD")  # a node each while there are nodes to spare
    crew.actors.extend(remote.remote(spec, i) for i in range(plan.workers))
    hardware, clones = check_workers(ray, crew.actors, event, crew.signals)
    if plan.tag:
        name = run_branch_name(plan.tag, hardware)
        if name in repo.heads:
            raise Refused(f"branch {name} already exists: choose another --tag, or check it out and run "
                          f"the swarm on it without --tag")
        event(f"setup: calibrating and measuring the baseline on w0 ({plan.noise_runs} seeds)")
        shot = snapshot(repo, repo.active_branch.name)
        try:
            outcome, noise, shot = crew.signals.get(ray, crew.actors[0].setup.remote(shot, plan.tag))
        except crew.died() as e:
            # a baseline that crashed or is invalid is setup's SetupFailed: its status's exit code, said once
            raise unwrapped(e, f"setup on w0 failed, run branch {name} not set up: ", clones[0]) from None
        import_setup(run.root, outcome, noise, shot, event)
    # the claims live on the driver's node: one on a worker's node would go down with it and take the swarm along
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    crew.claims = ray.remote(Claims).options(num_cpus=0, scheduling_strategy=here).remote()
    with ExitStack() as opened:
        try:
            branch = opened.enter_context(open_branch(run, "swarm", say=event, hardware=hardware))
        except Refused as e:  # said with how to set up a run branch for the workers
            raise Refused(f"{e} (the workers measure on {hardware}; `--tag TAG` sets up a run branch for "
                          "them)") from None
        return _drive(crew, branch, plan)


class StepLines:
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


def _drive(crew, branch, plan):
    """Give each worker a turn on the latest best, record each result as it comes, until max_experiments. A worker
    that died gets its next turn once Ray has restarted it and it answers again, within plan.restart_timeout: one
    whose node is gone, with no room for it elsewhere, would otherwise be waited for forever."""
    ray, actors, claims, event, signals = crew.ray, crew.actors, crew.claims, crew.event, crew.signals
    died = crew.died()
    rows, results = [], 0
    pending = {}  # Ray ref -> (worker index, "turn"; or "back": a dead worker's hello, sent as Ray restarts it)
    back_by = {}  # worker index -> when its restart must have answered
    losses, turns, bases = [0] * len(actors), [0] * len(actors), [None] * len(actors)
    alive = set(range(len(actors)))
    shot = ray.put(snapshot(branch.repo, branch.name))
    progress = StepLines(ray, branch.budget)

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
            reason = f"worker w{i}'s turn failed: {one_line(e)}" if failed else f"worker w{i} died"
            for digest, description, source in ray.get(claims.lost.remote(f"w{i}")):
                row = lost_row(branch, f"w{i}", description, source, reason)
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
                shot = _absorb_report(crew, branch, report, rows) or shot
        if i in alive and more():
            dispatch(i)
    if not alive:
        raise SwarmError("every worker was lost: see the Ray logs (ray status, /tmp/ray/session_latest/logs)")
    return rows


def _absorb_report(crew, branch, report, rows):
    """A turn's report, into the driver's ledger and branch; the new snapshot for the next turns, or None where the
    turn recorded no row."""
    for text in report.events:
        crew.event(text)
    message, shot = report.message, None
    if report.row is not None:
        row, message = absorb(branch, report)
        crew.ray.get(crew.claims.finished.remote(row.train_hash, row.status not in UNJUDGED))
        rows.append(row)
        shot = crew.ray.put(snapshot(branch.repo, branch.name))
    best = branch.best()
    crew.event(message + (f" | swarm best {best.val_bpb:.6f} ({best.commit}, {best.worker})" if best else ""))
    return shot
