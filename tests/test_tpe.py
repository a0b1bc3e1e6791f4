"""--agent tpe: Optuna's TPE fitted to the series' rows, on a fixture ledger (a known objective, no training). Each
proposal is a fresh agent's, as after a restart: the study is the ledger. The real CLI with real training, two
swarm workers sharing the study, is tests/test_swarm.py's."""

import json
import math
import random
import statistics

import git
import pytest

from conftest import ROOT, make_repo
from autoresearch.agents import AgentFailed
from autoresearch.loop import make_agent
from autoresearch.hparams import block_json, read_constants
from autoresearch.ledger import LEDGER_NAME, Row, append_row
from autoresearch.tpe import LOG_SPAN, TPEAgent, distributions, flatten

BRANCH = "autoresearch/t-mlx-cpu"
TRAIN = "backends/mlx/train.py"


def objective(c):
    """A made-up val_bpb: lower with a higher MATRIX_LR, a little noise from the rest, nothing else matters."""
    return 2.0 - 0.3 * math.log(c["MATRIX_LR"] / 0.04) + 0.001 * c["WEIGHT_DECAY"]


def ledger_row(i, constants, status="discard", description=None, worker="-"):
    value = objective(flatten(constants)) if status != "crash" else 0.0
    return Row(commit=f"{i:07x}", val_bpb=value, memory_gb=1.0, status=status,
               description=description or f"trial {i}", hardware="mlx-cpu", backend="mlx", eval_profile="smoke",
               budget=3.0, seed=42, timestamp=f"2026-01-01T00:{i:02d}:00+0000", training_seconds=3.0, num_steps=10,
               num_params_M=0.9, tokens=1000, config="-", gate="greedy", train_hash=f"h{i}", branch=BRANCH,
               samples=f"{value:.6f}" if status != "crash" else "-", worker=worker,
               params=json.dumps(constants, separators=(",", ":")))


@pytest.fixture
def study_repo(tmp_path, use_cache):
    """A checkout on a run branch whose ledger holds a baseline and nothing else yet."""
    root = make_repo(tmp_path / "project", backends=("mlx",))
    repo = git.Repo(root)
    repo.git.checkout("-b", BRANCH)
    base = read_constants((root / TRAIN).read_text())
    append_row(root / LEDGER_NAME, ledger_row(0, base, "keep", "baseline"))
    return root, base


def propose(root, seed=0):
    """One TPE turn: its edit read back, then undone (the caller records it as a row)."""
    path = root / TRAIN
    before = path.read_text()
    reply = TPEAgent(seed).edit(root, "mlx", "prompt", 60)
    after = read_constants(path.read_text())
    path.write_text(before)
    return after, reply


def test_proposals_move_where_the_ledger_says_it_is_better(study_repo):
    root, base = study_repo
    rng = random.Random(1)
    low, high = base["MATRIX_LR"] / LOG_SPAN, base["MATRIX_LR"] * LOG_SPAN
    # history another agent left: 12 rows spread over the box at random, one direction clearly better
    for i in range(1, 13):
        c = dict(base, MATRIX_LR=round(math.exp(rng.uniform(math.log(low), math.log(high))), 5),
                 WEIGHT_DECAY=round(rng.uniform(0, 0.45), 3))
        append_row(root / LEDGER_NAME, ledger_row(i, c, worker="w1"))
    proposed = []
    for i in range(13, 25):  # the loop: each proposal run (by the objective) and recorded before the next
        after, reply = propose(root)
        proposed.append(after["MATRIX_LR"])
        assert "study: " in reply.output and reply.description.startswith("tpe: ")
        append_row(root / LEDGER_NAME, ledger_row(i, after))
    middle = math.sqrt(low * high)  # the box's centre, log scale: random search lands above it half the time
    above = sum(v > middle for v in proposed)
    assert above >= 10, f"TPE's proposals did not follow the better direction: {proposed}"
    assert statistics.median(proposed) > 2 * middle, proposed
    assert all(low <= v <= high for v in proposed), proposed


def test_same_ledger_and_seed_same_proposal_and_never_a_repeat(study_repo):
    """A fresh agent per turn, as a restarted loop has: it continues the study without running a trial twice."""
    root, base = study_repo
    first, _ = propose(root, seed=3)
    again, _ = propose(root, seed=3)
    other, _ = propose(root, seed=4)
    assert first == again and first != other
    # every proposal of a 10-trial run differs from every program before it, the batch rule kept
    seen = {json.dumps(flatten(base), sort_keys=True)}
    for i in range(1, 11):
        after, _ = propose(root, seed=3)
        key = json.dumps(flatten(after), sort_keys=True)
        assert key not in seen
        seen.add(key)
        assert after["TOTAL_BATCH_SIZE"] % (after["DEVICE_BATCH_SIZE"] * 256) == 0
        append_row(root / LEDGER_NAME, ledger_row(i, after))


def test_the_box_and_what_a_row_carries(use_cache):
    source = (ROOT / TRAIN).read_text()
    constants = read_constants(source)
    dists = distributions(flatten(constants), step_tokens=16 * 256)
    assert dists["MATRIX_LR"].low == pytest.approx(constants["MATRIX_LR"] / LOG_SPAN) and dists["MATRIX_LR"].log
    assert "ADAM_BETAS.0" in dists and "FINAL_LR_FRAC" in dists  # the file's constants beyond random's space
    assert dists["ASPECT_RATIO"].choices == (48, 64, 96) and len(dists["WINDOW_PATTERN"].choices) == 4
    assert dists["TOTAL_BATCH_SIZE.log2"].low >= 12  # never below one device batch of 16 x 256 tokens
    assert json.loads(block_json(source)) == json.loads(json.dumps(constants))
    hostile = source.replace("DEPTH = 4", "DEPTH = 4\nJUNK = 'x' * 1\nBLOB = '" + "y" * 5000 + "'\nTAB = 'a\\tb'")
    carried = json.loads(block_json(hostile))
    assert "BLOB" not in carried and "\t" not in block_json(hostile)
    assert block_json("def (") == "-"


def test_a_branch_without_a_baseline_is_one_line(study_repo):
    root, _ = study_repo
    (root / LEDGER_NAME).unlink()
    with pytest.raises(Exception, match="no baseline row"):
        propose(root)
    assert isinstance(make_agent("tpe", 5), TPEAgent)


def test_hostile_rows_and_an_edited_block_cost_a_turn_at_most(study_repo):
    """Rows merged from elsewhere with params no harness wrote, and a block an LLM rewrote: TPE proposes around
    them or fails its turn in one line (AgentFailed), never the loop."""
    root, base = study_repo
    hostile = [ledger_row(1, base), ledger_row(2, base), ledger_row(3, base), ledger_row(4, base)]
    hostile[0].params = "[" * 100_000 + "]" * 100_000  # nested past the recursion limit
    hostile[1].params = json.dumps({"DEPTH": "4", "MATRIX_LR": True, "WINDOW_PATTERN": 7, "ADAM_BETAS": {"a": 1}})
    hostile[2].params = "{not json"
    hostile[3].params = json.dumps(dict(base, MATRIX_LR=float("1e308") * 10))  # Infinity
    for r in hostile:
        append_row(root / LEDGER_NAME, r)
    after, reply = propose(root)
    assert "study: 2 scored trials" in reply.output  # the baseline, and the one row whose other values were usable
    # an LLM dropped a constant the baseline had and split another over two lines
    path = root / TRAIN
    text = path.read_text()
    path.write_text(text.replace("FINAL_LR_FRAC = 0.0", "").replace("ADAM_BETAS = (0.8, 0.95)",
                                                                    "ADAM_BETAS = (0.8,\n              0.95)"))
    with pytest.raises(AgentFailed, match="cannot rewrite the hyperparameter block"):
        TPEAgent(0).edit(root, "mlx", "prompt", 60)
    path.write_text(text.replace("FINAL_LR_FRAC = 0.0", ""))
    after, _ = propose(root)
    assert "FINAL_LR_FRAC" not in after and after["MATRIX_LR"] != base["MATRIX_LR"]
