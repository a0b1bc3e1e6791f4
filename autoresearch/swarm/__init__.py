"""The swarm: one run branch explored by several workers at once, on Ray (`pip install -e '.[swarm]'`).

Each worker is a Ray actor holding one GPU, or a share of a CPU box's cores, with its own clone of the repository
and its own copy of the run branch on its node. It runs the loop's turn there: agent edit, experiment, gate. The
driver's checkout is the one ledger and the merged branch: every row lands there tagged with its worker, and a
kept result that still beats the swarm's best becomes it, so every worker starts its next turn from it.

The package: plan (what the user asked for, what each worker is given), transport (git bundles between the
driver's repository and the workers' clones), worker (the Ray actor), cluster (Ray itself: starting it, its signals,
its errors), driver (the one ledger and the merged branch)."""

from .driver import Claims, absorb, run_swarm
from .plan import Plan, SwarmError
from .transport import OUT_REF, Report, make_bundle

__all__ = ["Claims", "OUT_REF", "Plan", "Report", "SwarmError", "absorb", "make_bundle", "run_swarm"]
