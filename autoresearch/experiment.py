"""One experiment: check the edit, commit it, train, evaluate in the harness, compare like with like, keep or
reset, log a row. train.py only trains: the clock, the repository check and val_bpb are the harness's."""

import ast
import hashlib
import math
import os
import re
import shutil
import site
import statistics
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import git

import prepare

from . import kernels, sandbox, train_file
from . import record as harness_record
from .branch import (STATE_DIR, Lock, Refused, RunBranch, changed_files, disk_changes, git_control_files, open_branch,
                     open_repo, pin_of, refs_snapshot, refuse_dirty, run_branch_name, state_dir)
from .calibrate import calibrate
from .clock import Clock
from .evaluate import evaluate
from .gate import decide, judge_pace, load_noise, save_noise, spread
from .hardware import hardware_tag
from .hparams import block_json, set_constants
from .ledger import (LEDGER_NAME, MAX_DESCRIPTION_CHARS, MISSING_NUMBER, NOTES_REF, SCORED, UNJUDGED, LedgerError,
                     Row, append_row, format_row, now, one_line, write_note)
from .runner import COMPILE_CACHE_ENV, CappedLog, Interrupted, run_training

EXIT = {"ok": 0, "keep": 0, "holds": 0, "error": 1, "refused": 2, "discard": 3, "regressed": 3, "crash": 4, "repeat": 5,
        "invalid": 6, "agent": 7}  # agent: the loop stopped after too many agent turns in a row without an experiment
# A train.py is a program, not a data store: one of megabytes is weights or text carried in its source.
MAX_TRAIN_BYTES = 1 << 20
PROTECTED = (LEDGER_NAME, f"{STATE_DIR}/noise.json")  # ignored files a train.py must not touch
SLOWED_MARK = "[slowed by the machine:"  # in a row's description: its run trained far below the series' typical rate


class CacheBroken(Exception):
    """The prepared cache does not match what prepare recorded: the harness's fault, not the candidate's."""


class DiskFull(CacheBroken):
    """train.py failed for want of space where the cache is (its checkpoint is written there): the machine's fault,
    not the candidate's, so no row: the same program recorded as a crash would be refused as a repeat."""


# What a failed write says when the disk or the user's quota is full (Python's OSError, C's strerror)
NO_SPACE = re.compile(r"(?:\[Errno (?:28|122)\] )?(?:No space left on device|Disk quota exceeded)|\[Errno (?:28|122)\]")
NO_SPACE_FREE = 256 << 20  # what the cache's disk has free after such a failure when it is the disk's fault


class SetupFailed(Refused):
    """setup measured no baseline (it crashed or is invalid): the run branch it made is removed and nothing is
    recorded, so the same setup can run again. A Refused, as nothing changed; status is the baseline's (crash or
    invalid), for the exit code."""

    def __init__(self, message, status="crash"):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # a swarm worker's setup raises it through Ray, which pickles it
        return SetupFailed, (str(self), self.status)


@dataclass
class Outcome:
    status: str
    row: Row | None
    best_before: Row | None
    message: str  # the one closing line


@dataclass(frozen=True)
class Timing:
    """One run by the harness's clock."""
    training: float  # from the first progress line to the exit
    startup: float  # from the spawn to the first progress line
    step: float  # the median time between progress lines
    sandbox: str  # what confined it
    evaluation: float = 0.0  # the evaluation's seconds, where it ran

    @classmethod
    def of(cls, result):
        training, startup = result.measured_training() or (0.0, 0.0)
        return cls(training, startup, result.step_interval(), result.sandbox)


@dataclass
class Measurement:
    """One seed of one program, as the harness measured it."""
    status: str  # ok, crash or invalid
    val_bpb: float
    summary: dict
    timing: Timing
    reason: str  # why not ok
    compiled: Path | None = None  # the run's copy of the compile cache: the branch's if the program is kept
    rerun: str = ""  # where this is a seed's second run: why the first did not count (slowed by the machine)
    slowed: str = ""  # where this run itself trained far slower than its series' typical rate: the numbers
    holdout_bpb: float | None = None  # the holdout rows' score (prepare.get_holdout_rows), never a decision's input


def throughput(summary):
    """Training tokens per second of a run by its summary: its tokens over its training seconds, the way a ledger
    row gives it (report.throughput), so a run compares alike with the rows before it; None without them."""
    s = summary or {}
    tokens, seconds = s.get("total_tokens_M", math.nan) * 1e6, s.get("training_seconds", math.nan)
    rate = tokens / seconds if seconds > 0 else math.nan
    return rate if math.isfinite(rate) and rate > 0 else None


RECENT_RUNS = 10  # the rows an experiment's throughput is compared with: the series' latest ones


def typical_rate(branch, summary):
    """The tokens/s this machine trains a model of this run's size at: the fastest of the series' last RECENT_RUNS
    scored rows with the same parameter count (a bigger model trains fewer tokens a second by itself); the fastest,
    as a busy machine only ever slows a run. None where no such row exists: nothing to compare with."""
    params = (summary or {}).get("num_params_M")
    rates = [r.tokens / r.training_seconds for r in branch.rows()
             if r.key() == branch.key() and r.status in SCORED and r.num_params_M == params
             and r.tokens > 0 and r.training_seconds > 0]
    rates = [x for x in rates[-RECENT_RUNS:] if math.isfinite(x)]
    return max(rates) if rates else None


def train_hash(source):
    """Hash of train.py with comments and formatting ignored, so a re-indented copy is the same."""
    try:
        canon = ast.dump(ast.parse(source))
    except SyntaxError:
        canon = source
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_cache():
    """The cache is as prepare left it; else CacheBroken with the repair."""
    try:
        prepare.check_cache()
    except prepare.PrepareError as e:
        raise CacheBroken(str(e)) from None


def record(repo, row, commit):
    """Append the row to results.tsv, and to the commit's git note (refs/notes/autoresearch), so a run
    branch carries its own ledger to other machines: `git push origin refs/notes/autoresearch`."""
    root = Path(repo.working_tree_dir)
    harness_record.pending(root, format_row(row))
    append_row(root / LEDGER_NAME, row)
    write_note(repo, row, commit)
    harness_record.save(root)


# ---------------------------------------------------------------------------
# One training run, measured by the harness
# ---------------------------------------------------------------------------


class Watch:
    """What a training run must leave alone: HEAD, the refs, the working tree, git's control files, the files git
    ignores (bytecode beside the sources), the interpreter's startup hooks and the harness's own files. In the
    sandbox a run cannot reach any of these; without one, this is what catches it."""

    def __init__(self, branch):
        self.branch = branch
        repo, root = branch.repo, branch.root
        self.head = repo.head.commit
        self.refs = refs_snapshot(repo)
        self.untracked = set(repo.untracked_files)
        self.files = {p: (root / p).read_bytes() if (root / p).exists() else None for p in PROTECTED}
        self.control = git_control_files(repo)
        self.hooks = startup_hooks()
        self.ignored = checkout_files(root)

    def violations(self):
        """What the run changed, each undone here; [] for an honest run. Git's control files first, in Python:
        no git command runs before a planted hook, filter or config entry is gone."""
        repo, root = self.branch.repo, self.branch.root
        found = self._restore_control(Path(repo.git_dir))
        for p, before in self.files.items():
            now_bytes = (root / p).read_bytes() if (root / p).exists() else None
            if now_bytes != before:
                found.append(f"{p} {'deleted' if now_bytes is None else 'changed'}")
                _put_back(root / p, before)
        found += self._restore_hooks()
        planted = sorted(set(checkout_files(root).items()) - set(self.ignored.items()))
        if planted:
            found.append(f"files written beside the sources: {', '.join(p for p, _ in planted[:5])}")
            for p, _ in planted:
                if p not in self.ignored:
                    (root / p).unlink(missing_ok=True)
        if refs_snapshot(repo) != self.refs:
            found.append("git refs changed (a commit, a tag or the notes)")
            for line in self.refs.splitlines():
                name, sha = line.split(" ")
                if name == f"refs/notes/{NOTES_REF}":
                    repo.git.update_ref(name, sha)  # the ledger's second copy
        if repo.head.commit != self.head:
            found.append(f"HEAD moved to {repo.head.commit.hexsha[:7]}")
        flags = [line[2:] for line in repo.git.ls_files("-v").splitlines() if line[:1].islower() or line[:1] == "S"]
        if flags:
            found.append(f"git index flags set (assume-unchanged, skip-worktree): {', '.join(flags[:5])}")
            repo.git.update_index("--no-assume-unchanged", "--no-skip-worktree", "--", *flags)
        touched = sorted(set(changed_files(repo)) - self.untracked | set(disk_changes(repo, skip=())))
        if touched:
            found.append(f"files written: {', '.join(touched[:5])}" + (" ..." if len(touched) > 5 else ""))
            for f in touched:
                if f in repo.untracked_files:
                    (root / f).unlink(missing_ok=True)
        if found:
            repo.head.reset(self.head, index=True, working_tree=True)
        return found

    def _restore_control(self, git_dir):
        now = git_control_files(self.branch.repo)
        changed = sorted(p for p in set(now) | set(self.control) if now.get(p) != self.control.get(p))
        for p in changed:
            _put_back(git_dir / p, self.control.get(p))
        return [f".git/{p} written" for p in changed]

    def _restore_hooks(self):
        now = startup_hooks()
        changed = sorted(p for p in set(now) | set(self.hooks) if now.get(p) != self.hooks.get(p))
        for p in changed:
            _put_back(Path(p), self.hooks.get(p))
        return [f"interpreter startup file {p} written" for p in changed]


def _put_back(path, data):
    """path as it was: data, or absent where data is None."""
    if data is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".restore")
    tmp.write_bytes(data)
    tmp.replace(path)


def startup_hooks():
    """{path: bytes} of what Python runs at every start from this interpreter's site folders: *.pth files and
    sitecustomize/usercustomize modules."""
    found = {}
    for folder in {*site.getsitepackages(), site.getusersitepackages()}:
        for path in sorted(Path(folder).glob("*.pth")) + [Path(folder) / f"{m}customize.py" for m in ("site", "user")]:
            if path.is_file():
                found[str(path)] = path.read_bytes()
    return found


def checkout_files(root):
    """{path: (size, mtime)} of every file in the checkout, those git ignores too (bytecode beside the sources, a
    planted module): the ledger, the harness's state folder, .git and virtual environments aside."""
    root, found = Path(root), {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if d not in (".git", STATE_DIR) and not (here / d / "pyvenv.cfg").exists()]
        for name in files:
            rel = str((here / name).relative_to(root))
            if not rel.startswith(LEDGER_NAME):
                info = (here / name).lstat()
                found[rel] = (info.st_size, info.st_mtime_ns)
    return found


@dataclass(frozen=True)
class EvaluationCrash:
    """An evaluation that raised in the harness instead of returning its result: the candidate's crash. What the
    scoring process answers comes from the candidate's graph (its batch size, its outputs), so a reply the harness's
    code did not expect is the program's failure, never an interruption of the harness: the row says crash with the
    reason, and the loop goes on. Read like the evaluator's own result (status, val_bpb, reason, seconds, log)."""
    reason: str
    seconds: float
    log: str
    status: str = "crash"
    val_bpb: float | None = None

    @classmethod
    def of(cls, error, seconds):
        frames = traceback.extract_tb(error.__traceback__)
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
        what = " ".join(str(error).split())[:300] or "no message"
        reason = f"the harness's evaluation raised {type(error).__name__}: {what}{where}"
        return cls(reason, seconds, "".join(traceback.format_exception(error)))


@dataclass(frozen=True)
class Guard:
    """What one run of train_and_evaluate is held to beside its budget."""
    check: object = None  # check(result) -> (status, reason) or None, after training, before evaluation
    compiled: Path | None = None  # the run's copy of its compile cache (kernels.checkout)
    scoring: float | None = None  # seconds the evaluator may score for once its model is built


def train_and_evaluate(run, seed=None, on_line=None, guard=Guard()):
    """Train run.root's train.py once on the trainer's view of the cache, then score its checkpoint in the
    harness's evaluator, unless guard.check(result) returns (status, reason) first. Returns (result, evaluation or
    None, stop)."""
    root, backend = run.root, run.backend
    # in the cache, which no agent's turn sees (a swarm trains while other workers' agents work)
    checkpoint = kernels.run_folder("checkpoint")
    try:
        env = dict(os.environ, AUTORESEARCH_CACHE=str(prepare.trainer_view()), AUTORESEARCH_CHECKPOINT=str(checkpoint))
        if guard.compiled:
            env[COMPILE_CACHE_ENV] = str(guard.compiled)
        result = run_training(backend, budget=run.budget, seed=seed, root=root, on_line=on_line,
                              timeout=run.hard_limit, env=env)
        stop = guard.check(result) if guard.check else None
        if stop:
            return result, None, stop
        if not result.ok:
            full = out_of_space(result, checkpoint)
            if full:
                raise DiskFull(full)
            why = "timeout" if result.timed_out else f"exit {result.returncode}" if result.returncode else "no summary"
            return result, None, ("crash", why)
        started = time.time()
        try:
            ev = evaluate(backend, root, checkpoint, timeout=run.hard_limit, on_line=on_line, scoring=guard.scoring)
        except Interrupted:  # SIGTERM or SIGHUP of the harness: the command stops, as for Ctrl-C
            raise
        except prepare.PrepareError as e:  # the validation rows unreadable: the cache's fault, as check_cache says
            raise CacheBroken(str(e)) from None
        except Exception as e:  # whatever else the candidate's graph made the harness's code raise
            ev = EvaluationCrash.of(e, time.time() - started)
            if on_line:
                on_line(f"evaluation: crash in {ev.seconds:.1f}s: {ev.reason}")
        return result, ev, None
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)


def out_of_space(result, checkpoint):
    """Why a failed run is the disk's fault, or None: its output's tail says a write found no space, and the disk
    it wrote its checkpoint to has less than NO_SPACE_FREE free, counting what its checkpoint folder holds as free
    (a train.py that prints the words on a roomy disk, or fills the disk itself, is the candidate's crash)."""
    said = NO_SPACE.search(result.tail())
    if not said:
        return None
    free = shutil.disk_usage(checkpoint).free
    own = sum(f.lstat().st_blocks * 512 for f in checkpoint.rglob("*"))  # what train.py itself took of the disk
    if free + own >= NO_SPACE_FREE:
        return None
    return (f"train.py failed for want of disk space ({said.group(0)}): {free / 2**20:.1f} MiB free on the disk of "
            f"{checkpoint.parent}, where its checkpoint is written; nothing recorded: free some space and run again")


def measure(branch, seed, on_line=None, warm=None):
    """Train HEAD's train.py once, check what it touched and how long it trained, evaluate it in a fresh process.
    warm: the compile-cache folder of an earlier seed of the same baseline, to start from (kernels.copy_of)."""
    root = branch.root
    watch = Watch(branch)
    clock = branch.clock()

    def check(result):
        broken = watch.violations()
        if broken:
            return "invalid", "train.py changed the repository: " + "; ".join(broken)
        late = clock.judge(result) if result.ok else None
        return ("invalid", late) if late else None

    with CappedLog(state_dir(root) / "run.log") as log:  # a flood of output keeps its first and last megabytes
        def line(text):
            log.write(text)
            if on_line:
                on_line(text)

        line(f"=== {branch.backend} seed {seed} budget {branch.budget:g}s ===")
        program = kernels.program_key(train_file(branch.backend, root).read_text())
        compiled = None if not sandbox.active().confined else kernels.copy_of(warm) if warm else \
            kernels.checkout(branch.name, program)
        try:
            result, ev, stop = train_and_evaluate(branch.run, seed, line, Guard(check, compiled, clock.evaluation))
        except BaseException:
            kernels.discard(compiled)
            raise
    timing = Timing.of(result)
    if stop:
        (state_dir(root) / "last_crash.log").write_text(result.tail() + "\n")
        return Measurement(stop[0], 0.0, result.summary or {}, timing, stop[1], compiled)
    timing = replace(timing, evaluation=ev.seconds)
    if ev.status != "ok":
        (state_dir(root) / "last_crash.log").write_text(ev.log[-20000:] + "\n")
        return Measurement(ev.status, 0.0, result.summary, timing, f"evaluation: {ev.reason}", compiled)
    return Measurement("ok", ev.val_bpb, result.summary, timing, "", compiled, holdout_bpb=ev.holdout_bpb)


def manual_run(run, on_line=None):
    """`autoresearch --backend B`: one training run and the harness's evaluation, no branch, no row.
    Returns (status, closing line)."""
    compiled = kernels.checkout("manual runs") if sandbox.active().confined else None
    try:
        result, ev, stop = train_and_evaluate(run, on_line=on_line, guard=Guard(compiled=compiled))
        if compiled and not stop and ev.status == "ok":
            kernels.promote("manual runs", compiled)  # the user's own runs, one after another
    finally:
        kernels.discard(compiled)
    if stop:
        return stop[0], f"training {stop[0]}: {stop[1]}"
    if ev.status != "ok":
        return ev.status, f"evaluation {ev.status}: {ev.reason}"
    late = Clock.for_baseline(run.budget, None).judge(result)
    measured = result.measured_training()
    timing = (f"harness-timed training {measured[0]:.1f}s" if measured else "untimed") + (
        f"; not scorable: {late}" if late else "")
    return ("invalid" if late else "ok"), f"val_bpb:          {ev.val_bpb:.6f}  ({timing}; evaluated by the harness)"


# ---------------------------------------------------------------------------
# Rows and decisions
# ---------------------------------------------------------------------------


def make_row(branch, runs, status, commit, description, source):
    """The ledger row of a program's runs (several seeds where the gate asked for them)."""
    good = [m.val_bpb for m in runs if m.status == "ok"]
    scored = status in SCORED
    held = [m.holdout_bpb for m in runs if m.status == "ok"]
    holdout = statistics.fmean(held) if scored and held and None not in held else 0.0
    s = runs[-1].summary or {}
    tokens = s.get("total_tokens_M", 0.0) * 1e6  # a huge count overflows to inf: a number the row cannot hold
    return Row(
        commit=commit, val_bpb=statistics.fmean(good) if scored else 0.0,
        memory_gb=round(s.get("peak_vram_mb", 0.0) / 1024, 1), status=status, description=description,
        hardware=branch.hardware, backend=branch.backend, eval_profile=branch.profile, budget=branch.budget,
        seed=branch.run.seed, timestamp=now(), training_seconds=s.get("training_seconds", 0.0),
        num_steps=s.get("num_steps", 0), num_params_M=s.get("num_params_M", 0.0),
        tokens=int(round(tokens)) if math.isfinite(tokens) else MISSING_NUMBER, config=branch.config() or "-",
        gate=branch.run.gate.label(), train_hash=train_hash(source), branch=branch.name,
        samples=",".join(f"{v:.6f}" for v in good) if scored else "-",
        harness_seconds=round(runs[-1].timing.training, 1), pin=pin_of(branch.repo, commit),
        sandbox=runs[-1].timing.sandbox, startup_seconds=round(max(m.timing.startup for m in runs), 2),
        step_seconds=round(max(m.timing.step for m in runs), 3),
        eval_seconds=round(max(m.timing.evaluation for m in runs), 2), holdout_bpb=round(holdout, 6),
        params=block_json(source),
    )


def run_seeds(branch, runs, best, on_line, baseline=False):
    """Up to `runs` seeds of HEAD, stopping at the first failure or when the gate has decided. An experiment's seed
    that the machine slowed runs once more (again_if_slowed)."""
    measurements, decision = [], None
    for i in range(runs):
        # A baseline's later seeds start from its first seed's kernels: its own program's. A candidate's seeds each
        # start from the baseline's: what one seed of an agent's program left must not reach the next.
        warm = measurements[0].compiled if baseline and measurements else None
        m = measure(branch, branch.run.seed + i, on_line, warm)
        if best is not None:
            m = again_if_slowed(branch, (branch.run.seed + i, m), typical_rate(branch, m.summary), on_line)
        measurements.append(m)
        if m.status != "ok":
            break
        if best is not None:
            decision = decide(branch.run.gate, [x.val_bpb for x in measurements], best.values(), branch.noise())
            if not decision.more:
                break
    return measurements, decision


def again_if_slowed(branch, seeded, typical, on_line):
    """seeded: (seed, its measurement). A seed that trained far slower than typical (gate.judge_pace) was slowed by
    the machine, not by its program: it is said in one line and run once more, and the second run counts in its
    place, marked `slowed` where it is slow too. Once only, so a program that is slow by itself (a larger batch of
    the same model) costs one extra run, and is then judged at its own speed."""
    seed, m = seeded
    pace = judge_pace(throughput(m.summary), typical)
    if m.status != "ok" or not pace.slowed:
        return m
    branch.say(f"seed {seed} slowed by the machine: {pace.reason}; running it again")
    kernels.discard(m.compiled)
    again = measure(branch, seed, on_line)
    rerun = f"seed {seed} slowed by the machine ({pace.reason}), run again"
    second = judge_pace(throughput(again.summary), typical)
    if again.status == "ok" and second.slowed:
        branch.say(f"seed {seed} slowed again: {second.reason}")
        return replace(again, rerun=rerun + f": slowed again, {second.reason}", slowed=second.reason)
    return replace(again, rerun=rerun + (f": {second.reason}" if again.status == "ok" else f": {again.status}"))


def credited(runs):
    """A baseline's seeds, each credited the cold startup recorded with the kernels it started from: the clock
    gives candidates twice the baseline's startup, and an honest one that compiles new shapes starts cold."""
    cold = max((kernels.cold_startup(m.compiled) for m in runs if m.compiled), default=0.0)
    return [replace(m, timing=replace(m.timing, startup=max(m.timing.startup, cold))) for m in runs]


def baseline_seeds(branch, runs, on_line):
    """setup's seeds after they all ran: each one slowed by the machine against the fastest of them runs once more;
    those still slowed are marked, and _decide leaves them out of the baseline and its noise floor."""
    if len(runs) < 2 or any(m.status != "ok" for m in runs):
        return runs
    typical = max((throughput(m.summary) or 0.0) for m in runs)
    runs = [again_if_slowed(branch, (branch.run.seed + i, m), typical, on_line) for i, m in enumerate(runs)]
    failed = [m for m in runs if m.status != "ok"]
    if failed:  # a seed's second run crashed: the baseline failed (its last run is the one _decide reads)
        return [m for m in runs if m.status == "ok"] + failed
    typical = max((throughput(m.summary) or 0.0) for m in runs)  # a second run may be the fastest yet
    marked = []
    for i, m in enumerate(runs):
        pace = judge_pace(throughput(m.summary), typical)
        marked.append(replace(m, slowed=pace.reason) if pace.slowed else replace(m, slowed=""))
        if pace.slowed and not m.slowed:
            branch.say(f"seed {branch.run.seed + i} slowed by the machine: {pace.reason}")
    return marked


def train_and_record(branch, description, base, commit, on_line=None, baseline_runs=0):
    """Train the committed train.py, keep it or reset to base, append the row. baseline_runs > 0: the baseline,
    run with that many seeds, whose spread becomes the noise floor."""
    (state_dir(branch.root) / "run.log").write_text("")
    best = None if baseline_runs else branch.best()
    source = train_file(branch.backend, branch.root).read_text()
    try:
        runs, decision = run_seeds(branch, baseline_runs or branch.run.gate.most_runs(), best, on_line,
                                   baseline=bool(baseline_runs))
        if baseline_runs:
            runs = credited(baseline_seeds(branch, runs, on_line))
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: nothing measured, the branch back at base
        if not baseline_runs:
            branch.say(branch.interrupted(commit, base))
        raise
    try:
        trial = Trial(branch, description, base, commit, baseline_runs, source, best)
        outcome = _decide(trial, runs, decision)
        # Only a baseline's kernels carry on: the project's own code compiled them. A candidate's folder is the
        # agent's to write, and promoted it would carry whatever train.py left there into the next experiments.
        if outcome.status == "keep" and baseline_runs and runs[-1].compiled:
            cold = max(m.timing.startup for m in runs)
            kernels.promote(branch.name, runs[-1].compiled, cold=cold)  # the branch's runs start from them
            kernels.promote(kernels.program_key(source), runs[-1].compiled, cold=cold)  # and its program's
        return outcome
    finally:
        for m in runs:
            kernels.discard(m.compiled)


@dataclass(frozen=True)
class Trial:
    """What train_and_record measured a program for."""
    branch: RunBranch
    description: str
    base: object  # the commit to go back to where not kept
    commit: object  # the experiment's commit
    baseline_runs: int
    source: str  # train.py as committed
    best: Row | None


def _decide(trial, runs, decision):
    """train_and_record's second half: the status, the branch reset where not kept, the row."""
    branch, description, base, commit = trial.branch, trial.description, trial.base, trial.commit
    baseline_runs, source, best = trial.baseline_runs, trial.source, trial.best
    short = commit.hexsha[:7]
    last = runs[-1]
    if baseline_runs and last.status != "ok":  # nothing measured to beat: no row, and setup removes its branch
        raise SetupFailed(f"the baseline is {last.status} ({last.reason}); log tail in {STATE_DIR}/last_crash.log",
                          last.status)
    # setup's seeds that the machine slowed say nothing of the program's spread: left out of the baseline (the
    # fastest seed is never slowed, so one stays); an experiment's second run counts, slowed or not
    left_out = [(branch.run.seed + i, m.slowed) for i, m in enumerate(runs) if baseline_runs and m.slowed]
    runs = [m for m in runs if not (baseline_runs and m.slowed)]
    samples = [m.val_bpb for m in runs if m.status == "ok"]
    if last.status != "ok":
        status = last.status
        message = f"RESULT {status} ({last.reason}); log tail in {STATE_DIR}/last_crash.log"
        if status == "invalid":
            description = f"{description} [invalid: {last.reason}]"
    elif baseline_runs or best is None:
        status = "keep"
        message = f"RESULT keep val_bpb={statistics.fmean(samples):.6f} (baseline"
        slow = "; ".join(f"seed {seed} slowed by the machine, {why}" for seed, why in left_out)
        if baseline_runs and len(samples) > 1:
            save_noise(branch.root, *branch.key()[1:4], samples, short)
            harness_record.save(branch.root)
            message += f", noise floor: spread {spread(samples):.6f} over {len(samples)} seeds"
            message += f" (left out: {slow})" if slow else ""
        elif left_out:
            earlier = load_noise(branch.root, *branch.key()[1:4])
            then = (f"the one measured before (spread {earlier['spread']:.6f}, commit {earlier['commit']}) stays"
                    if earlier else "the noise gate keeps any gain until setup runs again on a quiet machine")
            message += (f"; noise floor unreliable, not recorded: only {len(samples)} of {len(samples) + len(left_out)}"
                        f" seeds ran at the machine's typical speed ({slow}); {then}")
        message += ")"
    else:
        status = "keep" if decision.keep else "discard"
        message = (f"RESULT {status} val_bpb={statistics.fmean(samples):.6f} [{branch.run.gate.label()}: "
                   f"{decision.reason}]")
    if not baseline_runs:
        reruns = [m.rerun for m in runs if m.rerun]
        message += "".join(f" [{r}]" for r in reruns)
        slowed = next((m.slowed for m in runs if m.slowed), None)
        if slowed:  # judged at a speed the machine may have imposed: a discard of it is not a repeat
            description = f"{description} {SLOWED_MARK} {slowed}]"
    if status == "keep":
        message += f" (harness-timed training {last.timing.training:.1f}s)"
    elif not baseline_runs:
        branch.repo.head.reset(base, index=True, working_tree=True)
        message += f"; reverted to {base.hexsha[:7]}"
    row = make_row(branch, runs, status, short, description, source)
    try:
        record(branch.repo, row, commit)
    except LedgerError:  # a full disk: no row, so no keep either
        if status == "keep" and not baseline_runs:
            branch.repo.head.reset(base, index=True, working_tree=True)
        raise
    return Outcome(status, row, best, message + f" commit={short}")


# ---------------------------------------------------------------------------
# Commands: setup, run, verify
# ---------------------------------------------------------------------------


def setup(run, tag, noise_runs=3, calibrate=False, force_calibration=False, on_line=None, say=None):
    """Create the run branch autoresearch/<tag>-<hardware> from the current branch, commit the calibrated
    hyperparameters for this hardware (measured once per hardware, then cached), and record the baseline,
    run with noise_runs seeds to measure the run-to-run spread the noise and seeds gates use. Its row pins the
    fixed half of the repository. Interrupted, it removes the branch it created."""
    root, backend = run.root, run.backend
    if noise_runs < 1:
        raise ValueError(f"--noise-runs must be at least 1, got {noise_runs}")
    repo = open_repo(root)
    refuse_dirty(repo)
    check_cache()
    name = run_branch_name(tag, hardware_tag(backend))
    try:
        repo.git.check_ref_format("--branch", name)
    except git.GitCommandError:
        raise Refused(f"--tag {tag!r} does not make a valid branch name") from None
    if name in repo.heads:
        raise Refused(f"branch {name} already exists: choose another --tag, or check it out and use `autoresearch run`")
    with Lock(root, "setup"):
        origin = repo.head.commit if repo.head.is_detached else repo.active_branch
        repo.create_head(name).checkout()
        branch = RunBranch(repo, run, say or print)
        try:
            if calibrate:
                branch.calibrated = apply_calibration(branch, force_calibration, on_line)
            head = repo.head.commit
            outcome = train_and_record(branch, "baseline", head, head, on_line, baseline_runs=noise_runs)
            harness_record.pin(root, name, outcome.row.pin)  # the fixed half later commands are checked against
            return outcome
        except BaseException as e:  # no baseline, calibration failed, a signal, a full disk: no half-made branch
            if not any(r.branch == name and r.status == "keep" and r.description == "baseline"
                       for r in branch.rows()):
                repo.head.reset(index=True, working_tree=True)
                back = origin.hexsha[:7] if isinstance(origin, git.Commit) else origin.name
                repo.git.checkout(origin.hexsha if isinstance(origin, git.Commit) else origin.name)
                repo.delete_head(name, force=True)
                if isinstance(e, SetupFailed):
                    raise SetupFailed(f"setup failed: {e}; branch {name} removed, back on {back}, nothing recorded: "
                                      f"fix train.py or give it a larger --budget or --timeout, then run setup again",
                                      e.status) from None
                branch.say(f"setup stopped before its baseline was recorded: branch {name} removed")
            raise


def apply_calibration(branch, force, on_line):
    """Write this hardware's calibrated sizes into train.py as the run branch's first commit."""
    root = branch.root
    result, cached = calibrate(branch.backend, root=root, force=force, budget=branch.budget, on_line=on_line)
    say = on_line or (lambda text: None)
    say(f"calibration ({'cached' if cached else 'measured'}): {result.config()} — {result.reason}")
    path = train_file(branch.backend, root)
    path.write_text(set_constants(path.read_text(), result.choice))
    if changed_files(branch.repo):
        branch.repo.index.add([str(path.relative_to(root))])
        branch.repo.index.commit(f"calibrate {result.hardware}: {result.config()}", skip_hooks=True)
    return result.config()


def check_candidate(repo, backend):
    """Only backends/<backend>/train.py changed; else Refused."""
    target = f"backends/{backend}/train.py"
    changed = changed_files(repo)
    others = [f for f in changed if f != target]
    if others:
        raise Refused(f"only {target} may change, but so did: {', '.join(others)} (revert them: "
                      f"git checkout -- FILE, or delete new files)")
    if target not in changed:
        raise Refused(f"{target} is unchanged: edit it, then run again")
    path = Path(repo.working_tree_dir) / target
    size = path.stat().st_size if path.exists() else 0
    if size > MAX_TRAIN_BYTES:
        raise Refused(f"{target} is {size:,} bytes, over the {MAX_TRAIN_BYTES:,} a train.py may be (upstream's is "
                      "about 25,000)")
    return target


def find_repeat(branch):
    """The row of this run whose train.py is the same program as the edited one, or None. A run the harness
    caught (invalid) or lost with its swarm worker says nothing about the idea and is not a repeat, nor does a
    discard of a run the machine slowed even on its second try."""
    digest = train_hash(train_file(branch.backend, branch.root).read_text())
    same = [r for r in branch.rows() if r.key() == branch.key() and r.train_hash == digest
            and r.status not in UNJUDGED and not (r.status == "discard" and SLOWED_MARK in r.description)]
    return same[-1] if same else None


def experiment(branch, description, on_line=None, claim=None):
    """Commit the edited train.py, train it, keep it or reset to the last keep. A program already in the
    ledger is not run again: the answer comes from the ledger and the edit is undone. claim(train_hash), in a
    swarm: None once the program is this worker's to run, else where the same program ran or runs."""
    target = check_candidate(branch.repo, branch.backend)
    branch.check_record()  # an agent's turn ran since the last decision: the ledger and noise floor as we left them
    # from an agent or a command line (-m): one printable line, so the commit, the row and its note can hold it
    description = one_line(description, MAX_DESCRIPTION_CHARS) or "(no description)"
    repeat = find_repeat(branch)
    if repeat:
        branch.repo.git.checkout("HEAD", "--", target)
        val = f"val_bpb={repeat.val_bpb:.6f}" if repeat.status in ("keep", "discard") else repeat.status
        return Outcome("repeat", repeat, None, f"RESULT repeat: the same program as commit {repeat.commit} "
                       f"({repeat.status}, {val}, \"{repeat.description}\"); not run again, edit undone")
    elsewhere = claim(train_hash(train_file(branch.backend, branch.root).read_text())) if claim else None
    if elsewhere:
        branch.repo.git.checkout("HEAD", "--", target)
        return Outcome("repeat", None, None, f"RESULT repeat: the same program {elsewhere}; not run again, edit undone")
    base = branch.repo.head.commit
    branch.repo.index.add([target])
    commit = branch.repo.index.commit(description, skip_hooks=True)
    return train_and_record(branch, description, base, commit, on_line)


def run_experiment(run, description, on_line=None, say=None):
    """`autoresearch run`: one experiment on the checked-out run branch, under the checkout's lock."""
    check_cache()
    with open_branch(run, "run", say) as branch:
        return experiment(branch, description, on_line)


def verify(run, runs=3, on_line=None, say=None):
    """Re-run the branch's current best with fresh seeds (run.seed onwards); say whether its recorded val_bpb holds.
    The noise floor is allowed run.gate.k times."""
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    check_cache()
    backend, budget, gate = run.backend, run.budget, run.gate
    with open_branch(run, "verify", say) as branch:
        refuse_dirty(branch.repo)
        best = branch.best()
        if best is None:
            raise Refused(f"nothing kept yet on {branch.name} for {backend} at budget {budget:g}s")
        if not branch.repo.head.commit.hexsha.startswith(best.commit):
            raise Refused(f"HEAD is not the best kept commit {best.commit}: check it out first")
        measurements = []
        try:
            for i in range(runs):
                measurements.append(measure(branch, run.seed + i, on_line))
                if measurements[-1].status != "ok":  # says nothing about the recorded value: no row
                    last = measurements[-1]
                    return Outcome(last.status, None, best, f"VERIFY {last.status}: {last.reason}")
        finally:
            for m in measurements:
                kernels.discard(m.compiled)
        samples = [m.val_bpb for m in measurements]
        sigma = branch.noise()
        regression = statistics.fmean(samples) - best.val_bpb
        allowed = gate.k * sigma if sigma is not None else 0.0
        status = "holds" if regression <= allowed else "regressed"
        message = (f"VERIFY {status}: recorded {best.val_bpb:.6f}, re-run mean {statistics.fmean(samples):.6f} "
                   f"(n={len(samples)}), regression {regression:+.6f}, allowed {allowed:.6f}"
                   + (f" ({gate.k:g} x spread {sigma:.6f})" if sigma is not None else " (no noise floor)"))
        row = make_row(branch, measurements, "verify", best.commit, f"verify {best.commit}: {best.description}",
                       train_file(backend, branch.root).read_text())
        if best.holdout_bpb and row.holdout_bpb:  # the holdout the keep was never selected on, both times
            message += (f"; holdout: recorded {best.holdout_bpb:.6f}, re-run {row.holdout_bpb:.6f} (selected on "
                        f"val_bpb {best.val_bpb:.6f}: {best.holdout_bpb - best.val_bpb:+.6f} apart)")
        record(branch.repo, row, branch.repo.head.commit)
        return Outcome(status, row, best, message)
