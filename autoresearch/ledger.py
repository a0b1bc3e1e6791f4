"""results.tsv: the append-only experiment ledger, upstream's five columns first; every row is also a git
note on its commit (refs/notes/autoresearch), from which a lost or shortened ledger is restored. And the series
model every reader of rows shares: a series is the rows of one key (Row.key), with one baseline and one best."""

import errno
import math
import os
import re
import signal
import sys
import time
from contextlib import suppress
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import git

from .summary import MISSING as MISSING_NUMBER

# verify: a re-run of a kept commit, decides nothing; invalid: caught breaking the rules, reverted, idea not judged;
# lost: a swarm worker died mid-experiment, nothing measured, idea not judged
STATUSES = ("keep", "discard", "crash", "verify", "invalid", "lost")
SCORED = ("keep", "discard", "verify")  # the statuses whose val_bpb is a measurement (the rest hold 0.0)
UNJUDGED = ("invalid", "lost")  # rows that say nothing about the idea: the same program may run again
LEDGER_NAME = "results.tsv"
NOTES_REF = "autoresearch"  # every row is also a git note on its commit: refs/notes/autoresearch
MAX_DESCRIPTION_CHARS = 300  # a description is one line of a row and of its git note, never a file's worth
TRANSFER = re.compile(r"^transfer ([0-9a-f]{4,40}): (.*)$")  # a transferred row's description: its origin commit


@dataclass
class Row:
    """One experiment. A number the harness did not get (a summary field that was not a finite number) is
    MISSING_NUMBER (NaN) in any numeric column, int ones too: written "nan", and "nan" or "inf" read back as it,
    so every row the harness writes parses back."""
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
    branch: str  # the run branch, e.g. autoresearch/nov24-mlx-cpu-x86_64-2c-24gb-mkl
    samples: str  # every seed's val_bpb, comma-separated ("-" for a crash)
    # columns added later: ledgers and notes written before them read with these defaults
    harness_seconds: float = 0.0  # training seconds the harness measured itself, 0 when unknown
    pin: str = "-"  # hash of the fixed half of the repository the row ran against, "-" when unknown
    worker: str = "-"  # the swarm worker that ran it (w0, w1, ...), "-" outside a swarm
    sandbox: str = "-"  # what confined its processes: bwrap, sandbox-exec or none ("-": before sandboxes)
    startup_seconds: float = 0.0  # from the trainer's spawn to its first progress line, by the harness's clock
    step_seconds: float = 0.0  # the median time between its progress lines, by the harness's clock
    eval_seconds: float = 0.0  # the harness's evaluation: model build, scoring, probes
    # the holdout rows' val_bpb, scored in the same pass as val_bpb (the mean where several seeds ran); no decision
    # reads it, so beside val_bpb it shows what selecting on val_bpb cost. 0.0 where none was scored
    holdout_bpb: float = 0.0
    params: str = "-"  # its train.py's hyperparameter block as one line of JSON (hparams.block_json), "-" if none

    def values(self):
        return [float(v) for v in self.samples.split(",")] if self.samples not in ("", "-") else []

    def key(self):
        """Results compare only within one run branch, hardware, eval profile, budget and sandbox."""
        return (self.branch, self.hardware, self.eval_profile, self.budget, sandbox_kind(self.sandbox))


def sandbox_kind(recorded):
    """A row's sandbox as compared: rows from before sandboxes ran unconfined."""
    return "none" if recorded in ("", "-") else recorded


COLUMNS = [f.name for f in fields(Row)]
_TYPES = {f.name: f.type for f in fields(Row)}
_DEFAULTS = {f.name: f.default for f in fields(Row) if f.default is not MISSING}
_OLDEST = len(COLUMNS) - len(_DEFAULTS)  # the first version's column count: fewer is never a whole row
_HEADER = "\t".join(COLUMNS) + "\n"


class LedgerError(Exception):
    pass


def _printable(c):
    if c.isprintable() or c.isspace():
        return c
    return "\ufffd" if "\ud800" <= c <= "\udfff" else " "  # a byte that was not UTF-8 (a command line's), as decoded


def one_line(text, limit=None):
    """text as one printable line: undecodable bytes marked U+FFFD, control and format characters dropped, each run
    of whitespace one space, at most limit characters. Tabs and newlines would break the row; a NUL cannot go on
    git's command line (the note); escape sequences would redraw the terminal that shows the results."""
    return " ".join("".join(map(_printable, str(text))).split())[:limit]


def _format(value):
    if isinstance(value, float):  # in any numeric column: an int column's missing number is a float NaN too
        return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else "nan"
    if isinstance(value, int):
        return str(value)
    return one_line(value)


def format_row(row):
    return "\t".join(_format(getattr(row, c)) for c in COLUMNS) + "\n"


def _number(kind, raw):
    """The value of a numeric column: "nan" and "inf" (what the harness wrote where a number was missing or
    infinite) read as MISSING_NUMBER; text that is no number at all raises ValueError."""
    try:
        value = kind(raw)
    except ValueError:
        value = float(raw)  # an int column's "nan", "inf"; anything else is not a number
        if math.isfinite(value):
            raise ValueError(raw) from None  # "3.5" in an int column is not a number of that column
    # one object for every missing number: rows read twice compare equal (NaN equals only itself, by identity)
    return MISSING_NUMBER if isinstance(value, float) and not math.isfinite(value) else value


def parse_row(line, lineno, path, width=None):
    """A Row from a line of `width` columns (its ledger's header width), or, where width is None (a git
    note has no header), of any version's width: the columns an earlier version lacked take their defaults."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != (width or len(parts)) or not _OLDEST <= len(parts) <= len(COLUMNS):
        raise LedgerError(f"{path}:{lineno}: expected {width or len(COLUMNS)} tab-separated columns, "
                          f"found {len(parts)}")
    values = {}
    for name, raw in zip(COLUMNS, parts):
        kind = _TYPES[name]
        try:
            values[name] = raw if kind is str else _number(kind, raw)
        except ValueError:
            raise LedgerError(f"{path}:{lineno}: column {name} is not a number: {raw!r}") from None
    if values["status"] not in STATUSES:
        raise LedgerError(f"{path}:{lineno}: status must be one of {', '.join(STATUSES)}, got {values['status']!r}")
    return Row(**values)


# ---------------------------------------------------------------------------------------------
# The file: read, repaired, appended to and rewritten whole or not at all

MAX_NOTE_BYTES = 1 << 16  # one commit's rows: an experiment's, a few verify rows
TORN_SUFFIX = ".torn"  # results.tsv.torn: torn rows cut off the ledger, kept for a human to look at


@dataclass
class _File:
    data: bytes  # the file's bytes, b"" when absent
    width: int | None  # its header's column count, None until it has a whole header
    cut: int  # where its whole lines end; past it, a torn row (only the final newline may be missing before it)

    @property
    def torn(self):
        return self.data[self.cut:]


def _read(path):
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise LedgerError(f"{path}: cannot be read ({e.strerror})") from None


def _text(data, path):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LedgerError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _width(header, path):
    """The column count of a header: this version's, or an earlier one's (a prefix of COLUMNS)."""
    names = header.split("\t")
    if not _OLDEST <= len(names) <= len(COLUMNS) or names != COLUMNS[: len(names)]:
        raise LedgerError(f"{path}:1: header does not match this version's columns")
    return len(names)


def _is_row(line, width, path):
    try:
        parse_row(_text(line, path), 0, path, width)
        return True
    except LedgerError:
        return False


def _load(path):
    """The ledger file with its header checked and its final line judged: rows are appended whole, so a final
    line without a newline is either a whole row that lost only its newline, or torn (an interrupted write)."""
    data = _read(path)
    end = data.find(b"\n")
    if end < 0:  # not one whole line: a header without its newline, or the start of one
        header = _text(data, path)
        try:
            return _File(data, _width(header, path), len(data))
        except LedgerError:
            if _HEADER.startswith(header):
                return _File(data, None, 0)
            raise
    width = _width(_text(data[:end], path), path)
    cut = data.rfind(b"\n") + 1
    if cut < len(data) and not _is_row(data[cut:], width, path):
        return _File(data, width, cut)
    return _File(data, width, len(data))


def _lines(f, path):
    """(line number, text) of each row line before the torn part."""
    lines = _text(f.data[: f.cut], path).split("\n")[1:]
    return [(n, line) for n, line in enumerate(lines, 2) if line.strip()]


def _parse(f, path):
    return [parse_row(line, n, path, f.width) for n, line in _lines(f, path)]


def read_ledger(path):
    """All rows in order; an absent file is an empty ledger; a malformed line is an error naming it. An earlier
    version's ledger reads with defaults for the columns it lacks; a torn final row is not a row (the next
    append sets it aside)."""
    return _parse(_load(path), path)


def _failed(path, doing, e, undone=True):
    tail = "nothing was written" if undone else f"a partial write may remain at the end of {path.name}"
    return LedgerError(f"{path}: could not {doing} ({e.strerror or e}); {tail}")


def _write_all(fd, data):
    """os.write until all of data is written: a short write (a disk filling up) is not the end."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]


def _undo(fd, size):
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        return True
    except OSError:
        return False


def _append(path, data, doing):
    """Append data whole or not at all: a failed or short write (disk full, quota, I/O error) is cut off again."""
    existed = path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise _failed(path, doing, e) from None
    try:
        size = os.fstat(fd).st_size
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as e:
        undone = _undo(fd, size)
        if not existed:
            with suppress(OSError):
                path.unlink()
        raise _failed(path, doing, e, undone) from None
    finally:
        os.close(fd)


def _replace(path, data, doing):
    """Write the file anew beside itself, fsync it and rename it over the old one: the old or the new, never half."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # named like the ledger, so git ignores it too
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        raise _failed(path, doing, e) from None
    with suppress(OSError):  # the rename's durability; some filesystems cannot fsync a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set_aside(path, f):
    """Cut a torn final row off the ledger, appending it to results.tsv.torn first: nothing is lost."""
    if not f.torn:
        return f
    _append(path.with_name(path.name + TORN_SUFFIX), f.torn + b"\n", "keep a torn row aside")
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, f.cut)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _failed(path, "cut off a torn row", e) from None
    return _File(f.data[: f.cut], f.width, f.cut)


def _migrated(f, path):
    """An earlier version's ledger under this version's header: each row's own text kept, extended by the
    defaults of the columns it lacks."""
    _parse(f, path)  # a malformed ledger is reported, not rewritten
    pad = "".join("\t" + _format(_DEFAULTS[c]) for c in COLUMNS[f.width:])
    return _HEADER + "".join(line + pad + "\n" for _, line in _lines(f, path))


def append_row(path, row):
    """Append one row, whole or not at all, fsync'd. The file is repaired first: a final row that lost only its
    newline gets it back, a torn one is set aside (results.tsv.torn); an earlier version's ledger is rewritten
    under this version's header, its rows kept. A failed write is undone: LedgerError, one line."""
    path = Path(path)
    f = _set_aside(path, _load(path))
    line = format_row(row)
    if f.width is None:
        _append(path, (_HEADER + line).encode(), "append a row")
    elif f.width < len(COLUMNS):
        _replace(path, (_migrated(f, path) + line).encode(), "append a row")
    else:
        _append(path, (("" if f.data.endswith(b"\n") else "\n") + line).encode(), "append a row")


def replace_ledger(path, data):
    """Write the ledger whole from bytes (a swarm worker's copy of the driver's): the old file or the new, never half."""
    _replace(Path(path), data, "write the ledger")


def _ledger_bytes(rows):
    return (_HEADER + "".join(format_row(r) for r in rows)).encode()


# ---------------------------------------------------------------------------------------------
# The git notes: every row is also appended to its commit's note, so a run branch carries its own ledger


def git_identity(repo):
    """Author and committer for the harness's own git writes where the user has none configured."""
    reader = repo.config_reader()
    if reader.has_option("user", "name") and reader.has_option("user", "email"):
        return {}
    return {f"GIT_{r}_{k}": v for r in ("AUTHOR", "COMMITTER")
            for k, v in (("NAME", "autoresearch"), ("EMAIL", "autoresearch@localhost"))}


def write_note(repo, row, commit):
    """Append the row to the note of commit (a Commit or a sha) in refs/notes/autoresearch; `git push origin
    refs/notes/autoresearch` takes the rows along. git moves the notes ref last, so a failure (disk full, a
    locked ref) writes nothing: LedgerError, one line."""
    sha = getattr(commit, "hexsha", commit)
    try:
        with repo.git.custom_environment(**git_identity(repo)):
            repo.git.notes("--ref", NOTES_REF, "append", "-m", format_row(row).rstrip("\n"), sha)
    except git.GitCommandError as e:
        raise LedgerError(f"refs/notes/{NOTES_REF}: could not add the row to the note of {sha[:7]} "
                          f"({_git_reason(e)}); nothing was written") from None


def _git_reason(e):
    """git's last line of complaint, without GitPython's wrapping."""
    text = str(e.stderr).strip().removeprefix("stderr:").strip().strip("'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        return lines[-1]
    if isinstance(e.status, int) and e.status < 0:  # e.g. SIGXFSZ: a file-size limit reached
        return f"git was killed by {signal.Signals(-e.status).name}"
    return f"git exit status {e.status}"


def notes_rows(repo, warn=None):
    """Every row stored in refs/notes/autoresearch, as (row, full commit sha) in no particular order. A row is
    believed only on its own commit's note; a note that is too large, not UTF-8 or not rows (merged from another
    machine, written by hand) is skipped, and warn(line) names its commit."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        listing = repo.git.notes("--ref", NOTES_REF, "list")
    except git.GitCommandError:
        return []
    found = []
    for line in listing.splitlines():
        if not line.strip():
            continue
        blob, commit = line.split()
        try:
            size = repo.odb.info(bytes.fromhex(blob)).size  # asked apart: a stream left unread breaks the next
            if size > MAX_NOTE_BYTES:
                raise LedgerError(f"{size:,} bytes, over the {MAX_NOTE_BYTES:,} a commit's rows take")
            text = repo.odb.stream(bytes.fromhex(blob)).read().decode("utf-8")
            rows = [parse_row(entry, n, "note") for n, entry in enumerate(text.splitlines(), 1) if entry.strip()]
        except (LedgerError, UnicodeDecodeError, ValueError) as e:
            warn(f"ledger: the note on commit {commit[:7]} in refs/notes/{NOTES_REF} is skipped: "
                 f"{' '.join(str(e).split())[:200]}")
            continue
        foreign = [r for r in rows if not r.commit or not commit.startswith(r.commit)]
        if foreign:
            warn(f"ledger: {len(foreign)} row(s) in the note on commit {commit[:7]} claim another commit: skipped")
        found += [(r, commit) for r in rows if r not in foreign]
    return found


def row_time(row):
    """The row's timestamp in seconds since the epoch, or None where it does not parse."""
    try:
        return datetime.strptime(row.timestamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def in_time_order(rows):
    """Rows sorted by timestamp (stable); left as they are where a timestamp does not parse."""
    times = [row_time(r) for r in rows]
    if any(t is None for t in times):
        return list(rows)
    return [r for _, r in sorted(zip(times, rows), key=lambda p: p[0])]


def _identity(row):
    """One experiment's row, however its numbers were formatted or its columns extended since (the seed as text: a
    missing one, NaN, equals nothing, not even itself)."""
    return (row.commit, row.timestamp, _format(row.seed), row.status, row.description)


def rebuild_ledger(repo, path):
    """Recreate the ledger from the git notes: every row of every commit, in time order; returns the row count.
    An existing ledger that differs from the rebuilt one is kept first as results.tsv.<time>.bak."""
    path = Path(path)
    rows = in_time_order([r for r, _ in notes_rows(repo)])
    data = _ledger_bytes(rows)
    old = _read(path)
    if old and old != data:
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.bak")
        _replace(backup, old, "keep the old ledger aside")
    _replace(path, data, "rebuild the ledger")
    return len(rows)


def restore_missing(repo, path, branch, warn=None):
    """Put back the rows of run branch `branch` that its git notes hold and the ledger lacks (results.tsv
    deleted or shortened): the ledger rewritten whole in time order, rows only in it kept. Returns how many
    rows came back; with none missing the file is not touched. Rows match on _identity."""
    path = Path(path)
    branch = branch.removeprefix("refs/heads/")
    history = set(repo.git.rev_list(branch).split())  # rows of commits off the branch's history are not its own
    noted = [r for r, commit in notes_rows(repo, warn) if r.branch == branch and commit in history]
    if not noted:
        return 0
    f = _load(path)
    rows = _parse(f, path)
    have = {_identity(r) for r in rows}
    missing = {}
    for r in noted:
        if _identity(r) not in have:
            missing.setdefault(_identity(r), r)
    if not missing:
        return 0
    _set_aside(path, f)  # the rewrite would drop a torn row: keep it first
    _replace(path, _ledger_bytes(in_time_order(rows + list(missing.values()))), "restore rows from the git notes")
    return len(missing)


# ---------------------------------------------------------------------------------------------
# The series model: rows compare only within one key (Row.key); each series has one baseline and one best


def baseline_of(rows, branch):
    """A run branch's baseline: the first kept row setup described "baseline", else its first kept row, or None."""
    kept = [r for r in rows if r.branch == branch and r.status == "keep"]
    return next((r for r in kept if r.description == "baseline"), kept[0] if kept else None)


def best_kept(rows, key):
    """The lowest-val_bpb kept row of series key (the earliest of a tie), or None."""
    kept = [r for r in rows if r.status == "keep" and r.key() == key and math.isfinite(r.val_bpb)]
    return min(kept, key=lambda r: r.val_bpb) if kept else None


@dataclass
class Series:
    """The rows of one key, in order, verify rows included."""
    branch: str
    hardware: str
    eval_profile: str
    budget: float
    sandbox: str = "none"  # what confined its runs: results of different sandboxes are different series
    rows: list = field(default_factory=list)

    @property
    def key(self):
        return (self.branch, self.hardware, self.eval_profile, self.budget, self.sandbox)

    @property
    def backend(self):
        return self.rows[0].backend

    @property
    def experiments(self):
        """Every row that is an experiment (baseline included); verify rows re-run a keep and decide nothing."""
        return [r for r in self.rows if r.status != "verify"]

    @property
    def baseline(self):
        return baseline_of(self.rows, self.branch)

    @property
    def trials(self):
        """Experiments after the baseline: what the keep rate counts."""
        base, rows = self.baseline, self.experiments
        return rows[rows.index(base) + 1:] if base is not None else rows

    @property
    def kept(self):
        """Kept experiments after the baseline, in order."""
        return [r for r in self.trials if r.status == "keep" and math.isfinite(r.val_bpb)]

    @property
    def best(self):
        return best_kept(self.rows, self.key)

    @property
    def config(self):
        return (self.baseline or self.rows[0]).config


def series_of(rows):
    """Rows grouped by key, in order of first appearance."""
    groups = {}
    for r in rows:
        key = r.key()
        if key not in groups:
            groups[key] = Series(*key)
        groups[key].rows.append(r)
    return list(groups.values())


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_tag(branch, hardware):
    """The --tag of a run branch autoresearch/<tag>-<hardware>; the branch name where it is not one."""
    name = branch.removeprefix("autoresearch/")
    return name[: -len(hardware) - 1] if name.endswith(f"-{hardware}") and len(name) > len(hardware) + 1 else name


def labels(series):
    """A label per series: its hardware tag, with the run's tag where a hardware has several series,
    and the eval profile and budget where those are what differs."""
    out = [s.hardware for s in series]
    for i, s in enumerate(series):
        if sum(t.hardware == s.hardware for t in series) > 1:
            out[i] = f"{s.hardware} ({run_tag(s.branch, s.hardware)})"
    for i, s in enumerate(series):
        if out.count(out[i]) > 1:
            out[i] = f"{out[i]} [{s.eval_profile}, {s.budget:g}s]"
    return out
