"""The never-stop loop: agent edits train.py, the harness runs the experiment, repeat."""

import time
from pathlib import Path

from . import train_file
from .agents import AgentFailed
from .gate import Gate
from .branch import changed_files, open_branch, refuse_dirty
from .experiment import (STATE_DIR, Refused, Settings, check_budget, check_cache, check_candidate, experiment,
                         open_repo, state_dir)
from .hardware import hardware_tag
from .hparams import read_constants
from .ledger import COLUMNS, LEDGER_NAME, MAX_DESCRIPTION_CHARS, format_row, git_identity, one_line, read_ledger

RECENT_ROWS = 10


def build_prompt(root, backend, budget, last_turn=None):
    """program.md plus where things stand: the file to edit, the best so far, recent rows, the last crash."""
    root = Path(root)
    repo = open_repo(root)
    branch = repo.active_branch.name
    rows = [r for r in read_ledger(root / LEDGER_NAME) if r.branch == branch]
    program = (root / "program.md").read_text() if (root / "program.md").exists() else ""
    tag = hardware_tag(backend)
    lines = [program, "", "## This experiment", "",
             f"- backend: {backend}; the file to edit: backends/{backend}/train.py (nothing else)",
             f"- hardware: {tag}; run branch: {branch}; training budget: {budget:g} s"]
    kept = [r for r in rows if r.status == "keep"]
    best = min(kept, key=lambda r: r.val_bpb) if kept else None
    if best:
        lines.append(f"- best kept so far: val_bpb {best.val_bpb:.6f} at commit {best.commit} ({best.description})")
    if rows:
        lines += ["", f"Last {min(len(rows), RECENT_ROWS)} experiments of this run (results.tsv):", "",
                  "\t".join(COLUMNS[:5])] + ["\t".join(format_row(r).split("\t")[:5]) for r in rows[-RECENT_ROWS:]]
    crash = root / STATE_DIR / "last_crash.log"
    if rows and rows[-1].status == "crash" and crash.exists():
        lines += ["", "The last experiment crashed; the end of its log:", "", crash.read_text()[-3000:]]
    if last_turn:
        lines += ["", f"Your previous turn: {last_turn}"]
    lines += ["", f"Edit backends/{backend}/train.py now, then write a one-line description of the change to "
              f"{STATE_DIR}/description. Do not run training yourself: the harness runs it after you exit."]
    return "\n".join(lines)


def describe_diff(before, after):
    """A description from the changed hyperparameters, for agents that leave none."""
    a, b = read_constants(before), read_constants(after)
    changes = [f"{k} {a[k]} -> {b[k]}" for k in b if k in a and a[k] != b[k]]
    return ", ".join(changes) or "edit outside the hyperparameter block"


def set_aside(repo, label):
    """Undo what the agent changed without destroying it: its edits and new files go to a git stash entry."""
    if not changed_files(repo):
        return None
    with repo.git.custom_environment(**git_identity(repo)):
        repo.git.stash("push", "--include-untracked", "-m", label)
    return "stash@{0}"


class NoEdit(Exception):
    """The agent's turn produced no experiment; its changes were set aside. reason: why, for the next prompt."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def agent_edit(branch, agent, label, last_turn, agent_timeout, event):
    """One agent turn on the run branch: the agent edits train.py, the edit is checked, and its description is
    returned (from the agent, else from the changed hyperparameters). No valid edit: NoEdit, the changes set
    aside in a git stash entry, never deleted."""
    root, backend, repo = branch.root, branch.backend, branch.repo
    before = train_file(backend, root).read_text()
    prompt = build_prompt(root, backend, branch.budget, last_turn)
    started = time.time()
    try:
        description = agent.edit(root, backend, prompt, agent_timeout)
        check_candidate(repo, backend)
    except (AgentFailed, Refused) as e:
        where = set_aside(repo, f"autoresearch {label}: {e}")
        raise NoEdit(f"agent {agent.name!r} produced no experiment: {e}"
                     + (f" (its changes set aside in git {where})" if where else ""), str(e)) from None
    except BaseException:
        set_aside(repo, f"autoresearch {label}: interrupted while the agent worked")
        raise
    # one printable line, whoever wrote it: it goes into the loop's log, the commit, the row and the next prompt
    description = one_line(description or describe_diff(before, train_file(backend, root).read_text()),
                           MAX_DESCRIPTION_CHARS) or "(no description)"
    event(f"{label}: agent edited in {time.time() - started:.0f}s: {description}")
    return description


def check_turns(max_experiments, agent_timeout):
    """The loop's own options (loop and swarm): ValueError, before anything runs."""
    if max_experiments is not None and max_experiments < 0:
        raise ValueError(f"--max-experiments must be at least 0, got {max_experiments}")
    if not agent_timeout > 0:
        raise ValueError(f"--agent-timeout must be a positive number of seconds, got {agent_timeout:g}")


def run_loop(root, backend, agent, max_experiments=None, budget=None, seed=42, agent_timeout=900,
             timeout=None, on_event=print, on_line=None, gate=Gate()):
    """Repeat agent edit + experiment until interrupted or max_experiments agent turns. Returns the outcomes."""
    settings = Settings(seed, timeout, gate)
    budget = check_budget(budget)
    check_turns(max_experiments, agent_timeout)
    root = Path(root)
    outcomes, turn, last_turn = [], 0, None
    log = state_dir(root) / "loop.log"

    def event(text):
        with open(log, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        on_event(text)

    check_cache()
    with open_branch(root, backend, budget, "loop", say=event) as branch:
        refuse_dirty(branch.repo)  # between turns the loop undoes changes: none may be the user's
        while max_experiments is None or turn < max_experiments:
            turn += 1
            try:
                description = agent_edit(branch, agent, f"turn {turn}", last_turn, agent_timeout, event)
            except NoEdit as e:
                last_turn = f"no experiment: {e.reason}"
                event(f"turn {turn}: {e}")
                continue
            check_cache()  # a broken cache is not the candidate's fault: stop with the edit still in the tree
            outcome = experiment(branch, description, settings, on_line)
            outcomes.append(outcome)
            last_turn = f"{description}: {outcome.message}"
            best = branch.best()
            event(f"turn {turn}: {outcome.message}" + (f" | best {best.val_bpb:.6f}" if best else ""))
    return outcomes
