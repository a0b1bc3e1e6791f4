"""What moves between the driver's repository and the workers' clones: the run branch and its notes as git
bundles, the ledger and the noise floors (a Snapshot); a turn's result and its commit (a Report)."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..gate import noise_path
from ..ledger import LEDGER_NAME, NOTES_REF

BEST_REF = "refs/autoresearch/swarm/best"  # in a worker's clone: the swarm's best as the driver last sent it


OUT_REF = "refs/autoresearch/swarm/out"  # in a worker's clone: its last experiment, bundled for the driver


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
