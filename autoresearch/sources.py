"""Where rows come from: ledger files and run branches, whose rows live in the git notes of their commits
(ledger.notes_rows). What reads several sources (the bench report, the dashboard, transfer) reads them here."""

from pathlib import Path

import git

from .ledger import NOTES_REF, format_row, in_time_order, notes_rows, read_ledger, series_of


class ReportError(Exception):
    """A source cannot be read or holds nothing to report; the message says which and why."""




def branch_names(repo, name):
    """The names a branch's rows carry in their branch column: name, without refs/heads/ or a remote."""
    names = {name, name.removeprefix("refs/heads/"), name.removeprefix("refs/remotes/")}
    for remote in repo.remotes:
        for n in list(names):
            if n.startswith(remote.name + "/"):
                names.add(n[len(remote.name) + 1:])
    return names


def branch_rows(repo, name):
    """The rows of run branch `name` from the git notes, in time order; ReportError if none."""
    try:
        repo.git.rev_parse("--verify", "--quiet", f"{name}^{{commit}}")
    except git.GitCommandError:
        raise ReportError(f"{name}: neither a ledger file nor a branch of {repo.working_tree_dir}") from None
    names = branch_names(repo, name)
    rows = [r for r, _ in notes_rows(repo) if r.branch in names]
    if not rows:
        raise ReportError(f"{name}: no rows of this branch in refs/notes/{NOTES_REF} (on another machine: "
                          f"git fetch origin refs/notes/{NOTES_REF}:refs/notes/{NOTES_REF})")
    return in_time_order(rows)


def load_source(source, repo=None):
    """A ledger file's rows, or a run branch's rows from the git notes."""
    path = Path(source)
    if path.is_file():
        rows = read_ledger(path)
        if not rows:
            raise ReportError(f"{source}: no experiments in this ledger")
        return rows
    if repo is None:
        raise ReportError(f"{source}: not a ledger file, and not inside a git repository to look for a branch")
    return branch_rows(repo, str(source))


def merge(sources):
    """Rows of several sources in order, identical rows (the same experiment seen twice) once."""
    seen, rows = set(), []
    for source_rows in sources:
        for r in source_rows:
            line = format_row(r)
            if line not in seen:
                seen.add(line)
                rows.append(r)
    return rows




def load_series(sources, repo=None):
    """The sources' rows merged, and their series, each in time order: (rows, series)."""
    rows = merge([load_source(s, repo) for s in sources])
    series = series_of(rows)
    for s in series:  # notes and several ledgers: order each series by time
        s.rows = in_time_order(s.rows)
    return rows, series
