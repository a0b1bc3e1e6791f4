"""The agent's turns, one audit record each in .autoresearch/turns/: the prompt it got, what it printed, how long it
took, its outcome and, where its CLI reports them, the tokens and the cost."""

import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .ledger import one_line

TURNS_DIR = "turns"  # in .autoresearch/
MAX_OUTPUT_CHARS = 20_000  # of the agent's output kept in its record: the head and the end, where errors are
MAX_READ_BYTES = 4 << 20  # of agent.log read for the usage: a CLI's JSON result comes last
MAX_RECORD_BYTES = 4 << 20  # a turn record holds a capped prompt and output: a larger file is none of the harness's


@dataclass(frozen=True)
class Usage:
    """What the agent's CLI reported of its turn; None where it reported nothing."""
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None  # the CLI said the turn failed (a JSON result with is_error), in its words


def _number(value):
    """A reported cost, token count or duration: a finite number of at least 0, else None (a negative cost would
    pay back --max-cost; an integer too large for a float would raise in the sums)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return value if math.isfinite(value) and value >= 0 and abs(value) < 1e18 else None
    except OverflowError:
        return None


def _documents(text):
    """The JSON objects of an output: the whole of it (Claude Code, Gemini CLI), or one per line (Codex's events)."""
    try:
        whole = json.loads(text)
        return [whole] if isinstance(whole, dict) else []
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        pass
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(doc, dict):
                found.append(doc)
    return found


def _add(total, value):
    value = _number(value)
    return total if value is None else (total or 0) + value


def read_usage(text):
    """The cost and tokens a CLI printed: Claude Code's total_cost_usd and usage, Codex's usage per turn, Gemini
    CLI's stats.models.*.tokens. An output with none of them is Usage() (a plain-text CLI, the random agent)."""
    cost = tokens_in = tokens_out = error = None
    for doc in _documents(text):
        cost = _add(cost, doc.get("total_cost_usd", doc.get("cost_usd")))
        usage = doc.get("usage")
        if isinstance(usage, dict):
            tokens_in = _add(tokens_in, usage.get("input_tokens"))
            for cached in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                tokens_in = _add(tokens_in, usage.get(cached))
            tokens_out = _add(tokens_out, usage.get("output_tokens"))
        models = (doc.get("stats") or {}).get("models") if isinstance(doc.get("stats"), dict) else None
        for model in (models or {}).values():
            tokens = model.get("tokens") if isinstance(model, dict) else None
            if isinstance(tokens, dict):
                tokens_in = _add(tokens_in, tokens.get("prompt"))
                tokens_out = _add(tokens_out, tokens.get("candidates"))
        if doc.get("is_error") is True:
            error = one_line(str(doc.get("result") or doc.get("subtype") or "error"), 300)
    return Usage(cost, tokens_in, tokens_out, error)


def capped(text, limit=MAX_OUTPUT_CHARS):
    """text within limit characters: its head and its end, the middle marked as cut."""
    if len(text) <= limit:
        return text
    head = limit // 5
    return text[:head] + f"\n[... {len(text) - limit:,} characters cut ...]\n" + text[-(limit - head):]


def turns_dir(root):
    return Path(root) / ".autoresearch" / TURNS_DIR


def new_id(label):
    """A record's file name: when, which process, which turn: unique across loops and swarm workers."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{label.replace(' ', '-')}"


def save_turn(root, record):
    """Write a turn's record whole (beside itself, then renamed over): a reader sees the old one or the new."""
    folder = turns_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['id']}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_turns(root, branch=None):
    """Every readable turn record of the checkout (of one run branch), oldest first; a damaged one is skipped."""
    folder = turns_dir(root)
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:  # a regular file of a record's size, never a fifo or a link (a train.py run unconfined may plant one)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    continue
                record = json.loads(f.read(MAX_RECORD_BYTES + 1))  # past the cap: cut, so no JSON
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(record, dict) and (branch is None or record.get("branch") == branch):
            found.append(record)
    return sorted(found, key=lambda r: str(r.get("started", "")))


def turn_summary(records):
    """The figures `results` and the dashboard show: turns, those without an experiment, agent seconds, and the
    reported cost and tokens (None where no turn reported them)."""
    def total(key):
        values = [r[key] for r in records if _number(r.get(key)) is not None]
        return round(sum(values), 6) if values else None

    return {"turns": len(records), "no_experiment": sum(not r.get("edited") for r in records),
            "seconds": round(sum(_number(r.get("seconds")) or 0 for r in records), 1), "cost_usd": total("cost_usd"),
            "input_tokens": total("input_tokens"), "output_tokens": total("output_tokens")}
