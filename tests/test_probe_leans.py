"""
evaluate.score's one-sided tests (the causality rows' lean, the probe rows' drift) against models that know which
process they run in, the strongest form of a cheat the sandbox leaves possible: each keeps every position under the
low-precision tolerance, so only the sum over the rows can show it. The two processes are stand-ins that answer
with a bigram model of the real validation rows; the real children and their sandbox are test_evaluate's.
"""

import re

import numpy as np
import pytest

import prepare
from autoresearch.evaluate import LOW_PRECISION_TOLERANCE, score


class Bigram:
    """A child as score() sees it: the log-probabilities of a bigram model fitted to the rows, in float32, plus a bump
    on the logit of each position's next input token (a lookahead) and, where noise is given, independent noise on
    every logit (kernels that are not bitwise deterministic). signed: the bump's sign at each position a hash of the
    prefix, positive 7 times in 10, the same in both processes (noise a model makes itself, to spread the lean)."""

    def __init__(self, table, bump=0.0, noise=0.0, seed=0, signed=False):
        self.table, self.bump, self.noise, self.signed = table, bump, noise, signed
        self.rng = np.random.default_rng(seed)

    def hello(self):
        return {"rows_per_chunk": 8, "dtype": "bfloat16", "seconds": 0.0, "device": "cpu"}

    def logits(self, inputs, vocab, first=0):
        for i, row in enumerate(inputs):
            out = self.table[row]  # fancy indexing: a fresh (T, V) array, which the harness may overwrite
            if self.noise:
                out += self.rng.normal(0.0, self.noise, out.shape).astype(np.float32)
            bump = np.full(len(row) - 1, self.bump, dtype=np.float32)
            if self.signed:  # the last two tokens and the position: a function of the prefix
                key = (row[1:].astype(np.int64) * 2654435761 + row[:-1] * 40503 + np.arange(len(row) - 1)) % 10
                bump[key >= 7] *= -1
            out[np.arange(len(row) - 1), row[1:]] += bump
            yield first + i, out


class Overflow(Bigram):
    """A full lookahead at float32's limits: +3e38 on the next input token's logit, -3e38 on every other, alike in
    both processes. Float32 log-probabilities of it are 0 and -inf, and the two processes' -inf less -inf is NaN."""

    def logits(self, inputs, vocab, first=0):
        for i, (_, out) in enumerate(super().logits(inputs, vocab, first)):
            out[:-1] = -3e38
            out[np.arange(len(inputs[i]) - 1), inputs[i, 1:]] = 3e38
            yield first + i, out


@pytest.fixture(scope="module")
def bigram(cpu_cache):
    """The validation rows and a bigram table fitted to them (add-0.1 smoothing), as log-probabilities."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    rows, vocab = prepare.get_val_rows(), prepare.get_token_bytes().shape[0]
    mp.undo()
    counts = np.full((vocab, vocab), 0.1, dtype=np.float32)
    np.add.at(counts, (rows[:, :-1].ravel(), rows[:, 1:].ravel()), 1.0)
    return rows, vocab, np.log(counts / counts.sum(axis=1, keepdims=True))


def scored(bigram, main, reference):
    rows, vocab, _ = bigram
    lines = []
    status, val_bpb, reason, _ = score(main, reference, (rows, rows[:0]), vocab, lines.append, lambda: None)
    return status, val_bpb, reason


# A bump b on a logit moves a log-probability by at most b: 0.0099 on both sides keeps every position of every row
# under the 0.02 tolerance (the real token's gain in one process and its loss in the other add up to 2b).
BUMP = 0.0099
assert 2 * BUMP < LOW_PRECISION_TOLERANCE
NOISE = 0.002


def test_a_lookahead_only_where_the_model_is_scored_is_invalid(bigram, use_cache):
    """+b in the scoring process and -b in the reference cancel in the lean at the splice; the drift doubles."""
    status, val_bpb, reason = scored(bigram, Bigram(bigram[2], BUMP), Bigram(bigram[2], -BUMP))
    assert status == "invalid" and val_bpb is None, reason
    # 31 where a spliced row is cut at 1 (no position shown alike to both)
    assert re.match(r"purity probe: over 3[12] rows, the scoring process gave the tokens that really came next \+0\.0",
                    reason), reason
    assert ("standard errors of their spread; at most 5 or 0.001 nats): the model does better on what it scores where it "
            "is scored") in reason, reason


@pytest.mark.parametrize("reference_bump", [BUMP, 0.0])
def test_a_lookahead_in_both_processes_or_in_the_scoring_one_is_invalid(bigram, use_cache, reference_bump):
    status, val_bpb, reason = scored(bigram, Bigram(bigram[2], BUMP), Bigram(bigram[2], reference_bump))
    assert status == "invalid" and val_bpb is None, reason
    assert reason.startswith("causality probe: over 16 spliced rows"), reason


def test_it_would_have_gained_and_an_honest_model_with_noisy_kernels_is_scored(bigram, use_cache):
    """Independent noise on every logit of both processes, as much as the per-position tolerance lets through (its
    largest difference over a row's 256 x 4,096 log-probabilities is about 0.014 nats), passes every evaluation; the
    cheat's number, had it been scored, was better than the honest one."""
    table = bigram[2]
    honest = []
    for seed in range(5):
        status, val_bpb, reason = scored(bigram, Bigram(table, noise=NOISE, seed=2 * seed),
                                         Bigram(table, noise=NOISE, seed=2 * seed + 1))
        assert status == "ok", reason
        honest.append(val_bpb)
    status, _, reason = scored(bigram, Bigram(table, BUMP), Bigram(table, -BUMP))
    cheat = float(reason.rsplit("it would have been val_bpb ", 1)[1].rstrip(")"))
    assert cheat < min(honest), (cheat, honest)


def test_noise_a_model_makes_alike_in_both_processes_does_not_hide_a_lookahead(bigram, use_cache):
    """+-0.015 on the next token's logit, positive 7 times in 10 (a mean of +0.006 nats a position): the lean's values
    are spread as widely as their mean, so their own standard error would pass it (found by an attack: 8 runs of 8
    scored ok); the purity rows' positions, where both processes add the same, are not spread at all."""
    table = bigram[2]
    status, val_bpb, reason = scored(bigram, Bigram(table, 0.015, signed=True), Bigram(table, 0.015, signed=True))
    assert status == "invalid" and val_bpb is None, reason
    assert reason.startswith("causality probe: over 16 spliced rows"), reason
    assert "standard errors of the purity rows' spread; at most 5 or 0.001 nats" in reason, reason


def test_logits_at_float32s_limits_are_compared_and_a_lookahead_there_is_invalid(bigram, use_cache):
    status, val_bpb, reason = scored(bigram, Overflow(bigram[2]), Overflow(bigram[2]))
    assert status == "invalid" and val_bpb is None, reason
    assert reason.startswith("causality probe: the next-token distribution at position "), reason
    assert re.search(r"moved by 6e\+38 nats", reason), reason
    # had it been scored: a loss of 0 at every position it saw the next token of
    assert float(reason.rsplit("it would have been val_bpb ", 1)[1].rstrip(")")) < 0.1, reason
