"""
The fixed evaluator: the val_bpb of the checkpoint train.py saved, computed by harness code in a fresh process.

evaluate() runs in the harness's own process, where no agent code ever runs. It reads the validation rows from
the real cache and starts `python -m autoresearch.evaluate BACKEND` in the checkout. That child imports
backends/<backend>/train.py (importing never trains), reads the checkpoint's path on stdin, rebuilds the trained model with the file's
build_model(config, weights) hook, says it is ready, and then turns every chunk of rows it reads on stdin into
per-token nats on stdout: the cross-entropy of the model's logits, computed here (make_loss_fn). The parent
reduces the nats to bits per byte with prepare.evaluate_bpb, then probes the model on the first chunk:
- purity: the first chunk scored again after all the others must give the same losses as the first time;
- causality: every row's tokens after a random position replaced by others, the losses before it must not move.
A model that fails a probe is "invalid": it gets no val_bpb.

What this guarantees: train.py's own loss, its own evaluation code, what it prints and any name it rebinds
never reach the number; the loss is computed here from logits, the reduction and the probes run in the parent.
The child runs with AUTORESEARCH_CACHE set to the trainer's view (prepare.trainer_view: no validation files);
its stdin carries nothing before the model is built, and each chunk is sent only after the previous chunk's
losses are back, so the model cannot read ahead. What it cannot guarantee, sharing a process with the model: a
train.py that opens the real cache by path (the view sits inside it), monkeypatches the framework or the
interpreter, or carries validation text in its own source. That needs an OS sandbox; the ledger's commit of
every experiment makes such code visible afterwards.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import prepare

from . import record, sandbox
from .clock import SCORING_SLACK_SECONDS
from .hardware import cpu_cores, preload_blas
from .runner import remove_pid_file, write_pid_file

# How far a loss may move between two evaluations of the same prefix (nats). Honest models give identical
# numbers (every row is computed alone, masked attention adds exact zeros); the slack covers kernels that are
# not bitwise deterministic. Float32 tight, lower precisions (bf16 autocast) looser.
TOLERANCE = {"float32": 1e-4}
LOW_PRECISION_TOLERANCE = 2e-2
EVALUATOR_PID_FILE = "evaluator.pid"  # in .autoresearch/, beside the trainer's
PROBE_ROWS = 4  # rows the probes score again, where the model is not compiled for one batch shape
BUILD_SECONDS = 60  # from the checkpoint to a built model: loading weights takes seconds, never a minute
SEALED_LINES = 2000  # of the child's output while it holds rows, kept in the record for a human


@dataclass(frozen=True)
class Evaluation:
    status: str  # "ok" | "invalid" (a probe failed: not scored) | "crash" (no checkpoint, the child failed or timed out)
    val_bpb: float | None
    reason: str  # one line: the result, the failed probe's numbers, or why it crashed
    seconds: float  # the whole evaluation: process start, model build, scoring and probes
    log: str


class EvaluatorFailed(Exception):
    """The child died, timed out or broke the protocol; the message says which."""


# The child runs isolated (-I: no environment variables, user site or working directory on its path; -B: no bytecode
# written), with exactly the harness's own prepare.py and package on its path.
CHILD_MAIN = "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from autoresearch.evaluate import serve; serve(sys.argv[2])"


def harness_path():
    """The folders this process imported prepare and the autoresearch package from."""
    return [str(Path(prepare.__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]


def start_evaluator(backend, root, checkpoint, env=None, state=None):
    """The evaluator's process, started ahead: its interpreter, framework and train.py imports run while it waits
    for the checkpoint's path (evaluate(..., child=)). On a GPU the harness starts it while training runs, so the
    fresh process costs no more than evaluating in-process did. It runs in the sandbox: the checkout and the
    checkpoint read-only, no cache at all, no network, Python isolated from the environment and from bytecode."""
    child_env = dict(os.environ if env is None else env, AUTORESEARCH_CACHE=str(prepare.trainer_view()),
                     PYTHONUNBUFFERED="1")
    blas = preload_blas(child_env, one_thread=True) if backend == "mlx" else None  # mlx_loss_fn: a stream per core
    notes = [blas] if blas else []
    # the harness's state folder too: its logs hold earlier runs' output
    hidden = (str(prepare.cache_dir()), str(record.state_home()), str(Path(root) / ".autoresearch"))
    policy = sandbox.Policy(read=(str(root), str(checkpoint)), hide=hidden, network=False)
    argv, inside = sandbox.active().wrap([sys.executable, "-I", "-B", "-c", CHILD_MAIN, json.dumps(harness_path()),
                                          backend], root, policy)
    child_env.update(inside)
    return Child(argv, root, child_env, Path(state) / EVALUATOR_PID_FILE if state else None, notes)


def evaluate(backend, root, checkpoint, timeout=None, on_line=None, env=None, state=None, child=None, scoring=None):
    """Score the checkpoint of backends/<backend>/train.py in root. env: the child's base environment (default
    os.environ); its AUTORESEARCH_CACHE is replaced by the trainer's view of this process's cache. state: the
    folder for the child's pid file, so a harness started after this one was killed can stop it. child: one
    start_evaluator() started ahead, else a fresh one. scoring: seconds the scoring and probes may take once the
    model is built (the branch's clock), or None."""
    start = time.time()
    lines = []

    def note(line):
        lines.append(line)
        if on_line:
            on_line(line)

    def result(status, val_bpb, reason):
        seconds = time.time() - start
        note(f"evaluation: {status} in {seconds:.1f}s: {reason}")
        return Evaluation(status, val_bpb, reason, seconds, "\n".join(lines))

    try:
        if not (Path(checkpoint) / "config.json").exists():
            return result("crash", None, f"train.py saved no checkpoint in {checkpoint}")
        rows = np.ascontiguousarray(prepare.get_val_rows(), dtype=np.int32)
        vocab = len(prepare.get_token_bytes())
        child = child or start_evaluator(backend, root, checkpoint, env, state)
        child.scoring = scoring
        child.listen(note)
        child.start({"checkpoint": str(Path(checkpoint).resolve()), "vocab_size": vocab}, timeout)
        return result(*score(child, rows, vocab, note))
    except EvaluatorFailed as e:
        return result("crash", None, str(e))
    except BaseException:  # Ctrl-C, SIGTERM: the child goes at once
        if child:
            child.kill()
        raise
    finally:
        if child:
            child.close()


def score(child, rows, vocab, note):
    """(status, val_bpb, reason) from a started child: every row scored, then the two probes on the first chunk."""
    hello = child.hello()
    b, dtype = hello["rows_per_chunk"], hello["dtype"]
    tol = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    note(f"evaluator: model built in {hello['seconds']:.2f}s on {hello['device']} ({dtype}); "
         f"{len(rows)} validation rows in chunks of {b}")
    T = rows.shape[1] - 1

    def ask(chunk):
        # a compiled model is padded to b rows every call (one shape, one compile); an eager one gets what there is
        sent = np.resize(chunk, (b, T + 1)) if hello["compiled"] else chunk
        nats = child.losses(sent)
        if nats.shape != (len(sent), T):
            raise EvaluatorFailed(f"the evaluator returned losses of shape {nats.shape}, expected {(len(sent), T)}")
        if not np.all(np.isfinite(nats)):
            raise EvaluatorFailed("the model's losses are not finite (NaN or inf logits)")
        return nats[: len(chunk)]

    first = []  # the first chunk's losses, which the probes compare against

    def loss_fn(x, y):
        nats = ask(np.concatenate([x, y[:, -1:]], axis=1))
        if not first:
            first.append(nats)
        return nats[: len(x)]

    t0 = time.time()
    val_bpb = prepare.evaluate_bpb(loss_fn, b, rows=rows)
    scored = time.time() - t0
    # the probes' rows: the first chunk's first few (all of it where a padded chunk costs the same)
    probe = rows[: b if hello["compiled"] else min(b, PROBE_ROWS)]
    again = ask(probe)  # purity first: a model that adapts would fail the causality comparison too, misnamed
    problem = (purity_probe(again, first[0][: len(probe)], tol, dtype)
               or causality_probe(ask, probe, again, tol, dtype, vocab))
    if problem:
        return "invalid", None, f"{problem} (not scored; it would have been val_bpb {val_bpb:.6f})"
    return "ok", val_bpb, f"val_bpb {val_bpb:.6f} ({len(rows)} rows scored in {scored:.1f}s; purity and causality probes passed)"


def causality_probe(ask, rows, expected, tol, dtype, vocab):
    """Every row keeps tokens [0, cut) and gets other tokens from cut on; the losses at positions before cut - 1
    (which predict tokens before cut from tokens before cut) must not move. None, or what moved."""
    rng = np.random.default_rng()  # fresh cuts every run: a model cannot be tuned to them
    T = rows.shape[1] - 1
    cuts = rng.integers(2, T + 1, size=len(rows))
    probe = rows.copy()
    for r, cut in enumerate(cuts):
        probe[r, cut:] = (probe[r, cut:] + rng.integers(1, vocab, T + 1 - cut)) % vocab  # every later token differs
    before = np.arange(T)[None, :] < (cuts - 1)[:, None]
    diff = np.where(before, np.abs(ask(probe) - expected), 0.0)
    r, p = np.unravel_index(np.argmax(diff), diff.shape)
    if diff[r, p] > tol:
        return (f"causality probe: the loss at position {p} of validation row {r} moved by {diff[r, p]:.3g} nats "
                f"(tolerance {tol:g} for {dtype}) when only the tokens from position {cuts[r]} on were replaced: "
                "the model sees future tokens")
    return None


def purity_probe(again, first, tol, dtype):
    """The first chunk scored again after every other: the same losses, or the model adapted to what it saw."""
    diff = np.abs(again - first)
    r, p = np.unravel_index(np.argmax(diff), diff.shape)
    if diff[r, p] > tol:
        return (f"purity probe: the first chunk scored again after the others moved by up to {diff[r, p]:.3g} nats "
                f"(row {r}, position {p}; tolerance {tol:g} for {dtype}): the model adapts to the validation data")
    return None


class Child:
    """The evaluator process, in its own session (its group is killed as one): stdin and stdout carry the
    protocol, stderr is the log, a timer kills it at the time limit once it has its checkpoint."""

    def __init__(self, argv, cwd, env, pid_file=None, notes=()):
        self.timeout, self.timed_out, self.tail, self.timer, self.started = None, False, "", None, False
        self.build_timer, self.scoring, self.scoring_timer = None, None, None
        self.cwd, self.holds_rows, self.sealed, self.sealed_log = cwd, False, 0, None
        self.lines, self.on_line, self.lock = list(notes), None, threading.Lock()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
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
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.lock:
                if self.holds_rows:
                    self.sealed += 1
                    if self.sealed <= SEALED_LINES:
                        self.sealed_log.write(line[:1000] + "\n")
                    continue
                self.tail = line.strip() or self.tail
                self.lines.append(line)
                if self.on_line:
                    self.on_line(line)

    def start(self, job, timeout):
        """The job (the checkpoint's path, the vocabulary size) to the child; the time limit runs from here, and
        the model must be built within BUILD_SECONDS of it: a build that trains would be time outside the clock."""
        self.timeout, self.started = timeout, True
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
        """The child's first message, once its model is built: dtype, device, rows_per_chunk, compiled, seconds."""
        try:
            hello = json.loads(self.proc.stdout.readline())
            self.build_timer.cancel()
            if self.scoring:
                self.scoring_timer = threading.Timer(self.scoring, self._expire, ("scoring",))
                self.scoring_timer.start()
            return dict(hello, rows_per_chunk=int(hello["rows_per_chunk"]), dtype=str(hello["dtype"]),
                        compiled=bool(hello["compiled"]))
        except (ValueError, KeyError, TypeError):
            raise EvaluatorFailed(self.failure()) from None

    def losses(self, rows):
        if not self.holds_rows:
            with self.lock:
                self.sealed_log = open(record.record_dir(self.cwd) / "evaluator-scoring.log", "w")
                self.holds_rows = True
        try:
            send_array(self.proc.stdin, rows.astype(np.int32, copy=False))
            return receive_array(self.proc.stdout, np.float32)
        except (OSError, ValueError, EOFError):
            raise EvaluatorFailed(self.failure()) from None

    def failure(self):
        """Why the protocol broke: the time limit, or the process's exit and last log line."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self.pump.join(timeout=5)
        if self.timed_out == "build":
            return (f"the evaluator's build_model took over {BUILD_SECONDS}s (from the checkpoint to a built model) "
                    "and was stopped: building a model may not train it")
        if self.timed_out == "scoring":
            return (f"the evaluator took over {self.scoring:.0f}s to score the rows (3 x the baseline's evaluation + "
                    f"{SCORING_SLACK_SECONDS:g}s) and was stopped: scoring a model may not train it")
        if self.timed_out:
            return f"the evaluator ran past its {self.timeout:g}s limit and was stopped"
        if self.holds_rows:  # its last words may quote the rows
            return (f"the evaluator process exited with code {code} while scoring (what it printed then is kept "
                    f"out of the logs and the prompt: {record.record_dir(self.cwd) / 'evaluator-scoring.log'})")
        return f"the evaluator process exited with code {code}" + (f": {self.tail}" if self.tail else "")

    def close(self):
        """End the child: stdin closed (after its rows it exits; before its checkpoint it is killed)."""
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
        if self.pid_file:
            remove_pid_file(self.pid_file)


def send_array(stream, array):
    """One array on a pipe: its shape on a line, then its bytes (the dtype is fixed by the direction)."""
    array = np.ascontiguousarray(array)
    stream.write((" ".join(map(str, array.shape)) + "\n").encode() + array.tobytes())
    stream.flush()


def receive_array(stream, dtype):
    shape = tuple(int(n) for n in stream.readline().split())
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    data = stream.read(size)
    if not shape or len(data) != size:
        raise EOFError("the other end closed the pipe mid-array")
    return np.frombuffer(data, dtype).reshape(shape)


# ---------------------------------------------------------------------------
# The child: the agent's model, this module's loss
# ---------------------------------------------------------------------------


def load_train(backend, root):
    """backends/<backend>/train.py imported by path; importing defines the model and trains nothing."""
    path = Path(root) / "backends" / backend / "train.py"
    spec = importlib.util.spec_from_file_location(f"autoresearch_eval_{backend}_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def make_loss_fn(backend, module, model, vocab):
    """loss_fn(rows): (b, T+1) int32 numpy rows -> (b, T) float32 nats, the cross-entropy of model(rows[:, :-1])'s
    logits against rows[:, 1:], computed here, in the backend's precision (its autocast_ctx() for torch).
    loss_fn.compiled: whether the model is compiled for one batch shape (then every call should have b rows)."""
    return (mlx_loss_fn if backend == "mlx" else torch_loss_fn)(module, model, vocab)


def check_logits(shape, targets_shape, vocab):
    if len(shape) != 3 or tuple(shape[:2]) != tuple(targets_shape) or shape[2] < vocab:
        raise ValueError(f"model(idx) returned logits of shape {tuple(shape)}, expected (B, T, V) = "
                         f"({targets_shape[0]}, {targets_shape[1]}, at least {vocab})")


def torch_loss_fn(module, model, vocab):
    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    # Compiled where the backend trains compiled (CUDA): the forward graph is built once per process, as the old
    # in-process evaluation rebuilt it for inference mode too. Eager on MPS and CPUs, as training there.
    compiled = getattr(module, "use_compile", False) and dev.type == "cuda"
    forward = torch.compile(model, dynamic=False) if compiled else model

    @torch.inference_mode()
    def loss_fn(rows):
        tokens = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(dev)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        with module.autocast_ctx():
            logits = forward(x)
        check_logits(logits.shape, y.shape, vocab)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return nats.view(y.shape).cpu().numpy()

    loss_fn.compiled = compiled
    return loss_fn


def mlx_loss_fn(module, model, vocab):
    import mlx.core as mx

    def gpu_nats(x, y):
        logits = model(x)
        check_logits(logits.shape, y.shape, vocab)
        logits = logits.astype(mx.float32)
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0]

    forward = mx.compile(gpu_nats)  # fused kernels on Metal and CUDA; used on GPUs only
    # On CPUs MLX runs elementwise ops one scalar at a time on one core (exp ~35M/s on this CPU, numpy's SIMD exp
    # ~800M/s), and the transcendental passes over the (b, T, V) logits cost more than the matmuls. So the rows
    # are split over one CPU stream per core (streams run side by side), and numpy does the log-softmax on the
    # same memory; the harness preloads a single-threaded BLAS for it (evaluate()), one per stream.
    streams = [mx.new_stream(mx.cpu) for _ in range(cpu_cores())] if not module.on_gpu else []

    def loss_fn(rows):
        rows = np.asarray(rows, dtype=np.int32)
        if module.on_gpu:
            return np.array(forward(mx.array(rows[:, :-1]), mx.array(rows[:, 1:])))
        parts = np.array_split(rows, min(len(streams), len(rows)))
        logits = []
        for stream, part in zip(streams, parts):
            with mx.stream(stream):
                logits.append(model(mx.array(part[:, :-1])).astype(mx.float32))
        mx.eval(logits)
        for part, out in zip(parts, logits):
            check_logits(out.shape, part[:, 1:].shape, vocab)
        return np.concatenate([numpy_nats(np.array(out), part[:, 1:]) for part, out in zip(parts, logits)])

    loss_fn.compiled = module.on_gpu
    return loss_fn


def numpy_nats(logits, targets):
    """Cross-entropy in nats of (b, T, V) float32 logits against (b, T) targets, in place where it can be."""
    target_logits = np.take_along_axis(logits, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    peak = logits.max(axis=-1, keepdims=True)
    np.subtract(logits, peak, out=logits)
    np.exp(logits, out=logits)
    return (np.log(logits.sum(axis=-1)) + peak[..., 0] - target_logits).astype(np.float32)


def serve(backend):
    """The child: import train.py, read the checkpoint's path, build the model, say so on the protocol stream, then
    answer chunks of rows until stdin closes."""
    protocol, rows_in = os.fdopen(os.dup(1), "wb"), os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)  # what train.py prints goes to the log, never into the protocol
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # and its stdin is empty
    module = load_train(backend, Path.cwd())  # the framework's import: what a child started ahead has done
    job = json.loads(rows_in.readline())
    start = time.time()
    config, weights = prepare.load_checkpoint(job["checkpoint"])
    model = module.build_model(config, weights)
    loss_fn = make_loss_fn(backend, module, model, int(job["vocab_size"]))
    hello = {"dtype": str(module.compute_dtype).rsplit(".", 1)[-1], "device": module.device_name(),
             "rows_per_chunk": int(module.DEVICE_BATCH_SIZE),  # a forward of the rows a training micro-step fits
             "compiled": loss_fn.compiled, "seconds": round(time.time() - start, 2)}
    protocol.write((json.dumps(hello) + "\n").encode())
    protocol.flush()
    while rows_in.peek(1):
        send_array(protocol, np.asarray(loss_fn(receive_array(rows_in, np.int32)), dtype=np.float32))


if __name__ == "__main__":
    serve(sys.argv[1])
