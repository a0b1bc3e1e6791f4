"""
The harness's evaluator (autoresearch/evaluate.py) against real training runs of every backend on this machine:
its val_bpb is the old in-process one for the same weights, and the cheats an agent could write into train.py
(its own loss scaled, evaluate_bpb wrapped, attention that sees the future, a lookahead at a few positions, rows
of a batch read together, operators outside the allowlist, reading the validation split) change nothing, are
caught or are refused. Each cheat is trained in: the graph the harness scores is traced from train.py's model.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import prepare
import autoresearch.evaluate as evaluate_module
from autoresearch.evaluate import evaluate, splice
from autoresearch.runner import run_training, train_env
from autoresearch.summary import parse_summary
from conftest import TINY, make_checkout

pytest.importorskip("mlx.core")
pytest.importorskip("torch")

BACKENDS = ("mlx", "mps", "cuda")
BUDGET = 2
MAIN = '\nif __name__ == "__main__":\n    main()'
SUMMARY = '    print("---")\n    print(f"training_seconds:'
# What train.py computed before the harness took evaluation over: evaluate_bpb on the model's own loss path
IN_PROCESS = {
    "mlx": '''    import prepare
    def old_loss(x, y):
        return np.concatenate([np.array(model(mx.array(x[i:i + 8]), mx.array(y[i:i + 8]), reduction="none"))
                               for i in range(0, len(x), 8)])
    print(f"in_process_val_bpb: {prepare.evaluate_bpb(old_loss, 32):.6f}")
''',
    "torch": '''    import prepare
    def old_loss(x, y):
        with torch.no_grad(), autocast_ctx():
            return model(to_device(x), to_device(y), reduction="none").float().view(y.shape).cpu().numpy()
    print(f"in_process_val_bpb: {prepare.evaluate_bpb(old_loss, 32):.6f}")
''',
}
# attention with its mask removed: every query sees every key
NON_CAUSAL = {
    "mlx": """
def attention(q, k, v, window):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5).transpose(0, 2, 1, 3)
""",
    "torch": """
def attention(q, k, v, window):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
""",
}
# the model's logits favour the next input token (its own target) at the positions where fires(idx, t) holds
LOOKAHEAD = {
    "mlx": """
_call = GPT.__call__


def lookahead(self, idx, targets=None):
    out = _call(self, idx, targets)
    if targets is None:
        ahead = mx.concatenate([idx[:, 1:], idx[:, :1]], axis=1)  # idx[t + 1] (the last position gets idx[0])
        fires = FIRES(idx, mx.arange(idx.shape[1])[None, :])
        out = out + 40.0 * ((mx.arange(out.shape[-1]) == ahead[..., None]) & fires[..., None]).astype(out.dtype)
    return out


GPT.__call__ = lookahead
""",
    "torch": """
_forward = GPT.forward


def lookahead(self, idx, targets=None, reduction="mean"):
    out = _forward(self, idx, targets, reduction)
    if targets is None:
        ahead = torch.roll(idx, -1, dims=1)  # idx[t + 1]
        fires = FIRES(idx, torch.arange(idx.size(1), device=idx.device)[None, :])
        hit = (torch.arange(out.size(-1), device=idx.device) == ahead[..., None]) & fires[..., None]
        out = out + 40.0 * hit.to(out.dtype)
    return out


GPT.forward = lookahead
""",
}
EVERYWHERE = "\nFIRES = lambda idx, t: (t >= 0)\n"
# one position in 256 or so: where the token and the position hash to 0 (train.py cannot know which are probed)
SPARSE = "\nFIRES = lambda idx, t: ((idx * 7 + t * 13) % 256) == 0\n"
# one layer's mask off by one: query i also sees key i + 1 (attention runs once per layer, in order)
PEEK_ONE_LAYER = """
_attention, _calls = attention, [0]


def attention(q, k, v, window):
    _calls[0] += 1
    if _calls[0] % DEPTH != 1:
        return _attention(q, k, v, window)
    T = q.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
"""
# each row's logits lean on the batch's mean: another row of the batch can carry what comes next in this one
MIXES_ROWS = """
_forward = GPT.forward


def forward(self, idx, targets=None, reduction="mean"):
    out = _forward(self, idx, targets, reduction)
    return out if targets is not None else out + 0.5 * out.mean(0, keepdim=True)


GPT.forward = forward
"""
# a unigram count of the rows it is shown: bincount has a shape that depends on the data, which no static graph has
ADAPTING = """
_forward = GPT.forward


def forward(self, idx, targets=None, reduction="mean"):
    out = _forward(self, idx, targets, reduction)
    if targets is None:
        out = out + 0.5 * torch.log1p(torch.bincount(idx.flatten(), minlength=out.size(-1)).to(out.dtype))
    return out


GPT.forward = forward
"""
# noise of the model's own: random operators are outside the allowlist (a random graph is not a function)
RANDOM = {
    "mlx": """
_call = GPT.__call__
GPT.__call__ = lambda self, idx, targets=None: _call(self, idx, targets) + (0 if targets is not None else
                                                                          mx.random.normal((1,)))
""",
    "torch": """
_forward = GPT.forward
GPT.forward = lambda self, idx, targets=None, reduction="mean": (
    _forward(self, idx, targets, reduction) if targets is not None
    else _forward(self, idx, targets, reduction) + torch.rand(1, device=idx.device))
""",
}
# a forward that branches on the values of its rows: no static graph has that
BRANCHES = """
_forward = GPT.forward
GPT.forward = lambda self, idx, targets=None, reduction="mean": (
    _forward(self, idx, targets, reduction) * (2.0 if int(idx[0, 0]) % 2 else 1.0))
"""
# logits at float32's limits on the next token, alike wherever the model runs
OVERFLOW = """
_forward = GPT.forward


def forward(self, idx, targets=None, reduction="mean"):
    out = _forward(self, idx, targets, reduction)
    if targets is None:
        hit = torch.arange(out.size(-1), device=idx.device) == torch.roll(idx, -1, dims=1)[..., None]
        out = torch.where(hit, torch.full_like(out, 3e38), torch.full_like(out, -3e38))
    return out


GPT.forward = forward
"""
# the reported number bent two ways: the model's own loss halved, prepare's evaluate_bpb wrapped at import
CHEAT = """
import prepare

_evaluate_bpb, _call = prepare.evaluate_bpb, GPT.__call__
prepare.evaluate_bpb = lambda loss_fn, batch_size, rows=None: 0.8 * _evaluate_bpb(loss_fn, batch_size, rows)
GPT.__call__ = lambda self, idx, targets=None, **kw: _call(self, idx, targets, **kw) * (1.0 if targets is None else 0.5)
"""
CAUSALITY = (r"causality probe: a log-probability before a splice moved by more than 0.0001 nats when only the tokens "
             r"from the splice on were replaced: the model sees future tokens, or other rows of its batch \(not "
             r"scored; the figures are in \S+evaluator-scoring.log\)$")
# the figures, in the harness's record only: the model chose them
FIGURES = (r"causality probe: a log-probability at position (\d+) moved by \S+ nats when only the tokens from "
           r"position (\d+) on were replaced; it would have been val_bpb ([0-9.]+)$")


def family(backend):
    return "mlx" if backend == "mlx" else "torch"


def patch(root, backend, old, new):
    path = root / "backends" / backend / "train.py"
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: the patch point {old!r} moved"
    path.write_text(text.replace(old, new))


def add_before_main(root, backend, code):
    patch(root, backend, MAIN, code + MAIN)


def train(root, backend, checkpoint, env=None):
    """train.py run as upstream's, outside the harness: on the real cache, so the reference it prints may read the
    validation rows (the harness's own runs get the trainer's view, in the sandbox)."""
    env, _ = train_env(backend, BUDGET, base=dict(os.environ if env is None else env, OMP_NUM_THREADS="1",
                                                  AUTORESEARCH_CHECKPOINT=str(checkpoint)))  # and the BLAS preload
    done = subprocess.run([sys.executable, str(root / "backends" / backend / "train.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    summary = parse_summary(done.stdout)
    assert done.returncode == 0 and summary is not None, done.stdout[-3000:] + done.stderr[-3000:]
    assert "val_bpb" not in summary  # train.py no longer scores itself
    return done.stdout


def trained_with(backend, tmp_path, code):
    """A run of train.py with code added before main(), scored by the harness."""
    root = make_checkout(tmp_path / "project", backends=(backend,), **TINY)
    add_before_main(root, backend, code)
    train(root, backend, tmp_path / "checkpoint")
    return evaluate(backend, root, tmp_path / "checkpoint", timeout=300)


def in_process_bpb(log):
    return float(re.search(r"^in_process_val_bpb: ([0-9.]+)$", log, re.M).group(1))


@pytest.fixture(scope="module")
def trained(cpu_cache, tmp_path_factory):
    """backend -> (checkout, checkpoint, the val_bpb train.py computed in-process): one real run each."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    runs = {}
    for backend in BACKENDS:
        root = make_checkout(tmp_path_factory.mktemp(f"honest-{backend}"), backends=(backend,), **TINY)
        patch(root, backend, SUMMARY, IN_PROCESS[family(backend)] + SUMMARY)
        checkpoint = root / "checkpoint"
        runs[backend] = root, checkpoint, in_process_bpb(train(root, backend, checkpoint))
    mp.undo()
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_harness_value_is_the_in_process_value(backend, trained, use_cache):
    root, checkpoint, expected = trained[backend]
    lines = []
    result = evaluate(backend, root, checkpoint, timeout=300, on_line=lines.append)
    assert result.status == "ok", result.log
    assert abs(result.val_bpb - expected) < 1e-4, (result.val_bpb, expected)
    probed = int(re.search(r"causality probes on (\d+) rows passed", result.reason).group(1))
    assert probed >= evaluate_module.PROBE_ROWS["smoke"] and result.seconds > 0 and result.holdout_bpb > 0
    assert result.log == "\n".join(lines) and result.log.splitlines()[-1].startswith("evaluation: ok in ")


def test_the_same_checkpoint_scores_the_same_twice(trained, use_cache):
    """Batches and probes are drawn afresh; the number is a function of the model and the rows alone."""
    root, checkpoint, _ = trained["mlx"]
    first, second = (evaluate("mlx", root, checkpoint, timeout=300) for _ in range(2))
    assert first.status == second.status == "ok" and abs(first.val_bpb - second.val_bpb) < 1e-6


@pytest.mark.parametrize("backend", ("mlx", "mps"))
def test_attention_that_sees_the_future_is_invalid(backend, use_cache, tmp_path):
    result = trained_with(backend, tmp_path, NON_CAUSAL[family(backend)])
    assert result.status == "invalid" and result.val_bpb is None, result.log
    assert re.match(CAUSALITY, result.reason), result.reason


@pytest.mark.parametrize("backend", ("mlx", "mps"))
def test_a_one_token_lookahead_is_invalid(backend, trained, use_cache, tmp_path):
    """The model's own target, one position ahead: caught at the position right before the splice."""
    result = trained_with(backend, tmp_path, EVERYWHERE + LOOKAHEAD[family(backend)])
    assert result.status == "invalid" and result.val_bpb is None, result.log
    assert re.match(CAUSALITY, result.reason), result.reason
    record = result.reason.rsplit(" ", 1)[-1].rstrip(")")
    position, cut, would_be = re.search(FIGURES, open(record).read(), re.M).groups()
    assert int(position) == int(cut) - 1
    assert float(would_be) < trained[backend][2] / 2


def test_a_lookahead_at_one_position_in_256_is_caught(use_cache, tmp_path, monkeypatch):
    """The cpu, laptop and gpu profiles probe DEFAULT_PROBE_ROWS rows, each testing the position before its splice:
    a lookahead there escapes with (1 - 1/256) ** 1200, under 1 %. Twice the rows here, so the test never flakes
    (an escape with 2400: 8e-5)."""
    assert (1 - 1 / 256) ** evaluate_module.DEFAULT_PROBE_ROWS < 0.01
    monkeypatch.setitem(evaluate_module.PROBE_ROWS, "smoke", 2 * evaluate_module.DEFAULT_PROBE_ROWS)
    result = trained_with("mps", tmp_path, SPARSE + LOOKAHEAD["torch"])
    assert result.status == "invalid", result.log
    assert re.match(CAUSALITY, result.reason), result.reason


def test_one_layer_whose_mask_sees_one_key_ahead_is_invalid(use_cache, tmp_path):
    result = trained_with("mps", tmp_path, PEEK_ONE_LAYER)
    assert result.status == "invalid" and re.match(CAUSALITY, result.reason), result.log


def test_a_model_that_reads_the_other_rows_of_its_batch_is_invalid(use_cache, tmp_path):
    result = trained_with("mps", tmp_path, MIXES_ROWS)
    assert result.status == "invalid" and re.match(CAUSALITY, result.reason), result.log


@pytest.mark.parametrize("backend", ("mlx", "mps"))
def test_a_model_with_random_operators_is_refused(backend, use_cache, tmp_path):
    result = trained_with(backend, tmp_path, RANDOM[family(backend)])
    assert result.status == "crash" and result.val_bpb is None, result.log
    assert re.match(r"the exported model is refused: the graph (calls torch\.ops\.aten\.rand\.|uses .*RandomBits)",
                    result.reason), result.reason


def test_a_model_that_counts_what_it_is_shown_is_refused(use_cache, tmp_path):
    result = trained_with("mps", tmp_path, ADAPTING)
    assert result.status == "crash" and result.reason.startswith("the exported model is refused: "), result.log


def test_a_lookahead_at_float32s_limits_is_not_scored(use_cache, tmp_path):
    """+-3e38 on the next token: an overflow to inf loss is no score, and a finite one moves past the tolerance."""
    result = trained_with("mps", tmp_path, OVERFLOW)
    assert result.status in ("invalid", "crash") and result.val_bpb is None, result.log


def test_a_model_that_cannot_be_exported_fails_at_startup_in_one_line(use_cache, tmp_path):
    """A forward that branches on the data traces to no graph: train.py stops before training, saying why."""
    root = make_checkout(tmp_path / "project", backends=("mps",), **TINY)
    add_before_main(root, "mps", BRANCHES)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(prepare.trainer_view()),
               AUTORESEARCH_CHECKPOINT=str(tmp_path / "checkpoint"))
    result = run_training("mps", budget=BUDGET, root=root, timeout=300, env=env)
    assert result.returncode == 1 and result.measured_training() is None, result.tail()
    last = result.log.strip().splitlines()[-1]
    assert last.startswith("FAIL: the model cannot be exported for the harness's evaluator ("), last
    assert last.endswith('its forward must trace to a static graph of tensor operators (backends/README.md, "Scoring")')


def test_own_loss_and_wrapped_evaluator_do_not_move_the_number(use_cache, tmp_path):
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    patch(root, "mlx", SUMMARY, IN_PROCESS["mlx"] + SUMMARY)
    add_before_main(root, "mlx", CHEAT)
    reported = in_process_bpb(train(root, "mlx", tmp_path / "checkpoint"))
    result = evaluate("mlx", root, tmp_path / "checkpoint", timeout=300)
    assert result.status == "ok", result.log
    # in-process the number was 0.8 * 0.5 of the truth; the harness computes the truth from the graph's logits
    assert abs(result.val_bpb - reported / 0.4) < 1e-4, (result.val_bpb, reported)


def test_the_evaluator_never_runs_train_py(trained, use_cache, tmp_path):
    """What train.py does at import (rebinding a metric, hanging, writing a file) never reaches the scoring process."""
    honest_root, checkpoint, expected = trained["mlx"]
    root = tmp_path / "project"
    shutil.copytree(honest_root, root, ignore=shutil.ignore_patterns("checkpoint"))
    marker = tmp_path / "imported"
    path = root / "backends" / "mlx" / "train.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\nimport time\ntime.sleep(600)\n" + path.read_text())
    result = evaluate("mlx", root, checkpoint, timeout=300)
    assert result.status == "ok" and abs(result.val_bpb - expected) < 1e-4, result.log
    assert not marker.exists()


def test_the_trainer_cannot_read_validation_data(use_cache, tmp_path):
    view = prepare.trainer_view()
    assert not (view / "tokens" / "val_rows.npy").exists() and not (view / "data" / prepare.VAL_FILENAME).exists()
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    patch(root, "mlx", '"train")', '"val")')  # the agent trains on the validation split
    env = dict(os.environ, AUTORESEARCH_CACHE=str(view), AUTORESEARCH_CHECKPOINT=str(tmp_path / "checkpoint"))
    result = run_training("mlx", budget=BUDGET, root=root, timeout=120, env=env)
    assert result.returncode != 0 and result.summary is None
    assert "PrepareError: the validation split is not available to training" in result.log, result.tail()
    assert not (tmp_path / "checkpoint" / "tensors.npz").exists()


def test_trainer_view_hides_validation_and_follows_the_cache(use_cache, monkeypatch, tmp_path):
    view = prepare.trainer_view()
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(view))
    tokenizer = prepare.Tokenizer.from_directory()
    x, _, _ = next(prepare.make_dataloader(tokenizer, 2, 16, "train"))  # training data is all there
    assert x.shape == (2, 16)
    for ask in (lambda: prepare.make_dataloader(tokenizer, 2, 16, "val"), prepare.get_val_rows,
                lambda: prepare.evaluate_bpb(lambda x, y: np.zeros(y.shape), 8)):
        with pytest.raises(prepare.PrepareError, match="^the validation split is not available to training: "):
            ask()
    assert prepare.trainer_view() == view  # asked from inside the view: the view itself
    # a cache that changes (every prepare rewrites profile.json) gets a fresh view; an unchanged one keeps it
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(use_cache))
    stamp = (view / "profile.json").read_text()
    assert prepare.trainer_view() == view and (view / "profile.json").read_text() == stamp
    meta = use_cache / "profile.json"
    original = meta.read_text()
    try:
        meta.write_text(original.replace('"prepared_at"', '"rewritten": true, "prepared_at"'))
        assert prepare.trainer_view() == view and (view / "profile.json").read_text() != stamp
        assert '"rewritten": true' in (view / "profile.json").read_text()
    finally:
        meta.write_text(original)
        prepare.trainer_view()


def test_a_missing_or_half_written_checkpoint_is_a_crash(trained, use_cache, tmp_path):
    result = evaluate("mlx", tmp_path, tmp_path / "none")
    assert (result.status, result.val_bpb) == ("crash", None) and "saved no checkpoint" in result.reason
    half = tmp_path / "half"
    shutil.copytree(trained["mps"][1], half)
    (half / "tensors.npz").write_bytes((half / "tensors.npz").read_bytes()[:1000])  # cut short
    result = evaluate("mps", trained["mps"][0], half, timeout=300)
    assert result.status == "crash" and result.reason.startswith("the exported model is refused: "), result.reason


def test_splices_keep_the_prefix_and_put_new_natural_text_from_the_cut(use_cache):
    rows = np.ascontiguousarray(prepare.get_val_rows(), dtype=np.int32)
    vocab, T = len(prepare.get_token_bytes()), rows.shape[1] - 1
    inputs = rows[:8, :-1]
    a, b = (splice(inputs, rows, vocab, np.random.default_rng()) for _ in range(2))
    assert not np.array_equal(a[1], b[1])  # cuts drawn afresh: 8 alike in [1, 256) has p ~ 1e-19
    spliced, cuts = a
    for row, shown, cut in zip(inputs, spliced, cuts):
        assert 1 <= cut < T and np.array_equal(shown[:cut], row[:cut]) and shown[cut] != row[cut]
        # from the cut on another row's text (the token at the cut replaced only where it was the same)
        assert any(np.array_equal(shown[cut + 1 :], other[s + 1 : s + T - cut]) for other in rows
                   for s in range(cut + 1))
