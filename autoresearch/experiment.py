"""One experiment: check the edit, commit it, train, compare like with like, keep or reset, log a row."""

import ast
import hashlib
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import git

from . import train_file
from .gate import Gate, decide, load_noise, save_noise, spread
from .hardware import hardware_tag
from .hparams import set_constants
from .ledger import LEDGER_NAME, NOTES_REF, Row, append_row, best_kept, format_row, now, read_ledger
from .runner import run_training

STATE_DIR = ".autoresearch"  # untracked: run.log, last_crash.log, the agent's description
BRANCH_PREFIX = "autoresearch/"
EXIT = {"keep": 0, "holds": 0, "error": 1, "refused": 2, "discard": 3, "regressed": 3, "crash": 4, "repeat": 5}


class Refused(Exception):
    """The experiment was not run; nothing changed. The message says why and what to do."""


@dataclass
class Outcome:
    status: str
    row: Row
    best_before: Row | None
    message: str  # the one closing line


def train_hash(source):
    """Hash of train.py with comments and formatting ignored, so a re-indented copy is the same."""
    try:
        canon = ast.dump(ast.parse(source))
    except SyntaxError:
        canon = source
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def open_repo(root):
    """The checkout's repository, with the ledger and state folder excluded from git whatever .gitignore says."""
    try:
        repo = git.Repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise Refused(f"{root} is not a git repository") from None
    exclude = Path(repo.git_dir) / "info" / "exclude"
    present = exclude.read_text().splitlines() if exclude.exists() else []
    missing = [p for p in (f"/{LEDGER_NAME}", f"/{STATE_DIR}/") if p not in present]
    if missing:
        exclude.parent.mkdir(exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        exclude.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "".join(f"{p}\n" for p in missing))
    return repo


def run_branch(tag, backend):
    return f"{BRANCH_PREFIX}{tag}-{hardware_tag(backend)}"


def changed_files(repo):
    """Tracked files that differ from HEAD (staged or not) and untracked files git does not ignore."""
    changed = {d.a_path for d in repo.index.diff(None)} | {d.a_path for d in repo.index.diff("HEAD")}
    return sorted(changed | set(repo.untracked_files))


def state_dir(root):
    path = Path(root) / STATE_DIR
    path.mkdir(exist_ok=True)
    return path


def record(repo, row, commit):
    """Append the row to results.tsv, and to the commit's git note (refs/notes/autoresearch), so a run
    branch carries its own ledger to other machines: `git push origin refs/notes/autoresearch`."""
    append_row(Path(repo.working_tree_dir) / LEDGER_NAME, row)
    reader = repo.config_reader()
    named = reader.has_option("user", "name") and reader.has_option("user", "email")
    who = {} if named else {f"GIT_{r}_{k}": v for r in ("AUTHOR", "COMMITTER")
                            for k, v in (("NAME", "autoresearch"), ("EMAIL", "autoresearch@localhost"))}
    with repo.git.custom_environment(**who):
        repo.git.notes("--ref", NOTES_REF, "append", "-m", format_row(row).rstrip("\n"), commit.hexsha)


def _row(results, samples, status, commit, description, backend, budget, seed, branch, config, gate, source):
    s = (results[-1].summary or {}) if status != "crash" else {}
    return Row(
        commit=commit, val_bpb=statistics.fmean(samples) if status != "crash" else 0.0,
        memory_gb=round(s.get("peak_vram_mb", 0.0) / 1024, 1), status=status,
        description=description, hardware=hardware_tag(backend), backend=backend,
        eval_profile=_profile_name(), budget=float(budget), seed=int(seed),
        timestamp=now(), training_seconds=s.get("training_seconds", 0.0), num_steps=s.get("num_steps", 0),
        num_params_M=s.get("num_params_M", 0.0), tokens=int(round(s.get("total_tokens_M", 0.0) * 1e6)),
        config=config or "-", gate=gate, train_hash=train_hash(source), branch=branch,
        samples=",".join(f"{v:.6f}" for v in samples) if status != "crash" else "-",
    )


def _profile_name():
    import prepare

    return prepare.load_profile().name


def _budget(budget):
    import prepare

    if budget is not None:
        return float(budget)
    return prepare.time_budget()


def _train(root, backend, budget, seed, timeout, on_line):
    """One training run; its output goes to .autoresearch/run.log (appended per seed) and to on_line."""
    with open(state_dir(root) / "run.log", "a") as log:
        def line(text):
            log.write(text + "\n")
            log.flush()
            if on_line:
                on_line(text)

        line(f"=== {backend} seed {seed} budget {budget:g}s ===")
        result = run_training(backend, budget=budget, seed=seed, timeout=timeout, root=root, on_line=line)
    if not result.ok or not math.isfinite(result.summary["val_bpb"]):
        crash_log = state_dir(root) / "last_crash.log"
        crash_log.write_text(result.tail() + "\n")
    return result


def _crash_reason(result):
    why = "timeout" if result.timed_out else f"exit {result.returncode}" if result.returncode else "no summary"
    return f"RESULT crash ({why}); log tail in {STATE_DIR}/last_crash.log"


def _ok(result):
    return result.ok and math.isfinite(result.summary["val_bpb"])


def train_and_record(repo, backend, description, base, commit, budget=None, seed=42, timeout=None,
                     on_line=None, config=None, gate=Gate("greedy"), baseline=False, noise_runs=1):
    """Train the committed train.py (several seeds where the gate asks), keep or reset to base, append the row."""
    root = Path(repo.working_tree_dir)
    budget = _budget(budget)
    branch = repo.active_branch.name
    source = train_file(backend, root).read_text()
    (state_dir(root) / "run.log").write_text("")
    key = (branch, hardware_tag(backend), _profile_name(), budget)
    best = None if baseline else best_kept(read_ledger(root / LEDGER_NAME), key)
    noise = load_noise(root, *key[1:])
    sigma = noise["spread"] if noise else None
    runs = noise_runs if baseline else (gate.seeds if gate.kind == "seeds" else 1)
    results, samples, decision = [], [], None
    try:
        for i in range(runs):
            result = _train(root, backend, budget, seed + i, timeout, on_line)
            results.append(result)
            if not _ok(result):
                break
            samples.append(result.summary["val_bpb"])
            if best is not None:
                decision = decide(gate, samples, best.values(), sigma)
                if not decision.more:
                    break
    except KeyboardInterrupt:
        if not baseline:
            repo.head.reset(base, index=True, working_tree=True)
        raise
    short = commit.hexsha[:7]
    if not _ok(results[-1]):
        status, message = "crash", _crash_reason(results[-1])
    elif baseline or best is None:
        status = "keep"
        message = f"RESULT keep val_bpb={statistics.fmean(samples):.6f} (baseline"
        if baseline and len(samples) > 1:
            save_noise(root, *key[1:], samples, short)
            message += f", noise floor: spread {spread(samples):.6f} over {len(samples)} seeds"
        message += ")"
    else:
        status = "keep" if decision.keep else "discard"
        message = f"RESULT {status} val_bpb={statistics.fmean(samples):.6f} [{gate.label()}: {decision.reason}]"
    if status != "keep" and not baseline:
        repo.head.reset(base, index=True, working_tree=True)
        message += f"; reverted to {base.hexsha[:7]}"
    row = _row(results, samples, status, short, description, backend, budget, seed, branch, config,
               gate.label(), source)
    record(repo, row, commit)
    return Outcome(status, row, best, message + f" commit={short}")


def setup(root, tag, backend, budget=None, seed=42, timeout=None, on_line=None, noise_runs=3, gate=Gate(),
          calibrate=False, force_calibration=False):
    """Create the run branch autoresearch/<tag>-<hardware> from the current branch, commit the calibrated
    hyperparameters for this hardware (measured once per hardware, then cached), and record the baseline,
    run with noise_runs seeds to measure the run-to-run spread the noise and seeds gates use."""
    repo = open_repo(root)
    dirty = changed_files(repo)
    if dirty:
        raise Refused(f"working tree has uncommitted changes ({', '.join(dirty)}): commit or stash them first")
    name = run_branch(tag, backend)
    try:
        repo.git.check_ref_format("--branch", name)
    except git.GitCommandError:
        raise Refused(f"--tag {tag!r} does not make a valid branch name") from None
    if name in repo.heads:
        raise Refused(f"branch {name} already exists: choose another --tag, or check it out and use `autoresearch run`")
    repo.create_head(name).checkout()
    config = None
    if calibrate:
        config = apply_calibration(repo, backend, budget, force_calibration, on_line)
    head = repo.head.commit
    return train_and_record(repo, backend, "baseline", head, head, budget, seed, timeout, on_line, gate=gate,
                            baseline=True, noise_runs=max(1, noise_runs), config=config)


def apply_calibration(repo, backend, budget, force, on_line):
    """Write this hardware's calibrated sizes into train.py as the run branch's first commit."""
    from .calibrate import calibrate

    root = Path(repo.working_tree_dir)
    result, cached = calibrate(backend, root=root, force=force, budget=_budget(budget), on_line=on_line)
    say = on_line or (lambda text: None)
    say(f"calibration ({'cached' if cached else 'measured'}): {result.config()} — {result.reason}")
    path = train_file(backend, root)
    path.write_text(set_constants(path.read_text(), result.choice))
    if changed_files(repo):
        repo.index.add([str(path.relative_to(root))])
        repo.index.commit(f"calibrate {result.hardware}: {result.config()}")
    return result.config()


def branch_config(root, branch):
    """The calibrated config the run branch started from (its baseline row's), or None."""
    rows = [r for r in read_ledger(Path(root) / LEDGER_NAME) if r.branch == branch and r.description == "baseline"]
    return rows[0].config if rows and rows[0].config != "-" else None


def check_candidate(repo, backend):
    """The run branch is checked out and only backends/<backend>/train.py changed; else Refused."""
    if repo.head.is_detached or not repo.active_branch.name.startswith(BRANCH_PREFIX):
        raise Refused("not on a run branch: start one with `autoresearch setup --tag TAG --backend "
                      f"{backend}`, or check out an existing autoresearch/... branch")
    target = f"backends/{backend}/train.py"
    changed = changed_files(repo)
    others = [f for f in changed if f != target]
    if others:
        raise Refused(f"only {target} may change, but so did: {', '.join(others)} (revert them: "
                      f"git checkout -- FILE, or delete new files)")
    if target not in changed:
        raise Refused(f"{target} is unchanged: edit it, then run again")
    return target


def find_repeat(repo, backend, budget):
    """The ledger row of this run whose train.py is the same program as the edited one, or None."""
    root = Path(repo.working_tree_dir)
    digest = train_hash(train_file(backend, root).read_text())
    key = (repo.active_branch.name, hardware_tag(backend), _profile_name(), budget)
    same = [r for r in read_ledger(root / LEDGER_NAME) if r.key() == key and r.train_hash == digest]
    return same[-1] if same else None


def run_experiment(root, backend, description, budget=None, seed=42, timeout=None, on_line=None, gate=Gate()):
    """Commit the edited train.py, train it, keep it or reset to the last keep. A program already in the
    ledger is not run again: the answer comes from the ledger and the edit is undone."""
    repo = open_repo(root)
    target = check_candidate(repo, backend)
    budget = _budget(budget)
    description = " ".join(description.split()) or "(no description)"
    repeat = find_repeat(repo, backend, budget)
    if repeat:
        repo.git.checkout("HEAD", "--", target)
        val = f"val_bpb={repeat.val_bpb:.6f}" if repeat.status != "crash" else "crashed"
        return Outcome("repeat", repeat, None, f"RESULT repeat: the same program as commit {repeat.commit} "
                       f"({repeat.status}, {val}, \"{repeat.description}\"); not run again, edit undone")
    base = repo.head.commit
    repo.index.add([target])
    commit = repo.index.commit(description)
    return train_and_record(repo, backend, description, base, commit, budget, seed, timeout, on_line, gate=gate,
                            config=branch_config(root, repo.active_branch.name))


def verify(root, backend, runs=3, budget=None, seed=1000, timeout=None, on_line=None, gate=Gate()):
    """Re-run the branch's current best with fresh seeds; say whether its recorded val_bpb holds."""
    repo = open_repo(root)
    if repo.head.is_detached or not repo.active_branch.name.startswith(BRANCH_PREFIX):
        raise Refused("not on a run branch: check out the autoresearch/... branch to verify")
    dirty = changed_files(repo)
    if dirty:
        raise Refused(f"working tree has uncommitted changes ({', '.join(dirty)}): commit or stash them first")
    budget = _budget(budget)
    key = (repo.active_branch.name, hardware_tag(backend), _profile_name(), budget)
    best = best_kept(read_ledger(Path(root) / LEDGER_NAME), key)
    if best is None:
        raise Refused(f"nothing kept yet on {key[0]} for {backend} at budget {budget:g}s")
    if not repo.head.commit.hexsha.startswith(best.commit):
        raise Refused(f"HEAD is not the best kept commit {best.commit}: check it out first")
    results, samples = [], []
    for i in range(runs):
        results.append(_train(root, backend, budget, seed + i, timeout, on_line))
        if not _ok(results[-1]):
            break
        samples.append(results[-1].summary["val_bpb"])
    if len(samples) < runs:  # a re-run that crashes says nothing about the recorded value: no row
        return Outcome("crash", None, best, "VERIFY crash: " + _crash_reason(results[-1]))
    noise = load_noise(root, *key[1:])
    sigma = noise["spread"] if noise else None
    regression = statistics.fmean(samples) - best.val_bpb
    allowed = gate.k * sigma if sigma is not None else 0.0
    status = "holds" if regression <= allowed else "regressed"
    message = (f"VERIFY {status}: recorded {best.val_bpb:.6f}, re-run mean {statistics.fmean(samples):.6f} "
               f"(n={len(samples)}), regression {regression:+.6f}, allowed {allowed:.6f}"
               + (f" ({gate.k:g} x spread {sigma:.6f})" if sigma is not None else " (no noise floor)"))
    row = _row(results, samples, "verify", best.commit, f"verify {best.commit}: {best.description}", backend,
               budget, seed, key[0], best.config, gate.label(), train_file(backend, root).read_text())
    record(repo, row, repo.head.commit)
    return Outcome(status, row, best, message)
