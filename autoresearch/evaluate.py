"""
The fixed evaluator: the val_bpb of the checkpoint train.py saved, computed where no agent code runs.

evaluate() runs in the harness's own process, which never imports train.py. It starts two fresh processes
(`python -I -B`, in the sandbox: no cache, no network, the checkout and the checkpoint read-only), each of which
imports backends/<backend>/train.py, rebuilds the trained model with its build_model(config, weights) hook and
then answers every chunk of input tokens it is sent with the model's logits, written into a shared-memory
buffer the harness made. The harness copies the logits out (the child could rewrite the buffer afterwards) and
computes everything from them itself: the cross-entropy, its reduction to bits per byte (prepare.evaluate_bpb),
the probes. The model's process is sent inputs only (never a row's last token), computes no loss, and nothing
it does to its own interpreter reaches the number.

- The scoring process gets every validation row once, in an order and in chunks drawn afresh per evaluation.
- Then the reference process, a second fresh one (started beside the first, its model built only after the
  first and its sandbox have ended), gets PROBE_ROWS rows drawn at random per evaluation: half as
  they are (purity), half with natural text from another validation row spliced in from a random position on
  (causality). An honest model's output at a position is a function of the row's tokens up to it, so the two
  processes' log-probability vectors must agree at every position of a purity row and at every position before
  the splice of a causality row, including the one right before it. A model that adapts to what it scores,
  behaves differently in a process that has seen many rows, reads across the rows of a chunk, or sees even one
  token ahead, disagrees.
- The scoring process cannot tell which of its rows are compared, and has committed all its outputs before any
  probe exists outside the harness: a model whose outputs there differ from a fresh process's on a fraction f
  of the rows escapes with probability at most (1 - f) ** PROBE_ROWS (f = 0.1: 3.4 %). A lookahead the model
  applies in both processes alike shows at the position right before a splice only: one that shows at a
  fraction f of the positions (it looks ahead at some next tokens only) escapes the causality half with
  probability about (1 - f) ** (PROBE_ROWS // 2) (f = 0.1: 18.5 %, f = 0.25: 1.0 %; f = 1: never).
- What the comparisons' tolerance lets through at each position, two one-sided tests add up over the rows (Lean):
  a lookahead made alike in both processes leans toward the real token at the splice, one made only where the
  model is scored drifts toward the real next tokens everywhere else.
- The guarantee needs the sandbox: unconfined (`--sandbox off`), the scoring process could leave the rows in /tmp
  for the reference. Sandboxed, it leaves no file; what outlives it is the kernel's page cache of the files both
  read, one bit per page of them, read exactly (mincore). Each process gets its own copy of the checkpoint's files
  and train.py is at most 1 MiB, so no file the candidate wrote is among them; the interpreter's and the venv's
  are (megabits: short of the gpu profile's rows, 20 M tokens, not of the cpu and smoke profiles').
A model that fails a probe is "invalid": it gets no val_bpb. backends/README.md states the protocol.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import prepare

from . import hub, kernels, record, sandbox
from .clock import SCORING_SLACK_SECONDS
from .hardware import gpu_capability, preload_blas
from .model_server import make_logits_fn, send_array
from .runner import remove_pid_file, state_of, write_pid_file

# How far a log-probability may move between two evaluations of the same prefix (nats). Honest models give the
# same numbers up to rounding (every row is computed alone, masked attention adds exact zeros); the slack covers
# kernels that are not bitwise deterministic across batch shapes. Float32 tight, lower precisions (bf16) looser.
TOLERANCE = {"float32": 1e-4}
LOW_PRECISION_TOLERANCE = 2e-2
EVALUATOR, REFERENCE = "evaluator", "reference"  # the two processes: their pid files, logs and log prefixes
PROBE_ROWS = 32  # rows the reference process scores: half as they are (purity), half spliced (causality)
# A mean lean toward the real next token (Lean: the causality rows' at the splice, every probe row's drift) marks
# a lookahead: past LEAN_SIGMAS standard errors of its own spread (an honest model's is symmetric noise: a t of 15
# or more degrees of freedom passes 5 once in about 10,000 evaluations) and past LEAN_FLOOR nats (float32 models
# agree to ~1e-7: no spread to divide by).
LEAN_SIGMAS, LEAN_FLOOR, LEAN_MIN_ROWS = 5.0, 1e-3, 4
LOGITS_BYTES = 256 << 20  # the shared buffer: the logits of as many rows as fit, copied out a slice at a time
BUILD_SECONDS = 60  # from the checkpoint to a built model: loading weights takes seconds, never a minute
SEALED_LINES = 2000  # of a child's output while it holds rows, kept in the record for a human
LOG_LINES = 2000  # of a child's output before it holds rows, shown and kept in the evaluation's log


@dataclass(frozen=True)
class Evaluation:
    status: str  # "ok" | "invalid" (a probe failed: not scored) | "crash" (no checkpoint, the child failed or timed out)
    val_bpb: float | None
    reason: str  # one line: the result, the failed probe's numbers, or why it crashed
    seconds: float  # the whole evaluation: process start, model build, scoring and probes
    log: str
    holdout_bpb: float | None = None  # the holdout rows' bits per byte, scored in the same pass; no decision reads it


class EvaluatorFailed(Exception):
    """A child died, timed out or broke the protocol; the message says which."""


NOT_FINITE = "the model's logits are not finite (NaN or inf): no loss can be computed from them"


# The child runs isolated (-I: no environment variables, user site or working directory on its path; -B: no bytecode
# written), with exactly the harness's own prepare.py and package on its path.
CHILD_MAIN = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from autoresearch.model_server import serve; "
              "serve(sys.argv[2], int(sys.argv[3]))")


def harness_path():
    """The folders this process imported prepare and the autoresearch package from."""
    return [str(Path(prepare.__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]


def shared_buffer():
    """A file only in memory (an unlinked temporary file where there is no memfd), inherited by the child."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("autoresearch-logits")
    return os.dup(tempfile.TemporaryFile().fileno())


def start_evaluator(backend, root, checkpoint, env=None, state=None, name=EVALUATOR):
    """One evaluator process, started ahead: its interpreter and framework imports run while it waits for the job
    (Child.start); train.py is imported once the job names the checkpoint (serve). On a GPU the harness starts
    the scoring one while training runs, so the fresh process costs no more than evaluating in-process did. It
    runs in the sandbox: the checkout and the checkpoint read-only, no cache at all, no network, Python isolated
    from the environment and from bytecode."""
    child_env = dict(os.environ if env is None else env, AUTORESEARCH_CACHE=str(prepare.trainer_view()),
                     PYTHONUNBUFFERED="1")
    blas = preload_blas(child_env, one_thread=True) if backend == "mlx" else None  # logits_fn: a stream per core
    offline, hub_note = hub.child_env(gpu_capability(backend))
    child_env.update(offline)
    notes = [n for n in (blas, hub_note) if n]
    # the harness's state folder too: its logs hold earlier runs' output
    hidden = (str(prepare.cache_dir()), str(record.state_home()), str(Path(root) / ".autoresearch"),
              *hub.hidden(child_env))
    # Its own copy of the checkpoint, made when the job comes, not the trainer's folder: a file train.py planted
    # there, read by both processes, would carry the rows from one to the other through the page cache (which of
    # its pages are cached: mincore reads them exactly). A copy is a new file, its pages its own.
    model = Model(Path(checkpoint), kernels.run_folder("evaluator"))
    policy = sandbox.Policy(read=(str(root), str(model.copy), *hub.readable(child_env)), hide=hidden, network=False)
    buffer = shared_buffer()
    argv, inside = sandbox.active().wrap([sys.executable, "-I", "-B", "-c", CHILD_MAIN, json.dumps(harness_path()),
                                          backend, str(buffer)], root, policy)
    child_env.update(inside)
    return Child(argv, root, child_env, name, buffer, Path(state) / f"{name}.pid" if state else None, notes, model)


@dataclass(frozen=True)
class Model:
    """The trainer's checkpoint folder and the one child's copy of it."""
    checkpoint: Path
    copy: Path

    def fill(self):
        """The checkpoint's files (prepare.CHECKPOINT_FILES) copied into the child's folder, regular files only: a
        link would copy what it names (a file the sandbox hides, the validation rows among them), a FIFO would hold
        the harness. What is not copied is missing for the child, whose build then fails."""
        for name in prepare.CHECKPOINT_FILES:
            try:
                fd = os.open(self.checkpoint / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            with open(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    with open(self.copy / name, "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 20)


def evaluate(backend, root, checkpoint, timeout=None, on_line=None, child=None, scoring=None):
    """Score the checkpoint of backends/<backend>/train.py in root. The children's AUTORESEARCH_CACHE is the
    trainer's view of this process's cache; their pid files go to root's state folder (runner.state_of). child: the
    scoring process, started ahead (start_evaluator), else a fresh one. scoring: seconds the scoring and probes
    may take once the models are built (the branch's clock), or None."""
    start = time.time()
    lines = []
    children = []

    def note(line):
        lines.append(line)
        if on_line:
            on_line(line)

    def result(status, val_bpb, reason, holdout_bpb=None):
        seconds = time.time() - start
        note(f"evaluation: {status} in {seconds:.1f}s: {reason}")
        return Evaluation(status, val_bpb, reason, seconds, "\n".join(lines), holdout_bpb)

    try:
        if not (Path(checkpoint) / "config.json").exists():
            if child:
                child.close()
            return result("crash", None, f"train.py saved no checkpoint in {checkpoint}")
        rows = np.ascontiguousarray(prepare.get_val_rows(), dtype=np.int32)
        holdout = prepare.get_holdout_rows()
        holdout = np.ascontiguousarray(holdout, dtype=np.int32) if holdout is not None else rows[:0]
        vocab = len(prepare.get_token_bytes())
        job = {"checkpoint": str(Path(checkpoint).resolve()), "vocab_size": vocab}
        state = state_of(root)
        children = [child or start_evaluator(backend, root, checkpoint, state=state),
                    start_evaluator(backend, root, checkpoint, state=state, name=REFERENCE)]
        for c in children:
            c.scoring = scoring
            c.listen(note if c.name == EVALUATOR else lambda line: note(f"[{REFERENCE}] {line}"))
        # The reference gets its job (train.py's code runs in it) only once the scoring process and its sandbox
        # have ended: two live processes can talk through anything they both see (a byte-range lock on a file
        # both bind read-only carries every row), and a GPU in EXCLUSIVE_PROCESS mode takes one at a time anyway.
        # Until then the reference runs only the harness's code, importing its framework.
        children[0].start(job, timeout)
        turn = lambda: (children[0].close(), children[1].start(job, timeout))  # noqa: E731
        return result(*score(*children, (rows, holdout), vocab, note, turn))
    except EvaluatorFailed as e:
        return result("crash", None, str(e))
    except BaseException:  # Ctrl-C, SIGTERM: the children go at once
        for c in children:
            c.kill()
        raise
    finally:
        for c in children:
            c.close()


def score(main, reference, sets, vocab, note, turn):
    """(status, val_bpb, reason, holdout_bpb) from two started children: sets is (validation rows, holdout rows);
    every row of both in the scoring process, mixed in an order drawn now, then the probes' rows (validation rows)
    in the reference process; both figures from the scoring process's logits. turn: what ends the scoring
    process and starts the reference, called between the two: the two never run agent code at once."""
    val, holdout = sets
    rows = np.concatenate([val, holdout]) if len(holdout) else val
    hello = main.hello()
    b, dtype = hello["rows_per_chunk"], hello["dtype"]
    tol = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    note(f"evaluator: model built in {hello['seconds']:.2f}s on {hello['device']} ({dtype}); "
         f"{len(val)} validation and {len(holdout)} holdout rows in chunks of {b}")
    rng = np.random.default_rng()  # fresh every evaluation: nothing in train.py can be tuned to it
    probes = Probes.draw(val, vocab, rng)
    t0 = time.time()
    # The scoring process first: it has committed every output before any probe row exists outside the harness.
    # The holdout rows go in among the validation rows: nothing tells the model which of them a decision reads.
    order, T = rng.permutation(len(rows)), rows.shape[1] - 1
    nats = np.empty((len(rows), T), dtype=np.float64)
    compared = {int(r): int(cut) for r, cut in zip(probes.rows, probes.cuts)}
    kept = {}  # validation row -> the scoring process's log-probabilities at the positions compared
    for at in range(0, len(order), b):
        picked = order[at : at + b]
        for i, logits in main.logits(rows[picked, :-1], vocab):
            r = int(picked[i])
            if r in compared:
                if not np.all(np.isfinite(logits[: compared[r]])):
                    raise EvaluatorFailed(NOT_FINITE)
                kept[r] = log_softmax(logits[: compared[r]])
            nats[r] = cross_entropy(logits[None], rows[r : r + 1, 1:])[0]
    if not np.all(np.isfinite(nats)):
        raise EvaluatorFailed(NOT_FINITE)
    turn()
    ref_hello = reference.hello()
    note(f"{REFERENCE} process built in {ref_hello['seconds']:.2f}s once the scoring process had ended")
    worst = {True: Disagreement(), False: Disagreement()}  # purity, causality: the largest of each kind
    lean, drift = Lean(LEAN, null=[]), Lean(DRIFT)
    for at in range(0, len(probes.rows), b):
        for i, logits in reference.logits(probes.inputs[at : at + b], vocab, at):
            if not np.all(np.isfinite(logits)):
                raise EvaluatorFailed(NOT_FINITE)
            r, cut = int(probes.rows[i]), compared[int(probes.rows[i])]
            ours, theirs = kept.pop(r), log_softmax(logits[:cut])  # the scoring process's and the reference's
            alike = cut if cut == T else cut - 1  # the positions whose next token both were shown alike (or neither)
            pos, real = np.arange(alike), rows[r, 1 : alike + 1]
            # the real next token's log-probability: the scoring process's less the reference's
            gain = ours[pos, real] - theirs[pos, real]
            if alike:
                drift.add(np.mean(gain))
            if cut < T:
                real, spliced = int(rows[r, cut]), int(probes.inputs[i, cut])
                mine, ref = ours[cut - 1], theirs[cut - 1]  # at the position right before the splice
                lean.add(mine[real] - ref[real] + ref[spliced] - mine[spliced])
            else:  # the lean's null: every position of a purity row as if another row's token had been spliced there
                decoy = probes.decoys[i]
                other = decoy != real
                lean.add_null((gain - ours[pos, decoy] + theirs[pos, decoy])[other])
            seen = Disagreement.of(ours, theirs, r, cut)
            worst[seen.cut == T] = max(worst[seen.cut == T], seen)
    scored = time.time() - t0
    val_bpb = prepare.evaluate_bpb(in_order(nats[: len(val)]), b, rows=val)
    held = prepare.evaluate_bpb(in_order(nats[len(val) :]), b, rows=holdout) if len(holdout) else None
    # purity first: a model whose outputs drift fails the causality comparison too, and would be misnamed
    problem = (worst[True].problem(tol, dtype, T) or worst[False].problem(tol, dtype, T) or lean.problem()
               or drift.problem())
    if problem:
        return "invalid", None, f"{problem} (not scored; it would have been val_bpb {val_bpb:.6f})", None
    also = f"; holdout {held:.6f} on {len(holdout)} rows" if held is not None else ""
    return "ok", val_bpb, (f"val_bpb {val_bpb:.6f} ({len(val)} rows scored in {scored:.1f}s{also}; purity and "
                           f"causality probes on {len(probes.rows)} rows passed)"), held


def in_order(nats):
    """prepare.evaluate_bpb's loss_fn over nats already computed for every row, which it asks for chunk by chunk."""
    at = [0]

    def loss_fn(x, y):
        at[0] += len(x)
        return nats[at[0] - len(x) : at[0]]

    return loss_fn


@dataclass(frozen=True)
class Probes:
    """The rows the reference process scores: their indices in the validation rows, what it is shown (a row's
    inputs, or its inputs up to cut with another row's text from there on), how many leading positions must
    agree (cut; T for a row shown as it is), and for each a random other row's next tokens (decoys: the tokens a
    splice could have put at each position of a row shown as it is)."""
    rows: np.ndarray
    inputs: np.ndarray
    cuts: np.ndarray
    decoys: np.ndarray

    @classmethod
    def draw(cls, rows, vocab, rng, k=PROBE_ROWS):
        n, T = len(rows), rows.shape[1] - 1
        picked = rng.choice(n, size=min(k, n), replace=False)
        inputs = np.ascontiguousarray(rows[picked, :-1])
        cuts = np.full(len(picked), T)
        # which half is spliced is drawn too: the reference is sent the rows in this order
        for i in rng.permutation(len(picked))[len(picked) // 2 :] if T > 1 else ():
            cut = int(rng.integers(1, T))
            donors = np.flatnonzero(rows[:, cut] != inputs[i, cut])  # natural text, and a new token right at cut
            if len(donors):
                inputs[i, cut:] = rows[rng.choice(donors), cut:T]
            else:  # every row has this token here (a one-row split)
                inputs[i, cut] = (inputs[i, cut] + 1) % vocab
            cuts[i] = cut
        return cls(picked, inputs, cuts, rows[rng.integers(0, n, len(picked)), 1:])


@dataclass(frozen=True, order=True)
class Disagreement:
    """The largest difference between the two processes' log-probabilities seen so far (ordered by it)."""
    nats: float = 0.0
    row: int = -1
    position: int = -1
    cut: int = 0

    @classmethod
    def of(cls, scored, ref, row, cut):
        """The two processes' log-probabilities over the first cut positions."""
        diff = np.abs(ref - scored).max(axis=-1)
        p = int(np.argmax(diff))
        return cls(float(diff[p]), row, p, cut)

    def problem(self, tol, dtype, T):
        if self.nats <= tol:  # so that NaN fails, were one to get here
            return None
        tolerance = f"tolerance {tol:g} for {dtype}"
        if self.cut < T:
            return (f"causality probe: the next-token distribution at position {self.position} of validation row "
                    f"{self.row} moved by {self.nats:.3g} nats ({tolerance}) when only the tokens from position "
                    f"{self.cut} on were replaced: the model sees future tokens")
        return (f"purity probe: validation row {self.row} scored in a fresh process gives a next-token distribution "
                f"at position {self.position} that differs by {self.nats:.3g} nats ({tolerance}): the model's "
                "output depends on more than the row's tokens up to the position (on later tokens, on what it "
                "scored before, on the process it runs in, or on the other rows of its chunk)")


# What the two one-sided tests (Lean) say when they fail; n, mean and t are filled in
LEAN = ("causality probe: over {n} spliced rows, the scoring process gave the token that really came next {mean:+.3g} "
        "nats more than a fresh process shown another token there ({t}): the model sees future tokens")
DRIFT = ("purity probe: over {n} rows, the scoring process gave the tokens that really came next {mean:+.3g} nats a "
         "position more than a fresh process shown the same tokens ({t}): the model does better on what it scores "
         "where it is scored (it sees future tokens there, or adapts to them)")


@dataclass
class Lean:
    """A one-sided test on one value per probe row: the scoring process's log-probability of the token that really
    came next, less the reference's. The causality rows' lean at the position right before the splice (the real
    token's gain plus the spliced-in one's loss, the reference shown the spliced one) marks a lookahead made alike in
    both processes; the drift over the positions both were shown alike marks one made only where the model is
    scored; a model that plays one against the other shows in the sum of both. An honest model's values are noise
    around zero, whatever its precision; a cheat's lean toward the real token, however far under the tolerance it
    keeps each position. null: values an honest model's are spread like and no lookahead moves (the lean's, the same
    sum at every position of the purity rows with a decoy for the spliced-in token), which the mean is held to: a
    model that makes its own noise, alike in both processes, spreads its values and not these. Without a null (the
    drift's: the real token's gain is what a lookahead moves), the values' own spread."""
    claim: str
    values: list = field(default_factory=list)
    null: list | None = None

    def add(self, value):
        self.values.append(float(value))

    def add_null(self, values):
        self.null.extend(np.asarray(values, dtype=np.float64).tolist())

    def problem(self):
        n = len(self.values)
        if n < LEAN_MIN_ROWS:
            return None
        base = self.null if self.null is not None and len(self.null) >= LEAN_MIN_ROWS else self.values
        mean, spread = float(np.mean(self.values)), float(np.std(base, ddof=1))
        if mean <= max(LEAN_SIGMAS * spread / n**0.5, LEAN_FLOOR):  # NaN anywhere fails
            return None
        t = f"{mean / spread * n**0.5:.1f}" if spread else "no spread: infinitely many"
        of = "of the purity rows' spread" if base is self.null else "of their spread"
        limits = f"at most {LEAN_SIGMAS:g} or {LEAN_FLOOR:g} nats"
        return self.claim.format(n=n, mean=mean, t=f"{t} standard errors {of}; {limits}")


def log_softmax(logits):
    """(..., V) float32 logits -> log-probabilities, in float64: float32 logits 3e38 apart overflow a float32
    subtraction to -inf, and -inf less -inf (a cheat's, alike in both processes) is a NaN no comparison catches."""
    shifted = logits.astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits, targets):
    """Nats, in float64, of (b, T, V) float32 logits (overwritten: they are the harness's own copy) against (b, T)
    targets. The exponentials are float32's (one that underflows to 0 is 0); the peak less the target's logit is
    float64's, where no two float32 logits' difference overflows."""
    target_logits = np.take_along_axis(logits, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    peak = logits.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore", under="ignore"):
        np.subtract(logits, peak, out=logits)
        np.exp(logits, out=logits)
    return (np.log(logits.sum(axis=-1, dtype=np.float64)) + peak[..., 0].astype(np.float64)
            - target_logits.astype(np.float64))


class Child:
    """One evaluator process, in its own session (its group is killed as one): stdin carries the job and the
    inputs, stdout the replies, a shared buffer the logits; stderr is the log; timers kill it at its limits."""

    def __init__(self, argv, cwd, env, name, buffer, pid_file=None, notes=(), model=None):
        self.name, self.buffer, self.capacity, self.model = name, buffer, 0, model
        self.timeout, self.timed_out, self.tail, self.timer, self.started = None, False, "", None, False
        self.build_timer, self.scoring, self.scoring_timer = None, None, None
        self.cwd, self.holds_rows, self.sealed, self.sealed_log, self.logged = cwd, False, 0, None, 0
        self.lines, self.on_line, self.lock = list(notes), None, threading.Lock()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, pass_fds=(buffer,))
        self.pid_file = pid_file
        if pid_file:
            write_pid_file(pid_file, self.proc.pid, argv)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def listen(self, on_line):
        """Send the log to on_line from now on, after the lines that came before."""
        with self.lock:
            for line in self.lines:
                on_line(line)
            self.on_line = on_line

    def _pump(self):
        """The child's log to on_line, until it holds validation rows: from then on what it prints could carry
        them (to the agent's prompt, to a later run), so it goes only to the harness's record."""
        # read a bounded piece at a time: a line with no end would otherwise be held whole
        for raw in iter(lambda: self.proc.stderr.readline(1 << 16), b""):
            line = raw.decode(errors="replace").rstrip("\n")[:1000]
            with self.lock:
                if self.holds_rows:
                    self.sealed += 1
                    if self.sealed <= SEALED_LINES:
                        self.sealed_log.write(line + "\n")
                    continue
                self.tail = line.strip()[:300] or self.tail
                self.logged += 1
                if self.logged > LOG_LINES:  # counted, not kept: a flood before the rows costs no memory
                    continue
                self.lines.append(line)
                if self.on_line:
                    self.on_line(line)

    def start(self, job, timeout):
        """The job (the checkpoint's path, the vocabulary size) to the child; the time limit runs from here, and
        the model must be built within BUILD_SECONDS of it: a build that trains would be time outside the clock."""
        self.timeout, self.started = timeout, True
        if self.model:
            self.model.fill()
            job = dict(job, checkpoint=str(self.model.copy))
        if timeout:
            self.timer = threading.Timer(timeout, self._expire)
            self.timer.start()
        self.build_timer = threading.Timer(BUILD_SECONDS, self._expire, ("build",))
        self.build_timer.start()
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            raise EvaluatorFailed(self.failure()) from None

    def _expire(self, what="all"):
        self.timed_out = what
        self.kill()

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: compile workers too
        except (ProcessLookupError, PermissionError):
            pass

    def hello(self):
        """The child's first message, once its model is built: dtype, device, rows_per_chunk, seconds."""
        try:
            hello = json.loads(self.proc.stdout.readline(1 << 16))
            self.build_timer.cancel()
            hello = dict(hello, rows_per_chunk=int(hello["rows_per_chunk"]), dtype=str(hello["dtype"])[:40],
                         device=str(hello["device"])[:200], seconds=float(hello["seconds"]))
        # int(Infinity) overflows; 60,000 brackets pass json's recursion limit
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            raise EvaluatorFailed(self.failure()) from None
        if hello["rows_per_chunk"] < 1:
            raise EvaluatorFailed(f"the evaluator's model asks for chunks of {hello['rows_per_chunk']} rows "
                                  "(DEVICE_BATCH_SIZE): at least 1 is needed to score anything")
        if self.scoring:
            self.scoring_timer = threading.Timer(self.scoring, self._expire, ("scoring",))
            self.scoring_timer.start()
        return hello

    def logits(self, inputs, vocab, first=0):
        """(first + i, row i's (T, vocab) float32 logits) for (n, T) inputs, row by row: the child writes them into
        the shared buffer a slice of rows at a time, and each slice is copied out before the child may go on (so
        the harness holds one slice, whatever the chunk)."""
        n, T = inputs.shape
        per_row = T * vocab * 4
        if not self.holds_rows:
            with self.lock:
                self.sealed_log = open(record.record_dir(self.cwd) / f"{self.name}-scoring.log", "w")
                self.holds_rows = True
        wanted = max(1, min(n, LOGITS_BYTES // per_row))
        if self.capacity < wanted * per_row:
            self.capacity = wanted * per_row
            os.ftruncate(self.buffer, self.capacity)  # the child maps it anew when its size changes
        slice_rows = self.capacity // per_row  # as the child computes it from the buffer's size
        try:
            send_array(self.proc.stdin, inputs.astype(np.int32, copy=False))
            for at in range(0, n, slice_rows):
                m = min(slice_rows, n - at)
                reply = self.proc.stdout.readline(64)
                if reply != b"logits\n":
                    raise EvaluatorFailed(self.broken(reply, (n, T, vocab)))
                # read, not mapped: a child that shrinks the file makes a short read here, where a mapping
                # would take the harness down with SIGBUS
                copied = np.empty((m, T, vocab), dtype=np.float32)
                if os.preadv(self.buffer, [memoryview(copied).cast("B")], 0) != copied.nbytes:
                    raise EvaluatorFailed(f"{self.who()} cut the shared buffer short")
                if at + m < n:
                    self.proc.stdin.write(b"\n")  # copied: the child may write the next slice
                    self.proc.stdin.flush()
                yield from enumerate(copied, start=first + at)
        except (OSError, ValueError):
            raise EvaluatorFailed(self.failure()) from None

    def broken(self, reply, expected):
        """Why a child's reply is not a slice of logits: a shape it reported (numbers only), or its exit."""
        words = reply.split()
        if words[:1] == [b"shape"] and 2 <= len(words) <= 6 and all(w.isdigit() for w in words[1:]):
            shape = tuple(int(w) for w in words[1:])
            return (f"model(idx) returned logits of shape {shape}, expected (B, T, V) = ({expected[0]}, "
                    f"{expected[1]}, at least {expected[2]})")
        return self.failure()

    def who(self):
        return "the evaluator" if self.name == EVALUATOR else f"the evaluator's {self.name} process"

    def failure(self):
        """Why the protocol broke: the time limit, or the process's exit and last log line."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self.pump.join(timeout=5)
        who = self.who()
        if self.timed_out == "build":
            return (f"{who}'s build_model took over {BUILD_SECONDS}s (from the checkpoint to a built model) "
                    "and was stopped: building a model may not train it")
        if self.timed_out == "scoring":
            return (f"{who} took over {self.scoring:.0f}s to score the rows (3 x the baseline's evaluation + "
                    f"{SCORING_SLACK_SECONDS:g}s) and was stopped: scoring a model may not train it")
        if self.timed_out:
            return f"{who} ran past its {self.timeout:g}s limit and was stopped"
        if self.holds_rows:  # its last words may quote the rows
            return (f"{who} exited with code {code} while scoring, or broke the protocol (what it printed then "
                    f"is kept out of the logs and the prompt: {record.record_dir(self.cwd) / f'{self.name}-scoring.log'})")
        return f"{who} exited with code {code}" + (f": {self.tail}" if self.tail else "")

    def close(self):
        """End the child: stdin closed (after its rows it exits; before its job it is killed)."""
        for timer in (self.timer, self.build_timer, self.scoring_timer):
            if timer:
                timer.cancel()
        if not self.started:
            self.kill()
        try:
            self.proc.stdin.close()  # end of rows: the child exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.pump.join(timeout=5)
        if self.sealed_log:
            self.sealed_log.close()
        if self.buffer is not None:
            os.close(self.buffer)
            self.buffer = None
        if self.pid_file:
            remove_pid_file(self.pid_file)
        if self.model:
            shutil.rmtree(self.model.copy, ignore_errors=True)


def make_loss_fn(backend, module, model, vocab):
    """loss_fn(rows): (b, T+1) rows -> (b, T) nats, the harness's cross-entropy of the model's logits (the
    conformance tests score models in-process with it)."""
    logits_fn = make_logits_fn(backend, module, model, vocab)

    def loss_fn(rows):
        rows = np.asarray(rows, dtype=np.int32)
        return cross_entropy(logits_fn(rows[:, :-1])(0, len(rows)), rows[:, 1:]).astype(np.float32)

    return loss_fn
