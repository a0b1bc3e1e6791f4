"""What a training command is doing, for the person watching it: in a terminal a live line (what runs, seed i/k,
step, % of the budget, loss, tokens/s, the ETA of the whole command); on a pipe or in a file a plain progress line
at each run's first step and every PLAIN_EVERY seconds. On stderr only: stdout keeps the agent-facing lines
(the RESULT line; loop's turn lines)."""

import re
import statistics
import time

from rich.progress import BarColumn, Progress, TextColumn

from .calibrate import TIME_LIMIT
from .summary import parse_step

# experiment.measure's line before every run (the dashboard reads it too)
HEADER = re.compile(r"^=== \S+ seed \d+ budget")
PLAIN_EVERY = 10.0  # seconds between plain progress lines
OVERHEAD_GUESS = 20.0  # seconds of startup and evaluation per run, until a run was timed
CALIBRATION_GUESS = 2 * TIME_LIMIT  # its training steps plus a startup per rung
ALWAYS = ("calibrat", "auto:")  # harness lines printed without --verbose: rare, and they explain the wait


def clock(seconds):
    minutes, seconds = divmod(int(max(seconds, 0)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def describe_step(s, budget):
    """The parts of a progress line for the numbers of train.py's latest step (summary.parse_step)."""
    parts = [f"step {s['step']}" + (f" ({s['percent']:.0f}% of {budget:g}s)" if "percent" in s else "")]
    parts += [f"loss {s['loss']:.4f}"] if "loss" in s else []
    return parts + ([f"{s['tokens_per_sec']:,.0f} tok/s"] if "tokens_per_sec" in s else [])


class LiveProgress:
    """Fed every output line of a command's runs (on_line). runs: how many runs the current job has (setup's
    seeds; the seeds gate's most)."""

    def __init__(self, console, budget, label, runs=1, verbose=False):
        self.console, self.budget, self.label, self.runs, self.verbose = console, budget, label, runs, verbose
        self.bar = self.task = None
        self.run, self.run_started, self.durations = 0, None, []
        self.step, self.phase, self.calibration_started = {}, "starting", None
        self.last_plain, self.started = 0.0, time.time()

    def experiment(self, label):
        """A new job of the same command (loop: the next experiment)."""
        self.label, self.run, self.run_started, self.step, self.phase = label, 0, None, {}, "starting"

    def line(self, text):
        now = time.time()
        first_step, step = False, parse_step(text)
        if HEADER.match(text):
            if self.run_started is not None:
                self.durations.append(now - self.run_started)
            self.run, self.run_started, self.step, self.phase = self.run + 1, now, {}, "starting"
            self.calibration_started = None
        elif text.startswith("calibrate:"):
            self.calibration_started = self.calibration_started or now
            self.phase = "calibrating"
        elif step is not None:
            first_step = not self.step
            self.step, self.phase = step, "training"
        elif text.strip() == "---":  # the summary block: training is over, the harness's evaluation follows
            self.phase = "evaluating"
        if self.verbose or text.startswith(ALWAYS):
            (self.bar.console if self.bar else self.console).print(text, highlight=False, markup=False, soft_wrap=True)
        self.show(now, first_step)

    def status(self):
        parts = [self.label]
        if self.run:
            parts.append(f"seed {self.run}/{max(self.runs, self.run)}")
        if self.phase == "training":
            parts += describe_step(self.step, self.budget)
        else:
            parts.append(self.phase)
        return " | ".join(parts)

    def eta(self, now):
        """Seconds until the command (loop: the experiment) ends, from the runs timed so far."""
        per_run = statistics.fmean(self.durations) if self.durations else self.budget + OVERHEAD_GUESS
        left = per_run * max(self.runs - max(self.run, 1), 0)
        left += max(per_run - (now - self.run_started), 0) if self.run_started else per_run
        if self.calibration_started:
            left += max(CALIBRATION_GUESS - (now - self.calibration_started), 0)
        return left

    def show(self, now, first_step):
        eta = self.eta(now)
        if not self.console.is_terminal:
            if self.phase == "training" and (first_step or now - self.last_plain >= PLAIN_EVERY):
                self.last_plain = now
                self.console.print(f"progress: {self.status()} | eta {clock(eta)}", highlight=False, markup=False,
                                   soft_wrap=True)
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[times]}"),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=1.0, times="")
        done = now - self.started
        self.bar.update(self.task, description=self.status()[:80], completed=done / max(done + eta, 1e-9),
                        times=f"{clock(done)} elapsed, eta {clock(eta)}")

    def close(self):
        """Take the live line off the terminal before other output (a result: the run timed so far is over); the
        next line brings it back."""
        if self.run_started is not None:
            self.durations.append(time.time() - self.run_started)
            self.run_started = None
        if self.bar is not None:  # a bar never started is not stopped: stopping prints an empty line
            self.bar.stop()
            self.bar = self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
