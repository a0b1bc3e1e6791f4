"""Keep rules on controlled numbers, never-repeat and verify on a real temporary run branch."""


import git
import pytest

from autoresearch.branch import open_branch
from autoresearch.experiment import find_repeat, run_experiment, setup, verify
from autoresearch.gate import Gate, decide, load_noise, spread
from autoresearch.hparams import set_constants
from autoresearch.ledger import read_ledger
from autoresearch.settings import Run
from conftest import PROFILE, make_repo

SIGMA = 0.01


def test_greedy_keeps_any_gain_and_no_tie():
    g = Gate("greedy")
    assert decide(g, [0.999], [1.0], SIGMA).keep
    assert not decide(g, [1.0], [1.0], SIGMA).keep  # a tie is not an improvement
    assert not decide(g, [1.001], [1.0], None).keep


def test_noise_gate_needs_k_times_spread():
    g, sigma = Gate("noise", k=2), 0.125  # binary-exact numbers, so the boundary is exact
    assert not decide(g, [0.875], [1.0], sigma).keep  # gain 0.125 < 0.25
    assert not decide(g, [0.75], [1.0], sigma).keep  # exactly k x spread is not enough
    d = decide(g, [0.5], [1.0], sigma)
    assert d.keep and not d.more and "needs > 2 x spread 0.125000 = 0.250000" in d.reason
    # no measured floor: falls back to greedy and says so
    d = decide(g, [0.999], [1.0], None)
    assert d.keep and "no noise floor" in d.reason
    # a multi-seed best is compared by its mean (0.75): a gain of exactly 0.25 again
    assert not decide(g, [0.5], [1.0, 0.5], sigma).keep


def test_seeds_gate_drops_clear_losers_asks_for_more_and_keeps_at_confidence():
    g = Gate("seeds", k=2, seeds=3, confidence=0.9)
    d = decide(g, [1.03], [1.0], SIGMA)  # one seed, worse by 3 sigma
    assert not d.keep and not d.more and "dropped" in d.reason
    d = decide(g, [0.995], [1.0], SIGMA)  # one seed, a little better: unsure
    # z = 0.005 / (0.01 * sqrt(2)) = 0.354, P = 0.638
    assert not d.keep and d.more and "P(better) = 0.638" in d.reason
    d = decide(g, [0.995, 0.99, 0.985], [1.0], SIGMA)  # all S seeds, mean 0.99: z = 0.866, P = 0.807
    assert not d.keep and not d.more and "P(better) = 0.807" in d.reason
    d = decide(g, [0.98, 0.975], [1.0, 1.0], SIGMA)  # z = 0.0225 / 0.01 = 2.25, P = 0.988
    assert d.keep and "P(better) = 0.988" in d.reason
    d = decide(g, [0.99, 0.99, 0.99], [1.0, 1.0, 1.0], SIGMA)  # z = 0.01 / (0.01 * sqrt(2/3)) = 1.22, P = 0.889
    assert not d.keep and not d.more and "P(better) = 0.890" in d.reason
    d = decide(g, [1.0], [1.0], SIGMA)  # a tie after one seed: run more
    assert d.more and "P(better) = 0.500" in d.reason


def test_spread_of_samples():
    assert spread([1.0]) is None
    assert spread([1.0, 1.02]) == pytest.approx(0.0141421356)
    with pytest.raises(ValueError, match="unknown gate"):
        Gate("lucky")


@pytest.fixture
def branch(tmp_path, use_cache):
    return make_repo(tmp_path / "project", backends=("mlx",))


def test_noise_floor_never_repeat_and_verify(branch):
    budget = 2
    out = setup(Run.resolve(branch, "mlx", budget), "g", noise_runs=2)
    assert out.status == "keep" and "noise floor" in out.message
    base = read_ledger(branch / "results.tsv")[0]
    assert len(base.values()) == 2 and base.seed == 42
    noise = load_noise(branch, base.hardware, PROFILE, budget)
    assert noise["spread"] == pytest.approx(spread(base.values()), abs=1e-6) and noise["commit"] == base.commit
    assert base.val_bpb == pytest.approx(sum(base.values()) / 2, abs=1e-6)

    train = branch / "backends/mlx/train.py"
    original = train.read_text()
    # the baseline program again, only reformatted and commented: answered from the ledger
    train.write_text("# same program, new comment\n" + original.replace("DEPTH = 2", "DEPTH =  2"))
    repo = git.Repo(branch)
    head = repo.head.commit.hexsha
    with open_branch(Run.resolve(branch, "mlx", budget), "test") as run_branch:
        assert find_repeat(run_branch).commit == base.commit
    out = run_experiment(Run.resolve(branch, "mlx", budget), "no real change")
    assert out.status == "repeat" and base.commit in out.message and "not run again" in out.message
    assert train.read_text() == original and repo.head.commit.hexsha == head
    assert len(read_ledger(branch / "results.tsv")) == 1

    # a real change under the greedy gate, then verify whatever is best
    train.write_text(set_constants(original, {"MATRIX_LR": 0.06}))
    out = run_experiment(Run.resolve(branch, "mlx", budget, gate=Gate("greedy")), "MATRIX_LR 0.06")
    assert out.status in ("keep", "discard") and out.row.gate == "greedy"
    out = verify(Run.resolve(branch, "mlx", budget, seed=1000), runs=2)
    assert out.status in ("holds", "regressed")
    assert "recorded" in out.message and "re-run mean" in out.message and "spread" in out.message
    rows = read_ledger(branch / "results.tsv")
    assert rows[-1].status == "verify" and len(rows[-1].values()) == 2 and rows[-1].seed == 1000
    best = min((r for r in rows if r.status == "keep"), key=lambda r: r.val_bpb)
    assert rows[-1].commit == best.commit
    # beside it, the holdout the keep was never selected on, recorded and re-run
    assert f"holdout: recorded {best.holdout_bpb:.6f}, re-run {rows[-1].holdout_bpb:.6f}" in out.message
    regression = rows[-1].val_bpb - best.val_bpb
    assert (out.status == "holds") == (regression <= 2 * noise["spread"] + 1e-9)
