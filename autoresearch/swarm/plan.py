"""What the user asked of the swarm, and what each worker is given to start."""

from dataclasses import dataclass

from ..loop import check_turns
from ..settings import Run


class SwarmError(Exception):
    """The swarm cannot go on (every worker lost); what it recorded stays recorded."""


@dataclass(frozen=True)
class Plan:
    """How the swarm runs: the same for every worker, fixed at the start."""
    workers: int
    agent: str = "random"  # random, or a command line
    agent_seed: int = 0  # worker i's random agent is seeded agent_seed + i
    agent_timeout: float = 900
    max_experiments: int | None = None  # agent turns with a result, all workers together
    address: str | None = None  # None or "local": a Ray instance of this machine's; "auto", "ray://...": a cluster
    tag: str | None = None  # set up the run branch autoresearch/<tag>-<workers' hardware> on worker 0 first
    noise_runs: int = 3  # with tag: the baseline's seeds
    calibrate: bool = True  # with tag: size the model for the workers' hardware first
    restart_timeout: float = 180  # seconds a worker that died has to answer again as Ray restarts it, else given up

    def __post_init__(self):
        if isinstance(self.workers, bool) or int(self.workers) != self.workers or self.workers < 1:
            raise ValueError(f"--workers must be a whole number >= 1, got {self.workers}")
        if self.noise_runs < 1:
            raise ValueError(f"--noise-runs must be at least 1, got {self.noise_runs}")
        if not self.restart_timeout > 0:
            raise ValueError(f"--restart-timeout must be more than 0 seconds, got {self.restart_timeout}")
        check_turns(self.max_experiments, self.agent_timeout)


@dataclass(frozen=True)
class Spec:
    """What a worker needs to start: its part of the plan and the run it measures (in its own clone: Run.at)."""
    swarm: str  # names the workers' clones: one swarm per driver checkout
    run: Run
    plan: Plan
    cores: int  # CPU cores per worker, pinned where the OS allows; 0 for GPU workers
    cache: str | None  # on a local Ray instance, the driver's AUTORESEARCH_CACHE; on a cluster, each node's own
