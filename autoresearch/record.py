"""The harness's own record of a checkout, kept outside it where no sandboxed process reaches: the ledger and the
noise floor as the harness last wrote them, each run branch's pin, and the pid files it wrote. Before a command
works on a run branch, and before every experiment, the checkout's copies are compared with it: a change made
outside the harness (an agent with a shell, a process left behind) is undone and stops the command."""

import hashlib
import json
import os
from pathlib import Path

from .ledger import LedgerError

STATE_ENV = "AUTORESEARCH_STATE"
GUARDED = ("results.tsv", ".autoresearch/noise.json")  # what the harness writes and decides by


class Tampered(Exception):
    """A guarded file changed outside the harness; it has been put back. The message names it."""


def state_home():
    """AUTORESEARCH_STATE, else $XDG_STATE_HOME/autoresearch, else ~/.local/state/autoresearch."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "autoresearch"


def record_dir(root):
    """This checkout's folder of the record (one per checkout path)."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    path = state_home() / digest
    path.mkdir(parents=True, exist_ok=True)
    return path


def _copy_name(name):
    return name.replace("/", "__")


class RecordUnwritable(LedgerError):
    """The record's folder cannot be written (a full disk, a quota, no permission): nothing was changed."""


def _write(path, data):
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RecordUnwritable(f"the harness's record of this checkout cannot be written in {path.parent} "
                               f"({e.strerror or e}): free space there, or set {STATE_ENV} to another folder, and "
                               "run again") from None


def _read(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def pending(root, line):
    """Before the harness appends a ledger row: a harness killed between the append and save() left it, not
    someone else."""
    _write(record_dir(root) / "pending-row", line.encode())


def save(root):
    """After the harness wrote a guarded file: the record takes the checkout's bytes as they now are."""
    folder = record_dir(root)
    (folder / "pending-row").unlink(missing_ok=True)
    for name in GUARDED:
        data = _read(Path(root) / name)
        copy = folder / _copy_name(name)
        if data is None:
            copy.unlink(missing_ok=True)
        else:
            _write(copy, data)
    _write(folder / "checkout", (str(Path(root).resolve()) + "\n").encode())


def check(root, say=None):
    """The guarded files are as the harness last wrote them; a changed one is put back and Tampered names it. A
    checkout the record has never seen is adopted as it is (a fresh clone, an earlier version's checkout)."""
    folder = record_dir(root)
    if not (folder / "checkout").exists():
        save(root)
        return
    changed, lost = [], []
    row = _read(folder / "pending-row") or b""
    for name in GUARDED:
        expected, now = _read(folder / _copy_name(name)), _read(Path(root) / name)
        if now == expected or (row and expected is not None and now == expected + row):
            continue  # as written, or with the row the harness was appending when it was killed
        if expected is not None and (now is None or expected.startswith(now)):
            lost.append(name)  # deleted, or its end cut off (a write cut short): nothing is believed that was not
        else:
            changed.append(name)
        target = Path(root) / name
        if expected is None:
            target.unlink(missing_ok=True)
        else:
            target.parent.mkdir(exist_ok=True)
            _write(target, expected)
    save(root)
    if lost and say:
        say(f"record: {' and '.join(lost)} lost rows (deleted or cut short); restored from the harness's record")
    if changed:
        raise Tampered(f"{' and '.join(changed)} changed outside the harness; the harness's copy is restored (from "
                       f"{folder}): check what else ran in this checkout, then run again")


def pin(root, branch, value=None):
    """The pin setup recorded for branch (its fixed half's hash), or None; with value, record it."""
    path = record_dir(root) / "pins.json"
    pins = json.loads(path.read_text()) if path.exists() else {}
    if value is not None:
        pins[branch] = value
        _write(path, (json.dumps(pins, indent=2) + "\n").encode())
    return pins.get(branch)


def pid_copy(state, name):
    """Where the record keeps its copy of a pid file the harness wrote in the checkout's state folder."""
    return record_dir(Path(state).resolve().parent) / name
