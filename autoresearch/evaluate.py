"""
The fixed evaluator: the val_bpb of the graph train.py exported, computed by the harness's own code.

evaluate() starts one scoring process (autoresearch/scorer.py, in the sandbox) that loads the graph, refuses one
outside the allowlist, and runs it on the device. The harness sends it every validation and holdout row, and
spliced copies of some batches; it answers with one loss per token and, per probed row, the largest move of a
log-probability before the splice. backends/README.md ("Scoring") states the protocol and its guarantees.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import prepare

from . import kernels, record, sandbox
from .clock import SCORING_SLACK_SECONDS
from .hardware import preload_blas
from .runner import remove_pid_file, state_of, write_pid_file
from .scorer import MAX_GRAPH_BYTES, MAX_TENSOR_BYTES, PROBLEM, receive_array, send_array

# How far a log-probability before a splice may move (nats). The probe runs the same graph on the same batch, in
# the same process, with deterministic kernels, so an honest model's positions before the splice get the same bits.
TOLERANCE = 1e-4
# Rows probed per evaluation: a lookahead that fires at a fraction f of the positions escapes with (1 - f) ** n.
# 1200: f = 1/256 escapes 0.9 %. The smoke profile (tests) probes fewer, its bound stated in backends/README.md.
PROBE_ROWS = {"smoke": 48}
DEFAULT_PROBE_ROWS = 1200
HOLDOUT_SHARE = 4  # the holdout scored is at most a quarter of the validation rows
BUILD_SECONDS = 60  # from the job to a loaded, checked graph
LOG_LINES = 2000  # of the scoring process's output, kept
FRAMEWORK = {"mlx": "mlx", "cuda": "torch", "mps": "torch"}
# the most of each checkpoint file the evaluator copies: a graph is megabytes, the tensors what the scorer loads
MAX_COPY = {"graph.json": MAX_GRAPH_BYTES, "graph.mlxfn": MAX_GRAPH_BYTES, "tensors.npz": MAX_TENSOR_BYTES + (1 << 20)}


@dataclass(frozen=True)
class Evaluation:
    status: str  # "ok" | "invalid" (a probe failed: not scored) | "crash" (no checkpoint, refused, failed, timed out)
    val_bpb: float | None
    reason: str  # one line: the result, the probe that failed, or why it crashed
    seconds: float  # the whole evaluation: process start, graph load, scoring and probes
    log: str
    holdout_bpb: float | None = None  # the holdout rows' bits per byte, scored in the same pass; no decision reads it


class EvaluatorFailed(Exception):
    """The scoring process refused the graph, died, timed out or broke the protocol; the message says which."""


# The scoring process runs isolated (-I: no environment, user site or working directory on its path; -B: no
# bytecode written), with exactly the harness's own prepare.py and package on its path.
CHILD_MAIN = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from autoresearch.scorer import serve; "
              "serve(sys.argv[2])")


def harness_path():
    """The folders this process imported prepare and the autoresearch package from."""
    return [str(Path(prepare.__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]


def evaluate(backend, root, checkpoint, timeout=None, on_line=None, scoring=None):
    """Score the checkpoint train.py left in checkpoint. timeout: seconds for the whole evaluation; scoring:
    seconds once the graph is loaded (the branch's clock), or None."""
    start, lines, child = time.time(), [], None

    def note(line):
        lines.append(line)
        if on_line:
            on_line(line)

    def result(status, val_bpb, reason, holdout_bpb=None):
        seconds = time.time() - start
        note(f"evaluation: {status} in {seconds:.1f}s: {reason}")
        return Evaluation(status, val_bpb, reason, seconds, "\n".join(lines), holdout_bpb)

    try:
        tensors = Path(checkpoint) / "tensors.npz"
        if not (tensors.is_file() and not tensors.is_symlink()):  # a link is never followed (copy_checkpoint)
            return result("crash", None, f"train.py saved no checkpoint in {checkpoint} (prepare.export_model)")
        val = np.ascontiguousarray(prepare.get_val_rows(), dtype=np.int32)
        holdout = prepare.get_holdout_rows()
        holdout = np.ascontiguousarray(holdout[: len(val) // HOLDOUT_SHARE] if holdout is not None else val[:0],
                                       dtype=np.int32)
        child = Child(backend, root, checkpoint, state_of(root), note)
        child.start(timeout, scoring, len(prepare.get_token_bytes()))
        return result(*score(child, val, holdout, len(prepare.get_token_bytes()), note))
    except EvaluatorFailed as e:
        return result("crash", None, str(e))
    except BaseException:  # Ctrl-C, SIGTERM: the scoring process goes at once
        if child:
            child.kill()
        raise
    finally:
        if child:
            child.close()


def score(child, val, holdout, vocab, note):
    """(status, val_bpb, reason, holdout_bpb): every row once, in batches drawn now, some batches again as spliced
    copies; both figures from the losses, the verdict from the copies."""
    hello = child.hello()
    B, T = hello["batch"], val.shape[1] - 1
    if hello["seq_len"] != T:
        raise EvaluatorFailed(f"the exported graph takes rows of {hello['seq_len']} tokens; the profile's are {T}")
    note(f"evaluator: graph loaded in {hello['seconds']:.2f}s on {hello['device']}; {len(val)} validation and "
         f"{len(holdout)} holdout rows in batches of {B}")
    rng = np.random.default_rng()  # fresh every evaluation: nothing in train.py can be tuned to it
    rows = np.concatenate([val, holdout])
    order = rng.permutation(len(rows))
    order = np.concatenate([order, np.resize(order, -len(order) % B)])  # the last batch filled with rows again
    batches = order.reshape(-1, B)
    wanted = PROBE_ROWS.get(prepare.load_profile().name, DEFAULT_PROBE_ROWS)
    copies = np.bincount(rng.integers(len(batches), size=-(-wanted // B)), minlength=len(batches))
    nats = np.empty((len(rows), T), dtype=np.float64)
    worst = Move()
    t0 = time.time()
    for picked, k in zip(batches, copies):
        splices = [splice(rows[picked, :-1], val, vocab, rng) for _ in range(k)]
        answer, moves = child.batch(rows[picked], splices)
        nats[picked] = answer
        for (spliced, cuts), moved in zip(splices, moves):
            worst = max(worst, *(Move(float(m[0]), int(m[1]), int(c)) for m, c in zip(moved, cuts)))
    if not np.all(np.isfinite(nats)):
        raise EvaluatorFailed("the model's losses are not finite (its logits hold NaN or inf)")
    seconds = time.time() - t0
    val_bpb = bits_per_byte(nats[: len(val)], val, B)
    held = bits_per_byte(nats[len(val) :], holdout, B) if len(holdout) else None
    probed = int(copies.sum()) * B
    if not worst.nats <= TOLERANCE:  # so that NaN fails
        # The figures are the model's to choose (a move's size, its position), so they go to the record only: the
        # reason that reaches the agent is a fixed sentence.
        child.record(f"causality probe: a log-probability at position {worst.position} moved by {worst.nats:.6g} "
                     f"nats when only the tokens from position {worst.cut} on were replaced; it would have been "
                     f"val_bpb {val_bpb:.6f}")
        return "invalid", None, (f"causality probe: a log-probability before a splice moved by more than "
                                 f"{TOLERANCE:g} nats when only the tokens from the splice on were replaced: the "
                                 f"model sees future tokens, or other rows of its batch (not scored; the figures "
                                 f"are in {child.sealed_log()})"), None
    also = f"; holdout {held:.6f} on {len(holdout)} rows" if held is not None else ""
    return "ok", val_bpb, (f"val_bpb {val_bpb:.6f} ({len(val)} rows scored in {seconds:.1f}s{also}; causality probes "
                           f"on {probed} rows passed)"), held


@dataclass(frozen=True, order=True)
class Move:
    """The largest move of a log-probability before a splice seen so far (ordered by it)."""
    nats: float = 0.0
    position: int = -1
    cut: int = 0


def splice(inputs, val, vocab, rng):
    """A copy of a batch's inputs whose every row, from a cut drawn in [1, T), holds another validation row's text,
    with a new token right at the cut; and the cuts."""
    B, T = inputs.shape
    spliced, cuts = inputs.copy(), rng.integers(1, T, size=B)
    for i, cut in enumerate(cuts):
        donor, at = rng.integers(len(val)), rng.integers(0, cut + 1)
        spliced[i, cut:] = val[donor, at : at + T - cut]
    same = spliced[np.arange(B), cuts] == inputs[np.arange(B), cuts]
    spliced[np.arange(B)[same], cuts[same]] = (inputs[np.arange(B)[same], cuts[same]]
                                               + rng.integers(1, vocab, size=int(same.sum()))) % vocab
    return spliced, cuts.astype(np.int32)


def bits_per_byte(nats, rows, batch):
    """prepare.evaluate_bpb over losses computed already, which it asks for batch by batch."""
    at = [0]

    def loss_fn(x, y):
        at[0] += len(x)
        return nats[at[0] - len(x) : at[0]]

    return prepare.evaluate_bpb(loss_fn, batch, rows=rows)


def copy_checkpoint(checkpoint, copy, stopped):
    """The checkpoint's files copied, regular files only: a link would copy what it names, a FIFO would hold the
    harness. A file over its size in MAX_COPY is refused: a sparse one costs train.py nothing and the copy its size.
    stopped(): the evaluation's time ran out, mid-copy."""
    for name in prepare.CHECKPOINT_FILES:
        try:
            fd = os.open(Path(checkpoint) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            if info.st_size > MAX_COPY[name]:
                raise EvaluatorFailed(f"the checkpoint's {name} is {info.st_size:,} bytes, over the "
                                      f"{MAX_COPY[name]:,} the evaluator reads")
            with open(Path(copy) / name, "wb") as out:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    if stopped():
                        return
                    out.write(chunk)


class Child:
    """The scoring process, in its own session (its group is killed as one) and in the sandbox (no cache, no
    network, the checkout and its copy of the checkpoint read-only): stdin carries the job and the rows, stdout
    the answers, stderr the log; timers kill it at its limits."""

    def __init__(self, backend, root, checkpoint, state, note):
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")  # deterministic cuBLAS
        blas = preload_blas(env) if backend == "mlx" else None
        self.checkpoint, self.copy = checkpoint, kernels.run_folder("evaluator")
        hidden = (str(prepare.cache_dir()), str(record.state_home()), str(Path(root) / ".autoresearch"))
        policy = sandbox.Policy(read=(str(root), str(self.copy)), hide=hidden, network=False)
        argv, inside = sandbox.active().wrap([sys.executable, "-I", "-B", "-c", CHILD_MAIN,
                                              json.dumps(harness_path()), FRAMEWORK[backend]], root, policy)
        env.update(inside)
        self.root, self.note, self.lock = root, note, threading.Lock()
        self.timers, self.timed_out, self.tail, self.logged, self.scoring, self.sealed = [], None, "", 0, None, None
        self.proc = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.pid_file = Path(state) / "evaluator.pid" if state else None
        if self.pid_file:
            write_pid_file(self.pid_file, self.proc.pid, argv)
        if blas:
            note(blas)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self):
        """The process's log into the evaluation's, a bounded piece of a line at a time, until it holds rows: from
        then on an error's message could quote a token, so the log goes to the harness's record only."""
        for raw in iter(lambda: self.proc.stderr.readline(1 << 16), b""):
            line = raw.decode(errors="replace").rstrip("\n")[:1000]
            with self.lock:
                self.logged += 1
                if self.logged > LOG_LINES:  # counted, not kept: a flood costs no memory
                    continue
                if self.sealed:
                    self.sealed.write(line + "\n")
                    continue
                self.tail = line.strip()[:300] or self.tail
                self.note(f"[scorer] {line}")

    def start(self, timeout, scoring, vocab):
        """The job (the copy of the checkpoint, the vocabulary's size) to the process; its limits run from here."""
        self.timeout, self.scoring = timeout, scoring
        self._timer(timeout, "all")
        self._timer(BUILD_SECONDS, "build")
        copy_checkpoint(self.checkpoint, self.copy, lambda: self.timed_out)
        self._write((json.dumps({"checkpoint": str(self.copy), "vocab": vocab}) + "\n").encode())

    def _timer(self, seconds, what):
        if seconds:
            timer = threading.Timer(seconds, self._expire, (what,))
            timer.start()
            self.timers.append(timer)

    def _expire(self, what):
        self.timed_out = self.timed_out or what
        self.kill()

    def _write(self, data):
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except OSError:
            raise EvaluatorFailed(self.failure()) from None

    def hello(self):
        """The process's first answer, once the graph is loaded and checked: batch, seq_len, device, seconds."""
        line = self.proc.stdout.readline(1 << 16)
        if line.startswith(PROBLEM.encode()):
            raise EvaluatorFailed("the exported model is refused: " + line.decode(errors="replace")[len(PROBLEM):]
                                  .strip()[:400])
        try:
            hello = json.loads(line)
            hello = dict(batch=int(hello["batch"]), seq_len=int(hello["seq_len"]), device=str(hello["device"])[:200],
                         seconds=float(hello["seconds"]))
        except (ValueError, KeyError, TypeError):
            raise EvaluatorFailed(self.failure()) from None
        self.timers.pop().cancel()  # the build's
        if not 1 <= hello["batch"] <= 1 << 16:
            raise EvaluatorFailed(f"the exported graph takes batches of {hello['batch']} rows: 1 to 65536 are scored")
        self._timer(self.scoring, "scoring")
        return hello

    def batch(self, rows, splices):
        """(per-token nats, [each spliced copy's (B, 2) moves]) for a batch of rows and its spliced copies."""
        if not self.sealed:
            with self.lock:
                self.sealed = open(self.sealed_log(), "w")
        self._write(f"{len(splices)}\n".encode())
        try:
            for spliced, cuts in splices:  # first: backends/README.md says why
                send_array(self.proc.stdin, spliced)
                send_array(self.proc.stdin, cuts)
            if splices and self.proc.stdout.readline(16) != b"ready\n":
                raise EOFError("no ready after the spliced copies")
            send_array(self.proc.stdin, rows)
            nats = self._answer((len(rows), rows.shape[1] - 1))
            return nats, [self._answer((len(rows), 2)) for _ in splices]
        except (OSError, ValueError, EOFError):
            raise EvaluatorFailed(self.failure()) from None

    def _answer(self, shape):
        answer = receive_array(self.proc.stdout)
        if answer.shape != shape:
            raise ValueError(f"an answer of shape {answer.shape}, not {shape}")
        return answer.astype(np.float64)

    def sealed_log(self):
        return record.record_dir(self.root) / "evaluator-scoring.log"

    def record(self, line):
        """A line for the harness's record only, beside the scoring process's log."""
        with self.lock:
            self.sealed.write(line + "\n")

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group
        except (ProcessLookupError, PermissionError):
            pass

    def failure(self):
        """Why the protocol broke: a time limit, or the process's exit and last log line."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self.pump.join(timeout=5)
        if self.timed_out == "build":
            return f"the evaluator took over {BUILD_SECONDS}s to load the exported graph and was stopped"
        if self.timed_out == "scoring":
            return (f"the evaluator took over {self.scoring:.0f}s to score the rows (3 x the baseline's evaluation + "
                    f"{SCORING_SLACK_SECONDS:g}s) and was stopped")
        if self.timed_out:
            return f"the evaluator ran past its {self.timeout:g}s limit and was stopped"
        if self.sealed:  # its last words may quote a row
            return (f"the evaluator exited with code {code} while scoring (its log is kept out of the prompt: "
                    f"{self.sealed_log()})")
        return f"the evaluator exited with code {code}" + (f": {self.tail}" if self.tail else "")

    def close(self):
        """End the process (stdin closed: it exits) and remove what it used."""
        for timer in self.timers:
            timer.cancel()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.pump.join(timeout=5)
        if self.sealed:
            self.sealed.close()
        if self.pid_file:
            remove_pid_file(self.pid_file)
        shutil.rmtree(self.copy, ignore_errors=True)
