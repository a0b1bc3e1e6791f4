"""Agents that edit train.py between experiments: any command line (an LLM CLI), or the built-in random search."""

import math
import random
import shlex
import subprocess
from pathlib import Path

from . import train_file
from .hparams import read_constants, set_constants

DESCRIPTION_FILE = "description"  # in .autoresearch/: the agent's one-line summary of its change

# name: (kind, low, high) — sane ranges around upstream's recipe; "log" values move multiplicatively
SEARCH_SPACE = {
    "MATRIX_LR": ("log", 0.005, 0.2),
    "EMBEDDING_LR": ("log", 0.05, 2.0),
    "UNEMBEDDING_LR": ("log", 0.0005, 0.05),
    "SCALAR_LR": ("log", 0.05, 2.0),
    "WEIGHT_DECAY": ("lin", 0.0, 0.5),
    "WARMUP_RATIO": ("lin", 0.0, 0.2),
    "WARMDOWN_RATIO": ("lin", 0.1, 0.9),
    "DEPTH": ("int", 1, 16),
    "ASPECT_RATIO": ("choice", 32, 48, 64, 96, 128),
    "WINDOW_PATTERN": ("choice", "L", "SL", "SSL", "SSSL"),
    "TOTAL_BATCH_SIZE": ("pow2", 2**10, 2**20),
}


class AgentFailed(Exception):
    """The agent did not produce an edit (timeout, non-zero exit); the loop logs it and goes on."""


def _perturb(name, value, rng):
    kind, *args = SEARCH_SPACE[name]
    if kind == "log":
        low, high = args
        return float(f"{min(high, max(low, value * math.exp(rng.uniform(-0.7, 0.7)))):.4g}")
    if kind == "lin":
        low, high = args
        return round(min(high, max(low, value + rng.uniform(-0.15, 0.15) * (high - low))), 3)
    if kind == "int":
        low, high = args
        return min(high, max(low, value + rng.choice((-2, -1, 1, 2))))
    if kind == "pow2":
        low, high = args
        return min(high, max(low, value * rng.choice((2, 1 / 2))))
    return rng.choice([c for c in args if c != value] or args)


def random_edit(path, rng, min_tokens_per_step=None, n_changes=None):
    """Perturb one or two hyperparameters of the file in place; return the description."""
    source = Path(path).read_text()
    constants = read_constants(source)
    names = sorted(n for n in SEARCH_SPACE if n in constants)
    for _ in range(100):
        picked = rng.sample(names, n_changes or rng.choice((1, 1, 2)))
        updates = {n: _perturb(n, constants[n], rng) for n in picked}
        updates = {n: (int(v) if isinstance(constants[n], int) else v) for n, v in updates.items()}
        updates = {n: v for n, v in updates.items() if v != constants[n]}
        if not updates:
            continue
        total = updates.get("TOTAL_BATCH_SIZE", constants.get("TOTAL_BATCH_SIZE"))
        if min_tokens_per_step and total is not None and total % min_tokens_per_step:
            continue  # the batch must stay a whole number of device batches
        Path(path).write_text(set_constants(source, updates))
        return ", ".join(f"{n} {constants[n]} -> {v}" for n, v in updates.items())
    raise AgentFailed("random agent found no valid perturbation")


class RandomAgent:
    """No-LLM baseline: random search over the hyperparameter block, reproducible from its seed."""

    name = "random"

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def edit(self, root, backend, prompt, timeout):
        import prepare

        source = read_constants(train_file(backend, root).read_text())
        step_tokens = source.get("DEVICE_BATCH_SIZE", 1) * prepare.load_profile().seq_len
        return random_edit(train_file(backend, root), self.rng, min_tokens_per_step=step_tokens)


class CommandAgent:
    """Any agent CLI, started fresh per experiment. The prompt goes on stdin, or replaces {prompt}."""

    def __init__(self, command):
        self.command = command
        self.name = command

    def edit(self, root, backend, prompt, timeout):
        args = shlex.split(self.command)
        stdin = prompt
        if any("{prompt}" in a for a in args):
            args, stdin = [a.replace("{prompt}", prompt) for a in args], None
        log = Path(root) / ".autoresearch" / "agent.log"
        with open(log, "w") as out:
            try:
                proc = subprocess.run(args, cwd=root, input=stdin, stdout=out, stderr=subprocess.STDOUT,
                                      text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AgentFailed(f"agent timed out after {timeout:.0f}s") from None
            except OSError as e:
                raise AgentFailed(f"agent could not start: {e}") from None
        if proc.returncode != 0:
            raise AgentFailed(f"agent exited with {proc.returncode} (output in .autoresearch/agent.log)")
        note = Path(root) / ".autoresearch" / DESCRIPTION_FILE
        if note.exists():
            text = " ".join(note.read_text().split())
            note.unlink()
            if text:
                return text
        return None  # the loop describes the change from the diff of the hyperparameters


def make_agent(spec, seed=0):
    return RandomAgent(seed) if spec == "random" else CommandAgent(spec)
