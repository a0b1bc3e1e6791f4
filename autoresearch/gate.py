"""Keep rules: greedy (upstream), noise (beat the measured run-to-run spread), seeds (several seeds, a test)."""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

GATES = ("greedy", "noise", "seeds")
# A run that trained fewer tokens a second than this share of its series' typical rate was slowed by the machine
# (another job on its cores), not by its program: on a busy machine seeds trained at 737 and 1,772 tokens/s beside
# 6,538, and their spread made a noise floor 35 times the quiet machine's.
SLOWED_FRACTION = 0.7


@dataclass(frozen=True)
class Gate:
    kind: str = "noise"
    k: float = 2.0  # noise: keep when the gain exceeds k x spread; seeds: a first seed worse by k x spread is dropped
    seeds: int = 3  # seeds: at most this many runs of a candidate
    confidence: float = 0.9  # seeds: keep when P(candidate better) reaches this

    def __post_init__(self):
        if self.kind not in GATES:
            raise ValueError(f"unknown gate {self.kind!r}: choose one of {', '.join(GATES)}")
        if not (self.k >= 0 and math.isfinite(self.k)):
            raise ValueError(f"--k must be a finite number >= 0, got {self.k:g}")
        if isinstance(self.seeds, bool) or int(self.seeds) != self.seeds or self.seeds < 1:
            raise ValueError(f"--seeds must be a whole number >= 1, got {self.seeds}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must be between 0 and 1, got {self.confidence:g}")

    def most_runs(self):
        """Runs one experiment may take: the seeds gate's most, else one."""
        return self.seeds if self.kind == "seeds" else 1

    def label(self):
        return {"greedy": "greedy", "noise": f"noise(k={self.k:g})",
                "seeds": f"seeds(S={self.seeds},p={self.confidence:g})"}[self.kind]


@dataclass(frozen=True)
class Decision:
    keep: bool
    more: bool  # run another seed before deciding
    reason: str  # the numbers the decision used


def spread(samples):
    """Run-to-run standard deviation of val_bpb (sample std); None with fewer than two runs."""
    return statistics.stdev(samples) if len(samples) >= 2 else None


def _normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def decide(gate, candidate, best, sigma):
    """Keep, discard, or ask for another seed. candidate, best: val_bpb samples; sigma: the noise floor or None."""
    c, b = statistics.fmean(candidate), statistics.fmean(best)
    gain = b - c  # positive: the candidate is better (lower bpb)
    numbers = f"candidate {c:.6f} (n={len(candidate)}) vs best {b:.6f} (n={len(best)}), gain {gain:+.6f}"
    if gate.kind == "greedy" or sigma is None:
        why = "" if gate.kind == "greedy" else "; no noise floor measured, so greedy"
        return Decision(gain > 0, False, f"{numbers}: greedy keeps any gain{why}")
    if gate.kind == "noise":
        need = gate.k * sigma
        return Decision(gain > need, False, f"{numbers}, needs > {gate.k:g} x spread {sigma:.6f} = {need:.6f}")
    if len(candidate) == 1 and gain < -gate.k * sigma:
        return Decision(False, False, f"{numbers}: worse than {gate.k:g} x spread {sigma:.6f} after one seed, dropped")
    se = sigma * math.sqrt(1 / len(candidate) + 1 / len(best))
    p = _normal_cdf(gain / se)
    verdict = f"{numbers}, P(better) = {p:.3f} with sigma {sigma:.6f} (needs {gate.confidence:g})"
    if p >= gate.confidence:
        return Decision(True, False, verdict)
    if len(candidate) < gate.seeds:
        return Decision(False, True, verdict + ", another seed")
    return Decision(False, False, verdict)


@dataclass(frozen=True)
class Pace:
    slowed: bool
    reason: str  # the numbers the flag used


def judge_pace(rate, typical):
    """Whether a run trained far slower than its series' typical rate. rate, typical: tokens per second, or None
    where unknown (then never slowed: nothing to compare with). The typical rate is the fastest of the series'
    runs (see experiment.typical_rate): another job on the machine only ever slows a run down, so the fastest one
    is the nearest to what the machine does for this program when nothing else runs."""
    if rate is None or not typical:
        return Pace(False, "no throughput to compare")
    floor = SLOWED_FRACTION * typical
    numbers = (f"{rate:,.0f} tokens/s vs typical {typical:,.0f} "
               f"({'below' if rate < floor else 'at least'} {SLOWED_FRACTION:g} x = {floor:,.0f})")
    return Pace(rate < floor, numbers)


def noise_path(root):
    return Path(root) / ".autoresearch" / "noise.json"


def _key(hardware, profile, budget):
    return f"{hardware}|{profile}|{float(budget):g}"


def load_noise(root, hardware, profile, budget):
    """The stored noise floor {samples, spread, commit} for this hardware, profile and budget, or None."""
    path = noise_path(root)
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(_key(hardware, profile, budget))


def save_noise(root, hardware, profile, budget, samples, commit):
    path = noise_path(root)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[_key(hardware, profile, budget)] = {"samples": samples, "spread": spread(samples), "commit": commit}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
