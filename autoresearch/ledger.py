"""results.tsv: the append-only experiment ledger, upstream's five columns first."""

import math
import os
import time
from dataclasses import dataclass, fields

STATUSES = ("keep", "discard", "crash", "verify")  # verify: a re-run of a kept commit, decides nothing
LEDGER_NAME = "results.tsv"
NOTES_REF = "autoresearch"  # every row is also a git note on its commit: refs/notes/autoresearch


@dataclass
class Row:
    commit: str
    val_bpb: float  # 0.0 for a crash, as upstream; the mean when several seeds ran
    memory_gb: float
    status: str
    description: str
    hardware: str
    backend: str
    eval_profile: str
    budget: float
    seed: int
    timestamp: str
    training_seconds: float
    num_steps: int
    num_params_M: float
    tokens: int
    config: str  # the calibrated config the run branch started from, "-" if none
    gate: str  # the keep rule that decided, e.g. greedy or noise(k=2)
    train_hash: str  # hash of the normalized train.py, for never-repeat
    branch: str  # the run branch, e.g. autoresearch/nov24-mlx-cpu-x86_64-2c-24gb
    samples: str  # every seed's val_bpb, comma-separated ("-" for a crash)

    def values(self):
        return [float(v) for v in self.samples.split(",")] if self.samples not in ("", "-") else []

    def key(self):
        """Results compare only within one run branch, hardware, eval profile and budget."""
        return (self.branch, self.hardware, self.eval_profile, self.budget)


COLUMNS = [f.name for f in fields(Row)]
_TYPES = {f.name: f.type for f in fields(Row)}


class LedgerError(Exception):
    pass


def _format(value):
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value == value else "nan"
    return " ".join(str(value).split())  # tabs and newlines would break the row


def format_row(row):
    return "\t".join(_format(getattr(row, c)) for c in COLUMNS) + "\n"


def parse_row(line, lineno, path):
    parts = line.rstrip("\n").split("\t")
    if len(parts) != len(COLUMNS):
        raise LedgerError(f"{path}:{lineno}: expected {len(COLUMNS)} tab-separated columns, found {len(parts)}")
    values = {}
    for name, raw in zip(COLUMNS, parts):
        kind = _TYPES[name]
        try:
            values[name] = kind(raw)
        except ValueError:
            raise LedgerError(f"{path}:{lineno}: column {name} is not a number: {raw!r}") from None
    if values["status"] not in STATUSES:
        raise LedgerError(f"{path}:{lineno}: status must be one of {', '.join(STATUSES)}, got {values['status']!r}")
    return Row(**values)


def read_ledger(path):
    """All rows in order; an absent file is an empty ledger; a malformed line is an error naming it."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                if line.rstrip("\n").split("\t") != COLUMNS:
                    raise LedgerError(f"{path}:1: header does not match this version's columns")
                continue
            if line.strip():
                rows.append(parse_row(line, lineno, path))
    return rows


def append_row(path, row):
    """One write per row (O_APPEND), header first on a new file, fsync'd: rows are never lost or torn."""
    data = format_row(row)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if new:
        data = "\t".join(COLUMNS) + "\n" + data
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def best_kept(rows, key):
    """The lowest-val_bpb kept row comparable to key (branch, hardware, profile, budget), or None."""
    kept = [r for r in rows if r.status == "keep" and r.key() == key and math.isfinite(r.val_bpb)]
    return min(kept, key=lambda r: r.val_bpb) if kept else None


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
