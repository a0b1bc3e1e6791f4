"""The TPE searcher: Optuna's tree-structured Parzen estimator over train.py's hyperparameter block, fitted anew each
turn to every scored row of the run branch's series, whoever ran it (`pip install -e '.[tpe]'`).

The study is the ledger: each row carries its program's hyperparameters (Row.params), so a restarted loop, a swarm
worker that got the driver's ledger, or a series with an LLM's rows in it continues one study, and the same ledger
and seed always give the same proposal."""

import hashlib
import json
import math
import warnings
from pathlib import Path

import prepare

from . import train_file
from .agents import SEARCH_SPACE, AgentFailed, Reply
from .branch import open_repo
from .hparams import read_constants, set_constants
from .ledger import LEDGER_NAME, baseline_of, read_ledger

# Beyond the random agent's space: what the block holds besides (the betas as two numbers). DEVICE_BATCH_SIZE and
# HEAD_DIM stay: the first is the memory's to set, the second changes which widths exist.
EXTRA_SPACE = {
    "FINAL_LR_FRAC": ("lin", 0.0, 0.3),
    "ADAM_BETAS.0": ("lin", 0.6, 0.95),
    "ADAM_BETAS.1": ("lin", 0.85, 0.999),
}
# The box TPE searches: the space's bounds, narrowed around the series' baseline, since the baseline was
# calibrated to the budget and a model 16 layers deep on a CPU trains nothing in 30 s. Log values within 4x of it,
# linear ones within a quarter of their range, DEPTH within 2, the batch within 4x, a numeric choice (the width's
# ASPECT_RATIO) one step either side; a choice of names (WINDOW_PATTERN) any of them.
LOG_SPAN, LIN_SPAN, INT_SPAN, POW2_SPAN, CHOICE_SPAN = 4.0, 0.25, 2, 2, 1
STARTUP_TRIALS = 6  # scored rows before TPE models them; until then it samples the box at random
RETRIES = 20  # proposals drawn until one is neither a trial already in the series nor outside the batch rule


def _optuna():
    try:
        import optuna
    except ImportError:
        raise AgentFailed("--agent tpe needs Optuna: pip install -e '.[tpe]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def flatten(constants):
    """The block's values under the space's names: a tuple's items as NAME.0, NAME.1."""
    flat = {}
    for name, value in constants.items():
        if isinstance(value, (tuple, list)):
            flat.update({f"{name}.{i}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat


def unflatten(updates, constants):
    """Proposed values back into the block's constants (a tuple rebuilt from its items)."""
    out = {}
    for key, value in updates.items():
        name, _, index = key.partition(".")
        if index:
            items = list(out.get(name, constants[name]))
            items[int(index)] = value
            out[name] = tuple(items)
        else:
            out[name] = value
    return out


def distributions(base, step_tokens):
    """{name: optuna distribution}: the box around the baseline's values (base, flattened) for every name of the
    space the file has. The batch's exponent starts where it is a whole number of device batches."""
    optuna = _optuna()
    D = optuna.distributions
    dists = {}
    for name, (kind, *args) in {**SEARCH_SPACE, **EXTRA_SPACE}.items():
        b = base.get(name)
        if b is None or isinstance(b, bool):
            continue
        if kind == "choice":
            near = args
            if b in args and all(isinstance(c, (int, float)) for c in args):
                i = args.index(b)
                near = args[max(0, i - CHOICE_SPAN): i + CHOICE_SPAN + 1]
            dists[name] = D.CategoricalDistribution(near)
            continue
        if not isinstance(b, (int, float)) or not math.isfinite(b):
            continue
        low, high = args
        if kind == "log" and b > 0:
            dists[name] = D.FloatDistribution(max(low, b / LOG_SPAN), min(high, b * LOG_SPAN), log=True)
        elif kind == "lin":
            span = LIN_SPAN * (high - low)
            dists[name] = D.FloatDistribution(max(low, min(b, high) - span), min(high, max(b, low) + span))
        elif kind == "int":
            dists[name] = D.IntDistribution(max(low, int(b) - INT_SPAN), min(high, int(b) + INT_SPAN))
        elif kind == "pow2" and b > 0:
            e = round(math.log2(b))
            floor = math.ceil(math.log2(step_tokens)) if step_tokens else 0
            lo, hi = max(round(math.log2(low)), e - POW2_SPAN, floor), min(round(math.log2(high)), e + POW2_SPAN)
            if lo <= hi:
                dists[f"{name}.log2"] = D.IntDistribution(lo, hi)
    return dists


def to_space(flat, dists):
    """A program's values as the study's params: those inside the box (a value outside it, an LLM's bold move,
    says nothing about the box's points and is left out)."""
    params = {}
    for name, dist in dists.items():
        key, pow2 = (name[:-5], True) if name.endswith(".log2") else (name, False)
        value = flat.get(key)
        if value is None or isinstance(value, bool):
            continue
        if pow2:
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                continue
            value = value.bit_length() - 1
        if _inside(value, dist):
            params[name] = value
    return params


def _inside(value, dist):
    if hasattr(dist, "choices"):
        return any(type(value) is type(c) and value == c for c in dist.choices)
    kind = int if dist.__class__.__name__ == "IntDistribution" else (int, float)
    return isinstance(value, kind) and dist.low <= value <= dist.high


def from_space(params, dists):
    """The study's params as the block's values: rounded as a person would write them, inside the box."""
    values = {}
    for name, value in params.items():
        dist = dists[name]
        if name.endswith(".log2"):
            values[name[:-5]] = 2 ** int(value)
        elif isinstance(value, float):
            rounded = float(f"{value:.3g}") if getattr(dist, "log", False) else round(value, 3)
            values[name] = min(dist.high, max(dist.low, rounded))
        else:
            values[name] = value
    return values


def series_rows(root):
    """The scored rows of the checked-out run branch's series, oldest first, and the series' baseline row."""
    repo = open_repo(root)
    branch = repo.active_branch.name
    rows = [r for r in read_ledger(Path(root) / LEDGER_NAME) if r.branch == branch and r.status != "verify"]
    base = baseline_of(rows, branch)
    if base is None:
        raise AgentFailed(f"--agent tpe: {branch} has no baseline row in {LEDGER_NAME} to start its study from")
    return [r for r in rows if r.key() == base.key()], base


def row_params(row, repo, backend):
    """A row's hyperparameters: from the row (Row.params), else from its commit's train.py where git has it."""
    if row.params not in ("", "-"):
        try:
            return flatten(json.loads(row.params))
        except (ValueError, TypeError, AttributeError, RecursionError):  # a row from elsewhere, not the harness's
            return None
    try:
        return flatten(read_constants(repo.git.show(f"{row.commit}:backends/{backend}/train.py")))
    except Exception:  # an unknown commit (rows merged from elsewhere), a file that no longer parses
        return None


class TPEAgent:
    """Optuna's TPE over the hyperparameter block, warm-started from the series' every scored row."""

    name = "tpe"

    def __init__(self, seed=0):
        self.seed = seed

    def edit(self, root, backend, prompt, timeout):
        optuna = _optuna()
        path = train_file(backend, root)
        source = path.read_text()
        constants = read_constants(source)
        step_tokens = constants.get("DEVICE_BATCH_SIZE", 1) * prepare.load_profile().seq_len
        rows, base = series_rows(root)
        repo = open_repo(root)
        dists = distributions(row_params(base, repo, backend) or flatten(constants), step_tokens)
        if not dists:
            raise AgentFailed("--agent tpe: the hyperparameter block has none of the names it searches")
        try:
            study, seen, by = fitted(optuna, rows, dists, lambda r: row_params(r, repo, backend))
            values = self.propose(optuna, study, dists, seen, step_tokens)
        except (ValueError, TypeError, RuntimeError) as e:  # what Optuna raises at what it cannot use
            raise AgentFailed(f"--agent tpe: {type(e).__name__}: {e}") from None
        # only what the file still has (an LLM's edit may have dropped a constant the baseline had)
        current = flatten(constants)
        updates = unflatten({k: v for k, v in values.items() if k in current and current[k] != v}, constants)
        if not updates:
            raise AgentFailed("--agent tpe proposed the program already checked out")
        try:
            path.write_text(set_constants(source, updates))
        except (KeyError, ValueError) as e:  # a constant spread over several lines
            raise AgentFailed(f"--agent tpe cannot rewrite the hyperparameter block: {e}") from None
        n = sum(by.values())
        workers = ", ".join(f"{w if w != '-' else 'here'}: {c}" for w, c in sorted(by.items()))
        phase = "random, until the model starts" if n < STARTUP_TRIALS else "TPE"
        description = "tpe: " + ", ".join(f"{k} {constants[k]} -> {v}" for k, v in updates.items())
        return Reply(description, f"study: {n} scored trials of the series ({workers}); proposal {phase}\n")


    def propose(self, optuna, study, dists, seen, step_tokens):
        """The block's values TPE proposes next: the first draw that is no program of the series already and keeps
        the batch a whole number of device batches. Seeded by the agent's seed, the study's size and the draw, so
        the same ledger always gives the same proposal."""
        n = len(study.trials)
        for attempt in range(RETRIES):
            digest = hashlib.sha256(f"{self.seed}:{n}:{attempt}".encode()).digest()
            study.sampler = optuna.samplers.TPESampler(seed=int.from_bytes(digest[:4], "little"),
                                                       n_startup_trials=STARTUP_TRIALS, multivariate=True,
                                                       group=True, constant_liar=True)
            trial = study.ask(dists)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # only asked: it must not count as a trial
            values = from_space(trial.params, dists)
            total = values.get("TOTAL_BATCH_SIZE")
            if total is not None and step_tokens and total % step_tokens:
                continue
            if _point(to_space(flatten(values), dists)) not in seen:
                return values
        raise AgentFailed(f"--agent tpe drew {RETRIES} proposals, each one already run or off the batch rule")


def fitted(optuna, rows, dists, params_of):
    """(study, seen, by): a study holding every scored row of rows inside the box as a finished trial; the points
    of every row with params (a crash, an invalid run too: never proposed again); the trials by worker."""
    study = optuna.create_study(direction="minimize")
    seen, by = set(), {}
    for r in rows:
        flat = params_of(r)
        if flat is None:
            continue
        params = to_space(flat, dists)
        seen.add(_point(params))
        scored = r.status in ("keep", "discard") and math.isfinite(r.val_bpb) and r.val_bpb > 0
        if not params or not scored:
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=r.val_bpb))
        by[r.worker] = by.get(r.worker, 0) + 1
    return study, seen, by


def _point(params):
    return tuple(sorted((k, round(v, 6) if isinstance(v, float) else v) for k, v in params.items()))
