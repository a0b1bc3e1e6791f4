"""The harness's clock: how long a training run may take, from the trainer's spawn to its exit."""

from dataclasses import dataclass

OVERRUN_FRACTION = 0.05  # training may pass the budget by 5 % or one step, whichever is longer...
EXIT_SECONDS = 3.0  # ...plus saving the weights and the interpreter's exit after the last step
DEFAULT_STARTUP_SECONDS = 120.0  # before the branch has a baseline to measure startup by: a cold GPU compile
STARTUP_SLACK_SECONDS = 10.0  # on top of twice the baseline's startup
SCORING_SLACK_SECONDS = 10.0  # on top of three times the baseline's evaluation


@dataclass(frozen=True)
class Clock:
    """How long a training run may take by the harness's clock, from the trainer's spawn to its exit: a startup
    allowance (imports, model build, step 0's compile), the budget and the last step's overrun, the allowances
    fixed before the run from the branch's baseline, never from the candidate's own output."""
    budget: float
    startup: float  # seconds allowed before training starts
    step: float | None  # the last step's allowance; None: the run's own step interval (the baseline's runs)
    evaluation: float | None = None  # seconds scoring may take once the model is built; None: no baseline yet

    @classmethod
    def for_baseline(cls, budget, baseline):
        """The clock a run branch's candidates get: twice the baseline's startup plus slack (a loaded machine, a
        slower compile) and twice its step. Before a baseline (setup, a manual run): generous defaults."""
        if baseline is None or baseline.startup_seconds <= 0:
            return cls(budget, DEFAULT_STARTUP_SECONDS, None)
        evaluation = 3 * baseline.eval_seconds + SCORING_SLACK_SECONDS if baseline.eval_seconds > 0 else None
        return cls(budget, 2 * baseline.startup_seconds + STARTUP_SLACK_SECONDS, 2 * baseline.step_seconds, evaluation)

    def judge(self, result):
        """Why a finished run is not scored for its time, or None. Two spans: from the spawn to the first progress
        line (the end of step 0: imports, build, compile) within the startup allowance, so no training hides before
        it; from there to the exit within the budget and the last step, so none hides after it."""
        measured = result.measured_training()
        if measured is None:
            return "no progress lines (`step N ...`): the harness cannot time the training"
        seconds, startup = measured
        if startup > self.startup:
            return (f"took {startup:.1f}s from spawn to its first progress line by the harness's clock, over the "
                    f"{self.startup:.1f}s startup allowance")
        step = self.step if self.step is not None else result.step_interval()
        allowed = self.budget + max(OVERRUN_FRACTION * self.budget, step) + EXIT_SECONDS
        if seconds > allowed:
            claimed = (result.summary or {}).get("training_seconds", float("nan"))
            return (f"trained {seconds:.1f}s by the harness's clock (train.py says {claimed:g}s), over the "
                    f"{self.budget:g}s budget + {allowed - self.budget:.1f}s margin")
        return None
