"""The never-stop loop: agent edits train.py, the harness runs the experiment, repeat."""

import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import train_file
from .agents import NOTES_FILE, AgentFailed, CommandAgent, RandomAgent, regular_file
from .gate import load_noise, spread
from .branch import changed_files, open_branch, refuse_dirty
from .experiment import STATE_DIR, Refused, check_cache, check_candidate, experiment, open_repo, state_dir
from .hardware import hardware_tag
from .hparams import read_constants
from .ledger import LEDGER_NAME, MAX_DESCRIPTION_CHARS, baseline_of, best_kept, git_identity, now, one_line, read_ledger
from .memory import MEMORY_CHARS, Facts, render
from .plain import plain
from .presets import PRESETS, expand
from .turns import capped, load_turns, new_id, read_usage, save_turn

NOTES_CHARS = 4_000  # of the agent's notes carried into the next prompt
BACKOFF_MAX = 600.0  # seconds: the longest wait between failed turns


@dataclass(frozen=True)
class TurnRules:
    """How the loop treats the agent's turns: after each failed one (no experiment) it waits, backoff seconds the
    first time and twice as long each time more in a row; max_failed in a row stop it; the agents' reported cost
    passing max_cost (US dollars) ends it; max_experiments turns end it; each turn has agent_timeout seconds."""
    max_failed: int = 5
    backoff: float = 10.0
    max_cost: float | None = None
    max_experiments: int | None = None
    agent_timeout: float = 900

    def __post_init__(self):
        check_turns(self.max_experiments, self.agent_timeout)
        if isinstance(self.max_failed, bool) or int(self.max_failed) != self.max_failed or self.max_failed < 1:
            raise ValueError(f"--max-failed-turns must be a whole number >= 1, got {self.max_failed}")
        if not (self.backoff >= 0 and math.isfinite(self.backoff)):
            raise ValueError(f"--agent-backoff must be a number of seconds >= 0, got {self.backoff:g}")
        if self.max_cost is not None and not (self.max_cost > 0 and math.isfinite(self.max_cost)):
            raise ValueError(f"--max-cost must be a positive number of US dollars, got {self.max_cost:g}")

    def wait(self, failed):
        """Seconds to wait before the next turn after `failed` failed turns in a row."""
        # the exponent capped: past 2 ** 30 the wait is BACKOFF_MAX anyway, and a huge power overflows a float
        return min(BACKOFF_MAX, self.backoff * 2 ** min(failed - 1, 30)) if failed else 0.0


class AgentBroken(Exception):
    """max_failed agent turns in a row produced no experiment: the loop stopped; the message has the last error."""


def memory_facts(root, branch):
    """The run branch's rows from its baseline on, its noise floor and what its turn records add (the constants
    each edit changed, the harness's closing line for each)."""
    rows = [r for r in read_ledger(Path(root) / LEDGER_NAME) if r.branch == branch and r.status != "verify"]
    base = baseline_of(rows, branch)
    rows = rows[rows.index(base):] if base else rows
    sigma = None
    if rows:
        stored = load_noise(root, rows[0].hardware, rows[0].eval_profile, rows[0].budget)
        sigma = stored["spread"] if stored else spread(rows[0].values())
    records = [t for t in load_turns(root, branch) if isinstance(t.get("commit"), str) and t["commit"]]
    changed = {t["commit"]: [c for c in t.get("changed") or [] if isinstance(c, str)]
               if isinstance(t.get("changed"), list) else [] for t in records}
    return Facts(tuple(rows), sigma, changed,
                 {t["commit"]: t["result"] if isinstance(t.get("result"), str) else "" for t in records})


def read_notes(root):
    """The agent's notes for the next prompt, at most NOTES_CHARS of them, or None."""
    path = Path(root) / STATE_DIR / NOTES_FILE
    if not regular_file(path):  # a link an unconfined train.py made would carry any file into the prompt
        return None
    with open(path, "rb") as f:
        text = f.read(4 * NOTES_CHARS).decode("utf-8", "replace").strip()
    return (text[:NOTES_CHARS] + "\n[notes cut: keep them shorter]") if len(text) > NOTES_CHARS else text or None


def build_prompt(root, backend, budget, last_turn=None):
    """program.md plus where things stand: the file to edit, the best so far, the memory of the whole run, the
    agent's own notes, the last crash."""
    root = Path(root)
    repo = open_repo(root)
    branch = repo.active_branch.name
    facts = memory_facts(root, branch)
    rows = facts.rows
    program = (root / "program.md").read_text() if (root / "program.md").exists() else ""
    tag = hardware_tag(backend)
    lines = [program, "", "## This experiment", "",
             f"- backend: {backend}; the file to edit: backends/{backend}/train.py (nothing else)",
             f"- hardware: {tag}; run branch: {branch}; training budget: {budget:g} s"]
    best = best_kept(rows, rows[0].key()) if rows else None  # the ledger's one definition of the best
    if best:
        lines.append(f"- best kept so far: val_bpb {best.val_bpb:.6f} at commit {best.commit} ({best.description})")
    if rows:
        lines += ["", render(facts, MEMORY_CHARS)]
    notes = read_notes(root)
    if notes:
        lines += ["", f"## Your notes ({STATE_DIR}/{NOTES_FILE}, from your earlier turns)", "", notes]
    crash = root / STATE_DIR / "last_crash.log"
    if rows and rows[-1].status == "crash" and crash.exists():
        lines += ["", "The last experiment crashed; the end of its log:", "", crash.read_text()[-3000:]]
    if last_turn:
        lines += ["", f"Your previous turn: {last_turn}"]
    lines += ["", f"Edit backends/{backend}/train.py now, then write a one-line description of the change to "
              f"{STATE_DIR}/description. Do not run training yourself: the harness runs it after you exit. You may "
              f"keep notes for your next turns in {STATE_DIR}/{NOTES_FILE} (rewrite it whole; its first "
              f"{NOTES_CHARS:,} characters come back in the next prompt)."]
    # a NUL (from the notes, a crash's log) cannot go in a command line's argument, and means nothing in a prompt
    return "\n".join(lines).replace("\0", "\ufffd")


def changed_constants(before, after):
    """{name: (old, new)} of the hyperparameters an edit changed."""
    a, b = read_constants(before), read_constants(after)
    return {k: (a[k], b[k]) for k in b if k in a and a[k] != b[k]}


def describe_diff(before, after):
    """A description from the changed hyperparameters, for agents that leave none."""
    changes = [f"{k} {old} -> {new}" for k, (old, new) in changed_constants(before, after).items()]
    return ", ".join(changes) or "edit outside the hyperparameter block"


def set_aside(repo, label):
    """Undo what the agent changed without destroying it: its edits and new files go to a git stash entry."""
    if not changed_files(repo):
        return None
    with repo.git.custom_environment(**git_identity(repo)):
        repo.git.stash("push", "--include-untracked", "-m", label)
    return "stash@{0}"


class NoEdit(Exception):
    """The agent's turn produced no experiment; its changes were set aside. reason: why, for the next prompt;
    record: its turn's record."""

    def __init__(self, message, reason, record):
        super().__init__(message)
        self.reason = reason
        self.record = record


def turn_record(branch, agent, label, prompt, started, reply, **outcome):
    """A turn's audit record, saved: what the agent got and printed, how long it took, what its CLI reported, and
    outcome's fields (edited, error, description, changed)."""
    output, exit_code = getattr(reply, "output", "") or "", getattr(reply, "exit", None)
    usage = read_usage(output)
    record = {"id": new_id(label), "label": label, "branch": branch.name, "agent": agent.name,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
              "seconds": round(time.time() - started, 2), "exit": exit_code, "cost_usd": usage.cost_usd,
              "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens, "edited": False,
              "error": None, "description": None, "changed": [], "status": None, "commit": None, "result": None,
              "prompt_chars": len(prompt), "output_chars": len(output), "prompt": prompt, "output": capped(output)}
    record.update(outcome)
    save_turn(branch.root, record)
    return record


def close_turn(branch, record, outcome):
    """The turn's record with its experiment's outcome: the row's status and commit, the closing line."""
    record.update(status=outcome.status, result=outcome.message,
                  commit=outcome.row.commit if outcome.row is not None and outcome.status != "repeat" else None,
                  finished=now())
    save_turn(branch.root, record)


def agent_edit(branch, agent, label, last_turn, agent_timeout, event):
    """One agent turn on the run branch: the agent edits train.py, the edit is checked, and its description is
    returned with the turn's record (the description from the agent, else from the changed hyperparameters). No
    valid edit: NoEdit, the changes set aside in a git stash entry, never deleted."""
    root, backend, repo = branch.root, branch.backend, branch.repo
    before = train_file(backend, root).read_text()
    prompt = build_prompt(root, backend, branch.budget, last_turn)
    started, reply = time.time(), None
    try:
        reply = agent.edit(root, backend, prompt, agent_timeout)
        check_candidate(repo, backend)
    except (AgentFailed, Refused) as e:
        where = set_aside(repo, f"autoresearch {label}: {e}")
        record = turn_record(branch, agent, label, prompt, started, reply or e, error=str(e))
        raise NoEdit(f"agent {agent.name!r} produced no experiment: {e}"
                     + (f" (its changes set aside in git {where})" if where else ""), str(e), record) from None
    except BaseException:
        set_aside(repo, f"autoresearch {label}: interrupted while the agent worked")
        raise
    after = train_file(backend, root).read_text()
    # one printable line, whoever wrote it: it goes into the loop's log, the commit, the row and the next prompt
    description = one_line(reply.description or describe_diff(before, after), MAX_DESCRIPTION_CHARS) \
        or "(no description)"
    record = turn_record(branch, agent, label, prompt, started, reply, edited=True, description=description,
                         changed=sorted(changed_constants(before, after)))
    event(f"{label}: agent edited in {time.time() - started:.0f}s: {description}")
    return description, record


def make_agent(spec, seed=0):
    """The loop's agent: random, tpe, a preset's name (presets.PRESETS), or a command line."""
    if spec == "random":
        return RandomAgent(seed)
    if spec == "tpe":
        from .tpe import TPEAgent  # Optuna is an optional extra

        return TPEAgent(seed)
    return CommandAgent(expand(spec), spec if spec in PRESETS else None)


def check_turns(max_experiments, agent_timeout):
    """The loop's own options (loop and swarm): ValueError, before anything runs."""
    if max_experiments is not None and max_experiments < 0:
        raise ValueError(f"--max-experiments must be at least 0, got {max_experiments}")
    if not agent_timeout > 0:
        raise ValueError(f"--agent-timeout must be a positive number of seconds, got {agent_timeout:g}")


def run_loop(run, agent, rules=TurnRules(), on_event=print, on_line=None):
    """Repeat agent edit + experiment until interrupted, rules.max_experiments agent turns, or the agents' reported
    cost past rules.max_cost. Returns the outcomes. rules.max_failed turns in a row without an experiment:
    AgentBroken."""
    root, max_experiments = run.root, rules.max_experiments
    outcomes, turn, last_turn, failed, spent = [], 0, None, 0, 0.0
    log = state_dir(root) / "loop.log"

    def event(text):
        with open(log, "a") as f:  # plain: `tail -f` on the log must not act on what an agent wrote
            f.write(f"{time.strftime('%H:%M:%S')} {plain(text)}\n")
        on_event(text)

    check_cache()
    with open_branch(run, "loop", say=event) as branch:
        refuse_dirty(branch.repo)  # between turns the loop undoes changes: none may be the user's
        while max_experiments is None or turn < max_experiments:
            if failed:
                time.sleep(rules.wait(failed))
            turn += 1
            try:
                description, record = agent_edit(branch, agent, f"turn {turn}", last_turn, rules.agent_timeout, event)
            except NoEdit as e:
                last_turn, failed = f"no experiment: {e.reason}", failed + 1
                spent += e.record["cost_usd"] or 0.0
                event(f"turn {turn}: {e}")
                if failed >= rules.max_failed:
                    raise AgentBroken(f"loop stopped: {failed} agent turns in a row produced no experiment; the last: "
                                      f"{e.reason}") from None
            else:
                failed = 0
                spent += record["cost_usd"] or 0.0
                if rules.max_cost is not None and record["cost_usd"] is None and turn == 1:
                    event(f"note: agent {agent.name!r} reports no cost: --max-cost cannot stop this loop")
                check_cache()  # a broken cache is not the candidate's fault: stop with the edit still in the tree
                outcome = experiment(branch, description, on_line)
                outcomes.append(outcome)
                close_turn(branch, record, outcome)
                last_turn = f"{description}: {outcome.message}"
                best = branch.best()
                event(f"turn {turn}: {outcome.message}" + (f" | best {best.val_bpb:.6f}" if best else ""))
            if rules.max_cost is not None and spent > rules.max_cost:
                event(f"loop stopped: the agent's reported cost ${spent:.4f} passed --max-cost ${rules.max_cost:g}")
                break
    return outcomes
