"""One experiment: check the edit, commit it, train, compare like with like, keep or reset, log a row."""

import ast
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import git

from . import train_file
from .hardware import hardware_tag
from .ledger import LEDGER_NAME, Row, append_row, best_kept, now, read_ledger
from .runner import run_training

STATE_DIR = ".autoresearch"  # untracked: run.log, last_crash.log, the agent's description
BRANCH_PREFIX = "autoresearch/"
EXIT = {"keep": 0, "error": 1, "refused": 2, "discard": 3, "crash": 4}


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


def _row(result, status, commit, description, backend, budget, seed, branch, config, gate, source):
    s = result.summary or {}
    ok = status != "crash"
    return Row(
        commit=commit, val_bpb=s.get("val_bpb", 0.0) if ok else 0.0,
        memory_gb=round(s.get("peak_vram_mb", 0.0) / 1024, 1) if ok else 0.0, status=status,
        description=description, hardware=hardware_tag(backend), backend=backend,
        eval_profile=s.get("eval_profile") or _profile_name(), budget=float(budget), seed=int(seed),
        timestamp=now(), training_seconds=s.get("training_seconds", 0.0), num_steps=s.get("num_steps", 0),
        num_params_M=s.get("num_params_M", 0.0), tokens=int(s.get("total_tokens_M", 0.0) * 1e6),
        config=config or "-", gate=gate, train_hash=train_hash(source), branch=branch,
    )


def _profile_name():
    import prepare

    return prepare.load_profile().name


def _budget(budget):
    import prepare

    if budget is not None:
        return float(budget)
    return prepare.time_budget()


def train_and_record(repo, backend, description, base, commit, budget=None, seed=42, timeout=None,
                     on_line=None, config=None, gate="greedy", baseline=False):
    """Train the committed train.py; keep, or reset to base; append the ledger row; return the Outcome."""
    root = Path(repo.working_tree_dir)
    budget = _budget(budget)
    branch = repo.active_branch.name
    source = train_file(backend, root).read_text()
    log_path = state_dir(root) / "run.log"
    with open(log_path, "w") as log:
        def line(text):
            log.write(text + "\n")
            log.flush()
            if on_line:
                on_line(text)

        try:
            result = run_training(backend, budget=budget, seed=seed, timeout=timeout, root=root, on_line=line)
        except KeyboardInterrupt:
            if not baseline:
                repo.head.reset(base, index=True, working_tree=True)
            raise
    ledger = root / LEDGER_NAME
    rows = read_ledger(ledger)
    short = commit.hexsha[:7]
    if not result.ok or not math.isfinite(result.summary["val_bpb"]):
        status, best = "crash", None
        crash_log = state_dir(root) / "last_crash.log"
        crash_log.write_text(result.tail() + "\n")
        why = "timeout" if result.timed_out else f"exit {result.returncode}" if result.returncode else "no summary"
        message = f"RESULT crash ({why}); log tail in {STATE_DIR}/last_crash.log"
    else:
        row_key = (branch, hardware_tag(backend), result.summary["eval_profile"], budget)
        best = best_kept(rows, row_key)
        val = result.summary["val_bpb"]
        if baseline or best is None or val < best.val_bpb:
            status = "keep"
            message = f"RESULT keep val_bpb={val:.6f}" + (
                f" best_before={best.val_bpb:.6f} delta={val - best.val_bpb:+.6f}" if best else " (baseline)")
        else:
            status = "discard"
            message = f"RESULT discard val_bpb={val:.6f} best={best.val_bpb:.6f} delta={val - best.val_bpb:+.6f}"
    if status != "keep" and not baseline:
        repo.head.reset(base, index=True, working_tree=True)
        message += f"; reverted to {base.hexsha[:7]}"
    row = _row(result, status, short, description, backend, budget, seed, branch, config, gate, source)
    append_row(ledger, row)
    return Outcome(status, row, best, message + f" commit={short}")


def setup(root, tag, backend, budget=None, seed=42, timeout=None, on_line=None):
    """Create the run branch autoresearch/<tag>-<hardware> from the current branch and record the baseline."""
    repo = open_repo(root)
    if changed_files(repo):
        raise Refused(f"working tree has uncommitted changes ({', '.join(changed_files(repo))}): commit or stash them first")
    name = run_branch(tag, backend)
    try:
        repo.git.check_ref_format("--branch", name)
    except git.GitCommandError:
        raise Refused(f"--tag {tag!r} does not make a valid branch name") from None
    if name in repo.heads:
        raise Refused(f"branch {name} already exists: choose another --tag, or check it out and use `autoresearch run`")
    repo.create_head(name).checkout()
    head = repo.head.commit
    return train_and_record(repo, backend, "baseline", head, head, budget, seed, timeout, on_line, baseline=True)


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


def run_experiment(root, backend, description, budget=None, seed=42, timeout=None, on_line=None):
    """Commit the edited train.py, train it, keep it or reset to the last keep."""
    repo = open_repo(root)
    target = check_candidate(repo, backend)
    description = " ".join(description.split()) or "(no description)"
    base = repo.head.commit
    repo.index.add([target])
    commit = repo.index.commit(description)
    return train_and_record(repo, backend, description, base, commit, budget, seed, timeout, on_line)
