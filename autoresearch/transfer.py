"""Transfer: replay the kept changes of another run branch as experiments on this one.

Each kept commit of the source branch after its baseline, oldest first: its diff of
backends/<its backend>/train.py (parent -> commit) is applied to this branch's train.py and run as an
ordinary experiment described "transfer <origin commit>: <origin description>", so the bench report
can put the outcome into the origin change's row of its findings matrix.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import git

from .branch import BRANCH_PREFIX, Refused, changed_files, open_branch, open_repo, refuse_dirty
from .experiment import check_cache, experiment
from .ledger import LEDGER_NAME, TRANSFER, Row, baseline_of, in_time_order, read_ledger
from .sources import ReportError, branch_rows


@dataclass
class Transferred:
    origin: str  # the change's origin commit (short), through earlier transfers
    description: str  # the origin change's description
    backend: str  # the backend the source commit changed
    source_commit: str  # the source branch's commit whose diff was replayed
    outcome: str  # keep, discard, crash, repeat, or "not applicable (...)"
    row: Row | None  # the recorded row, None when nothing ran
    message: str


def origin_of(row):
    """(origin commit, description) of a kept row; a transferred row points at its own origin."""
    m = TRANSFER.match(row.description)
    return m.groups() if m else (row.commit, row.description)


def source_keeps(repo, branch):
    """The kept rows of run branch `branch` after its baseline, oldest first, each with its full commit.
    Rows come from the branch's git notes, else from this checkout's results.tsv."""
    try:
        rows = branch_rows(repo, branch)
    except ReportError:
        try:
            repo.git.rev_parse("--verify", "--quiet", f"{branch}^{{commit}}")
        except git.GitCommandError:
            raise Refused(f"--from {branch}: no such branch") from None
        ledger = Path(repo.working_tree_dir) / LEDGER_NAME
        rows = in_time_order([r for r in read_ledger(ledger) if r.branch == branch])
    kept = [r for r in rows if r.status == "keep"]
    if not kept:
        raise Refused(f"--from {branch}: no kept experiments recorded for this branch (in refs/notes/autoresearch "
                      f"or {LEDGER_NAME})")
    base = baseline_of(kept, kept[0].branch)
    tip = repo.commit(branch)
    found = []
    for r in kept[kept.index(base) + 1:]:
        try:
            commit = repo.commit(r.commit)
        except (git.BadName, ValueError):
            continue
        if repo.is_ancestor(commit, tip):
            found.append((r, commit))
    return found


def target_budget(root):
    """The budget the checked-out run branch's baseline was measured with (results of other budgets would not
    compare with it), or None: transfer's default --budget."""
    repo = open_repo(root)
    if repo.head.is_detached:
        return None
    base = baseline_of(read_ledger(Path(root) / LEDGER_NAME), repo.active_branch.name)
    return base.budget if base else None


def _restore(repo):
    repo.head.reset("HEAD", index=True, working_tree=True)


def transfer(run, from_branch, on_line=None, on_result=None, say=None):
    """Replay from_branch's kept changes on the checked-out run branch; one Transferred per kept commit."""
    backend = run.backend
    repo = open_repo(run.root)
    if repo.head.is_detached or not repo.active_branch.name.startswith(BRANCH_PREFIX):
        raise Refused(f"not on a run branch: set one up with `autoresearch setup --tag TAG --backend {backend}` "
                      "and transfer into it")
    here = repo.active_branch.name
    if from_branch in (here, f"refs/heads/{here}"):
        raise Refused(f"--from {from_branch} is the branch checked out: transfer from another run branch")
    refuse_dirty(repo)
    keeps = source_keeps(repo, from_branch)
    check_cache()
    results = []

    def done(item):
        results.append(item)
        if on_result:
            on_result(item)

    if all(row.backend != backend for row, _ in keeps):  # nothing to run: no series to open
        for row, _ in keeps:
            done(_other_backend(row, backend))
        return results
    with open_branch(run, "transfer", say) as branch:
        for row, commit in keeps:
            done(_replay(branch, row, commit, on_line))
    return results


def _other_backend(row, backend):
    origin, description = origin_of(row)
    return Transferred(origin=origin, description=description, backend=row.backend, source_commit=row.commit,
                       outcome=f"not applicable (backend {row.backend})", row=None,
                       message=f"{row.commit} changed backends/{row.backend}/train.py, not {backend}'s")


def _replay(branch, row, commit, on_line):
    """One kept change of the source branch, applied here and run as an experiment."""
    repo, backend = branch.repo, branch.backend
    origin, description = origin_of(row)
    common = dict(origin=origin, description=description, backend=row.backend, source_commit=row.commit)
    if row.backend != backend:
        return _other_backend(row, backend)
    path = f"backends/{row.backend}/train.py"
    parent = commit.parents[0].hexsha if commit.parents else None
    if parent is None:
        return Transferred(**common, outcome="not applicable (no parent)", row=None, message="root commit")
    patch = repo.git.diff("--full-index", parent, commit.hexsha, "--", path)
    if not patch.strip():
        return Transferred(**common, outcome="not applicable (train.py unchanged)", row=None,
                           message=f"{row.commit} does not change {path}")
    with tempfile.NamedTemporaryFile("w", suffix=".patch", delete=False) as f:
        f.write(patch + "\n")
    try:
        repo.git.apply("--3way", f.name)
    except git.GitCommandError as e:
        _restore(repo)
        why = " ".join(str(e.stderr).split())[:200]
        return Transferred(**common, outcome="not applicable (conflict)", row=None,
                           message=f"{row.commit}'s diff does not apply here: {why}")
    finally:
        os.unlink(f.name)
    try:
        outcome = experiment(branch, f"transfer {origin}: {description}", on_line)
    except Refused as e:
        _restore(repo)
        return Transferred(**common, outcome="not applicable (no change here)", row=None, message=str(e))
    except BaseException:
        _restore(repo)  # interrupted between the patch and the commit: the patch is in the source branch
        raise
    if changed_files(repo):  # never leave a half-applied change behind
        _restore(repo)
    return Transferred(**common, outcome=outcome.status, row=outcome.row, message=outcome.message)
