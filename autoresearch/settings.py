"""A command's run settings, resolved once at the command line's edge: the one object every layer below reads."""

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import prepare

from . import sandbox
from .gate import Gate

BUDGET_ENV = "AUTORESEARCH_BUDGET"  # the override for tests and smoke runs; train.py reads it too
MIN_GRACE_SECONDS = 120  # startup, compilation and evaluation on top of the training budget


def check_budget(budget):
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"--budget must be a positive number of seconds, got {budget:g}")
    return float(budget)


def default_timeout(budget):
    """The hard limit of one training run: the budget and as much again, at least two minutes more."""
    return budget + max(budget, MIN_GRACE_SECONDS)  # 10 minutes for the 5-minute budget


@dataclass(frozen=True)
class Run:
    """What every training run of one command shares: the checkout, the series it measures (backend, budget, eval
    profile, sandbox) and how each run goes (seed, hard limit, keep rule). Validated on creation."""
    root: Path
    backend: str
    budget: float
    profile: str
    seed: int = 42
    timeout: float | None = None  # hard limit per training run; None: default_timeout(budget)
    gate: Gate = Gate()
    sandbox: str = "none"  # the kind that confines its untrusted processes (sandbox.active())

    def __post_init__(self):
        check_budget(self.budget)
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout:g}")

    @classmethod
    def resolve(cls, root, backend, budget=None, fallback=None, **how):
        """The run for this checkout's prepared cache. Its budget: as given, else the environment's override, else
        fallback (transfer: the run branch's baseline's), else the eval profile's. how: seed, timeout, gate.
        ValueError for a bad option, prepare.PrepareError without a prepared cache."""
        if budget is not None:
            check_budget(budget)  # a bad --budget is said before a missing cache
        profile = prepare.load_profile()
        if budget is None and fallback is not None and not os.environ.get(BUDGET_ENV):
            budget = fallback
        if budget is None:
            budget = prepare.time_budget(profile)  # the override, validated there, else the profile's
        return cls(Path(root), backend, float(budget), profile.name, sandbox=sandbox.active().kind, **how)

    @property
    def hard_limit(self):
        return self.timeout if self.timeout is not None else default_timeout(self.budget)

    def at(self, root):
        """The same run in another checkout (a swarm worker's clone), under that process's sandbox."""
        return replace(self, root=Path(root), sandbox=sandbox.active().kind)
