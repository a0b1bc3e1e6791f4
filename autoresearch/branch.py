"""The run branch: the aggregate the harness protects. One object knows its key, its best, its noise floor
and its pin, holds the checkout's lock while a command works on it, and puts it back at its last kept
commit before anything is compared."""

import fcntl
import hashlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import git

from . import BACKENDS, record
from .clock import Clock
from .gate import load_noise
from .hardware import available_backends, hardware_tag
from .ledger import LEDGER_NAME, baseline_of, best_kept, read_ledger, restore_missing
from .runner import STATE_DIR, stop_leftover
from .settings import Run

BRANCH_PREFIX = "autoresearch/"
LOCK_FILE = "lock"
STRAY_REFS = "refs/autoresearch/stray/"  # commits found on a run branch that no row kept
INTERRUPTED_REFS = "refs/autoresearch/interrupted/"  # experiments stopped before they were measured
TRAIN_FILES = ("backends/cuda/train.py", "backends/mps/train.py", "backends/mlx/train.py")


class Refused(Exception):
    """The command was not run; nothing changed. The message says why and what to do."""


# Every git command the harness runs: no hooks, no fsmonitor, no attributes file of the user's, no pager. What a
# train.py or an agent wrote into the repository's configuration never runs as the referee.
GIT_OPTIONS = ["core.hooksPath=/dev/null", "core.fsmonitor=false", "core.attributesFile=/dev/null",
               "core.pager=cat", "core.untrackedCache=false"]


def harness_repo(root):
    """git.Repo(root) with the harness's git options on every command it runs."""
    repo = git.Repo(root)
    repo.git.set_persistent_git_options(c=GIT_OPTIONS)
    return repo


def open_repo(root):
    """The checkout's repository, with the ledger (and its .torn, .bak, .tmp) and state folder excluded from git
    whatever .gitignore says."""
    try:
        repo = harness_repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise Refused(f"{root} is not a git repository") from None
    exclude = Path(repo.git_dir) / "info" / "exclude"
    present = exclude.read_text().splitlines() if exclude.exists() else []
    missing = [p for p in (f"/{LEDGER_NAME}*", f"/{STATE_DIR}/") if p not in present]
    if missing:
        exclude.parent.mkdir(exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        exclude.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "".join(f"{p}\n" for p in missing))
    return repo


def branch_backend(root):
    """The backend of the run branch checked out at root (its name ends in that backend's hardware tag here), or
    None: `auto` on a run branch means the backend it was set up with."""
    try:
        repo = harness_repo(root)
        name = "" if repo.head.is_detached else repo.active_branch.name
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    if not name.startswith(BRANCH_PREFIX):
        return None
    return next((b for b in BACKENDS if b in available_backends() and name.endswith("-" + hardware_tag(b))), None)


def run_branch_name(tag, hardware):
    """setup's branch for a --tag on a hardware tag: autoresearch/<tag>-<hardware>."""
    return f"{BRANCH_PREFIX}{tag}-{hardware}"


def state_dir(root):
    path = Path(root) / STATE_DIR
    path.mkdir(exist_ok=True)
    return path


def changed_files(repo):
    """Tracked files that differ from HEAD (staged or not) and untracked files git does not ignore."""
    changed = {d.a_path for d in repo.index.diff(None)} | {d.a_path for d in repo.index.diff("HEAD")}
    return sorted(changed | set(repo.untracked_files))


def refuse_dirty(repo):
    dirty = changed_files(repo)
    if dirty:
        raise Refused(f"working tree has uncommitted changes ({', '.join(dirty)}): commit or stash them first")


def pin_of(repo, commit):
    """Hash of every tracked file of commit except the backends' train.py files: the fixed half."""
    listing = repo.git.ls_tree("-r", "--full-tree", commit)
    fixed = [line for line in listing.splitlines() if line.split("\t", 1)[1] not in TRAIN_FILES]
    return hashlib.sha256("\n".join(fixed).encode()).hexdigest()[:16]


def _blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def disk_changes(repo, commit="HEAD", skip=TRAIN_FILES):
    """Tracked files of commit whose bytes on disk differ from it, read by this process whatever git's index flags
    (--assume-unchanged, --skip-worktree) say."""
    root, changed = Path(repo.working_tree_dir), []
    for line in repo.git.ls_tree("-r", "--full-tree", commit).splitlines():
        meta, name = line.split("\t", 1)
        mode, _, sha = meta.split()
        if name in skip:
            continue
        path = root / name
        try:
            data = os.readlink(path).encode() if mode == "120000" else path.read_bytes()
        except OSError:
            changed.append(name)
            continue
        if path.is_symlink() != (mode == "120000") or _blob_id(data) != sha:
            changed.append(name)
    return changed


def git_control_files(repo):
    """{path: bytes} of what makes git run programs or hide changes: its config, hooks, info/ (attributes,
    exclude) and the index's flags."""
    git_dir = Path(repo.git_dir)
    files = {"config": (git_dir / "config").read_bytes() if (git_dir / "config").exists() else None}
    for sub in ("hooks", "info"):
        for path in sorted((git_dir / sub).rglob("*")) if (git_dir / sub).is_dir() else ():
            if path.is_file() or path.is_symlink():
                files[str(path.relative_to(git_dir))] = path.read_bytes() if path.is_file() else b"link"
    return files


def fixed_changes(repo, old, new):
    """Files outside the backends' train.py that differ between two commits."""
    names = repo.git.diff("--name-only", old, new).splitlines()
    return [n for n in names if n not in TRAIN_FILES]


def refs_snapshot(repo):
    """Every ref and what it points at (branches, tags, notes): a train.py that commits or rewrites notes shows."""
    return repo.git.for_each_ref("--format=%(refname) %(objectname)")


class Lock:
    """An exclusive lock on the checkout (flock: released by the kernel when the holder dies, even by SIGKILL).
    One harness per checkout, not one lock per call: in the process that holds it, taking it again (the swarm
    holds it from before Ray starts, then opens the run branch) nests."""

    _held = {}  # lock file: how many times this process holds it

    def __init__(self, root, command):
        self.path = (state_dir(root) / LOCK_FILE).resolve()
        self.command = command
        self.fd = None

    def __enter__(self):
        if self.path in Lock._held:
            Lock._held[self.path] += 1
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise Refused(f"another harness works on this checkout (pid {holder}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}: {self.command}\n".encode())
        self.fd = fd
        Lock._held[self.path] = 1
        return self

    def __exit__(self, *exc):
        Lock._held[self.path] -= 1
        if self.fd is None or Lock._held[self.path]:
            return
        del Lock._held[self.path]
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the flock


@dataclass
class RunBranch:
    repo: git.Repo
    run: Run  # the series its experiments measure and how each run goes
    say: object = print  # one-line notices: recovery, restored rows
    calibrated: str | None = None  # setup's calibrated config, before the baseline row records it
    tag: str | None = None  # the hardware its rows are measured on, where not this process's (a swarm's workers)

    @property
    def root(self):
        return Path(self.repo.working_tree_dir)

    @property
    def backend(self):
        return self.run.backend

    @property
    def budget(self):
        return self.run.budget

    @property
    def profile(self):
        return self.run.profile

    @property
    def name(self):
        return self.repo.active_branch.name

    @property
    def hardware(self):
        return self.tag or hardware_tag(self.backend)

    @property
    def ledger(self):
        return self.root / LEDGER_NAME

    @property
    def sandbox(self):
        return self.run.sandbox

    def key(self):
        """Results compare only within one run branch, hardware, eval profile, budget and sandbox."""
        return (self.name, self.hardware, self.profile, self.budget, self.sandbox)

    def clock(self):
        """How long its candidates may run, fixed by its baseline's startup and step times."""
        return Clock.for_baseline(self.budget, self.baseline())

    def rows(self):
        return read_ledger(self.ledger)

    def best(self):
        return best_kept(self.rows(), self.key())

    def noise(self):
        """The run-to-run spread measured by setup for this hardware, profile and budget, or None."""
        noise = load_noise(self.root, *self.key()[1:4])
        return noise["spread"] if noise else None

    def baseline(self):
        """The branch's baseline row (it carries the pin), or None."""
        return baseline_of(self.rows(), self.name)

    def config(self):
        """The calibrated config the run branch started from (its baseline row's), or None."""
        base = self.baseline()
        if base is None:
            return self.calibrated
        return base.config if base.config != "-" else None

    def last_keep(self):
        kept = [r for r in self.rows() if r.branch == self.name and r.status == "keep"]
        return kept[-1] if kept else None

    def restore_ledger(self):
        """Rows of this branch that its git notes hold but results.tsv lost come back before any comparison."""
        restored = restore_missing(self.repo, self.ledger, self.name, self.say)
        record.save(self.root)
        if restored:
            self.say(f"ledger: restored {restored} row(s) of {self.name} from refs/notes/autoresearch")

    def recover(self):
        """A trainer left by a killed harness is stopped; HEAD goes back to the last kept commit, any commit no row
        kept stays reachable under refs/autoresearch/stray/. A clean tree is reset; a dirty one keeps its files."""
        for pid in stop_leftover(state_dir(self.root)):
            self.say(f"recovery: stopped process group {pid} left running by an earlier harness")
        last = self.last_keep()
        if last is None:
            raise Refused(f"{self.name} has no baseline row in {LEDGER_NAME} or its notes: set up a run branch with "
                          f"`autoresearch setup --tag TAG --backend {self.backend}`")
        try:
            kept = self.repo.commit(last.commit)
        except (git.BadName, ValueError):
            raise Refused(f"the last kept commit {last.commit} of {self.name} is not in this repository") from None
        head = self.repo.head.commit
        if head == kept:
            return
        # HEAD only ever goes back along the branch's own history, to a commit whose fixed half is the pinned one:
        # a row from another machine's notes cannot move this checkout onto commits of theirs
        pinned = record.pin(self.root, self.name)
        behind = self.repo.is_ancestor(head, kept)  # a keep recorded before the branch moved to it (a killed driver)
        if not (behind or self.repo.is_ancestor(kept, head)) or (pinned and pin_of(self.repo, kept.hexsha) != pinned):
            raise Refused(f"the last keep {last.commit} by the ledger is not on {self.name}'s history at "
                          f"{head.hexsha[:7]} (or not its pinned fixed half): HEAD is left where it is; if that row "
                          f"is yours, check the commit out yourself")
        if behind:
            where = "an ancestor of it"
        else:
            ref = STRAY_REFS + head.hexsha[:7]
            self.repo.git.update_ref(ref, head.hexsha)
            where = f"kept as {ref}"
        dirty = bool(changed_files(self.repo))
        self.repo.head.reset(kept, index=True, working_tree=not dirty)
        self.say(f"recovery: HEAD was {head.hexsha[:7]} ({where}), not the last keep {last.commit}: "
                 f"reset to {last.commit}" + ("; the working tree's files were left as they are" if dirty else ""))

    def check_series(self):
        """The command measures what the baseline measured: this hardware, eval profile and budget. A result of
        another series has nothing to compare with, and would be kept unjudged."""
        base = self.baseline()
        if base is not None and base.key()[1:4] != self.key()[1:4]:
            raise Refused(f"{self.name}'s baseline was measured on {base.hardware}, profile {base.eval_profile}, budget "
                          f"{base.budget:g}s; this run would be {self.hardware}, {self.profile}, {self.budget:g}s: use "
                          f"--budget {base.budget:g}, or set up another run branch for that series")
        if base is not None and base.key()[4] != self.sandbox:
            raise Refused(f"{self.name}'s baseline ran under sandbox {base.key()[4]}; this run would run under "
                          f"{self.sandbox}, and results of different sandboxes are never compared: use "
                          f"--sandbox {'off' if base.key()[4] == 'none' else 'auto'}, or set up another run branch")

    def check_record(self):
        """The ledger and the noise floor are as the harness last wrote them; else put back, and Refused."""
        try:
            record.check(self.root, self.say)
        except record.Tampered as e:
            raise Refused(str(e)) from None

    def check_pin(self, commit="HEAD"):
        """The fixed half of commit is the one setup pinned: the harness's own record of it (the baseline row's
        where the record has none: a fresh clone); else Refused."""
        base = self.baseline()
        pinned = record.pin(self.root, self.name) or (base.pin if base is not None else "-")
        if pinned in ("", "-"):
            return  # a branch set up before pins existed: nothing to compare with
        visible = set(changed_files(self.repo))  # what git shows as changed is refused elsewhere, with its own words
        on_disk = [f for f in disk_changes(self.repo, commit) if f not in visible]
        if on_disk:
            raise Refused(f"the fixed half of the repository on disk is not as committed ({', '.join(on_disk[:5])}):"
                          " restore it with `git checkout -- FILE` (and `git update-index --no-skip-worktree "
                          "--no-assume-unchanged FILE` where a flag hides it)")
        if pin_of(self.repo, commit) != pinned:
            try:
                files = ", ".join(fixed_changes(self.repo, base.commit, commit)) if base else "unknown files"
            except git.GitCommandError:
                files = "unknown files"
            raise Refused(f"the fixed half of the repository changed since setup ({files}); only "
                          f"backends/<backend>/train.py may change on a run branch: revert those commits")

    def interrupted(self, commit, base):
        """Back at base after a signal; the unmeasured experiment commit stays reachable. Returns the notice."""
        ref = INTERRUPTED_REFS + commit.hexsha[:7]
        self.repo.git.update_ref(ref, commit.hexsha)
        self.repo.head.reset(base, index=True, working_tree=True)
        return f"interrupted: experiment {commit.hexsha[:7]} not measured (kept as {ref}); reset to {base.hexsha[:7]}"


@contextmanager
def open_branch(run, command, say=None, hardware=None):
    """Lock the checkout, then the checked-out run branch, its ledger restored and HEAD at its last keep.
    hardware: the tag its experiments run on, where that is not this process's. Use as `with open_branch(...) as
    branch:`."""
    repo = open_repo(run.root)
    if repo.head.is_detached or not repo.active_branch.name.startswith(BRANCH_PREFIX):
        raise Refused("not on a run branch: start one with `autoresearch setup --tag TAG --backend "
                      f"{run.backend}`, or check out an existing autoresearch/... branch")
    with Lock(run.root, command):
        branch = RunBranch(repo, run, say or (lambda text: print(text, file=sys.stderr, flush=True)), tag=hardware)
        branch.check_record()
        branch.restore_ledger()
        branch.recover()
        branch.check_series()
        branch.check_pin()
        yield branch
