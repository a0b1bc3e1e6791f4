"""
Benchmark: what one evaluation costs the harness's host, per profile, before and after the evaluator rewrite
(04fe7bd), at each profile's real shapes (T = seq_len, V = vocab_size) on this CPU.

before: the scoring process wrote every logit, (validation + holdout rows) x T x V float32, into a shared buffer the
        harness copied out (os.preadv) and reduced with single-threaded numpy (the old cross_entropy, copied below
        verbatim); a reference process sent the logits of 32 probe rows too, which the harness turned into float64
        log-probabilities (the old log_softmax), as did the scoring process's copies of the same rows. The holdout
        was the profile's whole holdout_tokens. Timed on 1, 2 and 4 units of rows (a unit: UNIT rows) and scaled
        linearly from the largest: the per-row seconds of the three show that the cost is linear.
after:  the harness sends rows in ((T + 1) int32 each, the last batch filled up with rows again) and spliced copies
        (T int32 + one int32 cut per row) to one scoring process, which answers T float32 nats per row and 2 float32
        per probed row. Bytes are counted from the protocol (every header line included); the counts are checked
        against the bytes that really went through the pipes of a full evaluate() of a tiny model exported with
        prepare.export_model and scored by autoresearch.scorer.TorchScorer (all rows for smoke and cpu; a few rows
        and fewer probes for laptop and gpu, whose full logits would take this CPU hours). The harness's seconds
        are evaluate.score() itself, at full scale, against a stand-in for the scoring process that answers from
        memory at once: the real Child.batch (its serialization included) and every piece of the harness's numpy
        work (permutation, splices, nats, moves, bits_per_byte), and no forward at all.
projection: the gpu profile on an H100 host: the forward from FLOPs at MFU of the 989 TFLOP/s bf16 peak, the
        elementwise passes over the logits from HBM bandwidth, the host seconds measured here (factor 1), the pipe
        at PIPE_BYTES_PER_S, and the scoring process's startup; experiments_per_hour = 3600 / (300 + startup + eval).

Usage: .venv/bin/python bench/eval_scale.py   (about 2 minutes on 2 cores; markdown on stdout, progress on stderr)
"""

import contextlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from autoresearch import evaluate as ev  # noqa: E402
from autoresearch.scorer import send_array  # noqa: E402

ORDER = ("smoke", "cpu", "laptop", "gpu")
# Rows per batch of the exported graph: the DEVICE_BATCH_SIZE of the backend each profile is for (cuda's 128 for gpu,
# mlx and mps's 16 elsewhere). Bytes depend on it only through the last batch's filler rows and the headers.
BATCH = {"smoke": 16, "cpu": 16, "laptop": 16, "gpu": 128}
OLD_PROBE_ROWS = 32  # the old reference process's rows (git show 04fe7bd^:autoresearch/evaluate.py, PROBE_ROWS)
REPEATS = 3
UNIT = {"smoke": 32, "cpu": 32, "laptop": 4, "gpu": 2}  # rows per unit of the before timing (fits memory, ~seconds)
# The real evaluate() per profile: (validation rows, holdout rows, probed rows, rows per batch of the tiny graph);
# None keeps the profile's own. laptop and gpu: a few rows, enough to check every byte of the protocol at their T, V.
REAL = {"smoke": (None, None, None, 16), "cpu": (None, None, None, 16), "laptop": (12, 3, 8, 4), "gpu": (8, 2, 4, 2)}

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
MFU = 0.35  # the forward's matmuls at this fraction of peak (the scorer runs the graph eagerly, node by node)
HBM_BYTES_PER_S = 2.5e12  # 75 % of the H100 SXM's 3.35 TB/s
LOGIT_BYTES = 64  # bytes moved per logit element: bf16 -> fp32 cast, the soft cap's passes, logsumexp, gather
PCIE_BYTES_PER_S = 25e9  # device to host, PCIe gen5 x16 in practice (the old design's logits)
PIPE_BYTES_PER_S = 2e9  # a local pipe, one copy each way through the kernel
CUDA_INIT_S = 4.0  # CUDA context, cuBLAS and the 50M-parameter graph's 200 MB to the GPU, on top of this CPU's startup
TRAIN_STARTUP_S = 25.0  # train.py before its first step on an H100: imports, torch.compile, export's trace
HOST_FACTOR = 1.0  # host seconds on the H100's host per second here (see bench/eval_scale.md)


# --- the old harness's reduction, verbatim from 04fe7bd^:autoresearch/evaluate.py (the code being measured) ---
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
# --- end of the old code ---


def shapes(name):
    p = prepare.PROFILES[name]
    val = prepare.val_row_count(p)
    return p.seq_len, p.vocab_size, val, prepare.holdout_row_count(p), min(prepare.holdout_row_count(p),
                                                                             val // ev.HOLDOUT_SHARE)


def probe_rows(name):
    return ev.PROBE_ROWS.get(name, ev.DEFAULT_PROBE_ROWS)


def old_bytes(T, V, rows):
    """The old evaluation's traffic: inputs in (T int32 a row) and logits out, for the scored rows and the
    reference's probe rows (its few header lines left out)."""
    n = rows + OLD_PROBE_ROWS
    return n * T * 4 + n * T * V * 4


def header(dtype, *shape):
    return len(f"{np.dtype(dtype).str} {' '.join(map(str, shape))}\n")


def new_bytes(T, rows, B, copies, ks=None):
    """(bytes in, bytes out) of the new protocol for rows scored in batches of B, with `copies` spliced batches:
    per batch a line with its count k, the rows and each copy's rows and cuts in; the nats and each copy's moves
    out, and a "ready" line out after a batch's copies. ks: each batch's k when known (a real run), else every k
    under 10 (one digit) and every copy in a batch of its own."""
    batches = -(-rows // B)
    lines = sum(len(f"{k}\n") for k in ks) if ks is not None else 2 * batches
    ready = len(b"ready\n") * (sum(1 for k in ks if k) if ks is not None else copies)
    sent = lines + batches * (header("<i4", B, T + 1) + B * (T + 1) * 4)
    sent += copies * (header("<i4", B, T) + B * T * 4 + header("<i4", B) + B * 4)
    back = ready + batches * (header("<f4", B, T) + B * T * 4) + copies * (header("<f4", B, 2) + B * 2 * 4)
    return sent, back


def fmt_bytes(n):
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --- before: the old reduction, timed ---

def old_seconds(name):
    """(per-row seconds at 1, 2 and 4 units, projected seconds for the profile): each row's logits copied out of a
    memfd as the old harness did (os.preadv) and reduced by cross_entropy; plus the probes' log_softmax."""
    T, V, val, hold_old, _ = shapes(name)
    rng = np.random.default_rng(0)
    template = (rng.standard_normal((T, V), dtype=np.float32) * 3).astype(np.float32)
    targets = rng.integers(0, V, size=(1, T))
    fd = os.memfd_create("logits")
    try:
        os.write(fd, template.tobytes())
        copied = np.empty((1, T, V), dtype=np.float32)

        def one_row():
            os.preadv(fd, [memoryview(copied).cast("B")], 0)
            cross_entropy(copied, targets)

        for _ in range(UNIT[name]):  # page the buffers in, warm the caches
            one_row()
        per_row = []
        for units in (1, 2, 4):
            n, best = units * UNIT[name], math.inf
            for _ in range(REPEATS):  # the least of a few: this 2-core machine's neighbours add noise, never take it
                t0 = time.perf_counter()
                for _ in range(n):
                    one_row()
                best = min(best, time.perf_counter() - t0)
            per_row.append((n, best / n))
        t0 = time.perf_counter()
        for _ in range(4):
            log_softmax(template)
        softmax_row = (time.perf_counter() - t0) / 4
    finally:
        os.close(fd)
    # the probes: the scoring process's and the reference's log-probabilities of 32 rows up to their cut (half the
    # rows whole, half cut uniformly: 0.75 T on average), i.e. 2 x 32 x 0.75 = 48 whole rows; and the reference's
    # 32 rows copied out and reduced like the others
    rows = val + hold_old + OLD_PROBE_ROWS
    return per_row, per_row[-1][1] * rows + 48 * softmax_row


# --- after: evaluate.score() against a stand-in that answers at once ---

class Sink:
    """The scoring process's stdin: counts what the harness writes, keeps the last k line."""

    def __init__(self):
        self.bytes, self.k, self.ks = 0, 0, []

    def write(self, data):
        self.bytes += len(data)
        if len(data) < 16 and data.endswith(b"\n") and data[:-1].isdigit():
            self.k = int(data)
            self.ks.append(self.k)

    def flush(self):
        pass


class Answers:
    """The scoring process's stdout: for each batch, its nats then one (B, 2) of zero moves per spliced copy,
    serialized once and served from memory."""

    def __init__(self, sink, B, T):
        self.sink, self.bytes, self.pending = sink, 0, b""
        out = _Buffer()
        send_array(out, np.full((B, T), 5.0, dtype=np.float32))
        self.nats = out.data
        out = _Buffer()
        send_array(out, np.zeros((B, 2), dtype=np.float32))
        self.moves = out.data

    def _fill(self):
        if not self.pending:
            self.pending = (b"ready\n" if self.sink.k else b"") + self.nats + self.moves * self.sink.k

    def peek(self, n):
        self._fill()
        return self.pending[:n]

    def readline(self, limit):
        self._fill()
        end = self.pending.index(b"\n") + 1
        line, self.pending = self.pending[:end], self.pending[end:]
        self.bytes += len(line)
        return line

    def read(self, n):
        data, self.pending = self.pending[:n], self.pending[n:]
        self.bytes += len(data)
        return data


class _Buffer:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data

    def flush(self):
        pass


class StandIn(ev.Child):
    """evaluate.Child with its process replaced by Sink and Answers: Child.batch, _write and _answer run as they
    are, so the harness's serialization is timed with its numpy work."""

    def __init__(self, B, T):  # no process, no sandbox
        import threading

        self.B, self.T = B, T
        self.lock, self.sealed = threading.Lock(), open(os.devnull, "w")
        sink = Sink()
        self.proc = type("Proc", (), {"stdin": sink, "stdout": Answers(sink, B, T)})()

    def hello(self):
        return {"batch": self.B, "seq_len": self.T, "device": "stand-in", "seconds": 0.0}


@contextlib.contextmanager
def profile_data(name, val, holdout, token_bytes):
    """prepare's readers answering with synthetic rows of the profile's shapes, for this process only."""
    saved = {k: getattr(prepare, k) for k in ("get_val_rows", "get_holdout_rows", "get_token_bytes", "load_profile")}
    prepare.get_val_rows, prepare.get_holdout_rows = (lambda: val), (lambda: holdout)
    prepare.get_token_bytes, prepare.load_profile = (lambda: token_bytes), (lambda: prepare.PROFILES[name])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(prepare, k, v)


def synthetic(name, n_val, n_hold, seed=0):
    T, V = prepare.PROFILES[name].seq_len, prepare.PROFILES[name].vocab_size
    rng = np.random.default_rng(seed)
    val = rng.integers(4, V, size=(n_val, T + 1), dtype=np.int32)
    hold = rng.integers(4, V, size=(n_hold, T + 1), dtype=np.int32)
    token_bytes = rng.integers(1, 9, size=V).astype(np.int32)
    token_bytes[:4] = 0  # the special tokens
    return val, hold, token_bytes


def new_seconds(name):
    """(harness seconds of evaluate.score at full scale with no forward, bytes in, bytes out, each batch's k) as
    counted."""
    T, V, val_n, _, hold_n = shapes(name)
    val, hold, token_bytes = synthetic(name, val_n, hold_n)
    child = StandIn(BATCH[name], T)
    with profile_data(name, val, hold, token_bytes):
        t0 = time.perf_counter()
        status, _, reason, _ = ev.score(child, val, hold, V, lambda line: None)
        seconds = time.perf_counter() - t0
    assert status == "ok", reason
    return seconds, child.proc.stdin.bytes, child.proc.stdout.bytes, child.proc.stdin.ks


# --- after, for real: a tiny model exported and scored by the harness's scoring process, its pipes counted ---

class Counted:
    """A pipe end whose bytes are counted; everything else goes to the real one."""

    def __init__(self, stream):
        self.stream, self.bytes, self.first = stream, 0, None  # first: the job line in, the hello line out

    def write(self, data):
        self.bytes += len(data)
        self.first = len(data) if self.first is None else self.first
        return self.stream.write(data)

    def read(self, n):
        data = self.stream.read(n)
        self.bytes += len(data)
        return data

    def readline(self, limit=-1):
        data = self.stream.readline(limit)
        self.bytes += len(data)
        self.first = len(data) if self.first is None else self.first
        return data

    def __getattr__(self, name):
        return getattr(self.stream, name)


def tiny_checkpoint(folder, B, T, V):
    """A bigram model (embedding, linear: causal by construction) exported through prepare.export_model."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))
    prepare.export_model(model, B, T)(folder)


def real_run(name, work):
    """One evaluate() of the tiny model at the profile's T and V: (rows scored, probed rows, counted bytes in,
    counted out, protocol's bytes in, out, evaluate seconds, score seconds, seconds waiting on the scorer)."""
    T, V, val_n, _, hold_n = shapes(name)
    n_val, n_hold, probes, B = REAL[name]
    n_val = n_val or val_n
    n_hold = min(n_hold if n_hold is not None else hold_n, n_val // ev.HOLDOUT_SHARE)  # as evaluate() cuts it
    probes = probes or probe_rows(name)
    val, hold, token_bytes = synthetic(name, n_val, n_hold, seed=1)
    checkpoint = work / f"ckpt-{name}"
    tiny_checkpoint(checkpoint, B, T, V)
    pipes, ks, waited, scored, loading = {}, [], [0.0], [0.0], [0.0]
    init, batch, hello, score = ev.Child.__init__, ev.Child.batch, ev.Child.hello, ev.score
    saved = dict(ev.PROBE_ROWS)

    def counted_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.proc.stdin, self.proc.stdout = Counted(self.proc.stdin), Counted(self.proc.stdout)
        pipes["child"] = self

    def timed_batch(self, rows, splices):
        ks.append(len(splices))
        t0 = time.perf_counter()
        try:
            return batch(self, rows, splices)
        finally:
            waited[0] += time.perf_counter() - t0

    def timed_hello(self):  # score() waits here for the process to start and load the graph
        t0 = time.perf_counter()
        try:
            return hello(self)
        finally:
            loading[0] = time.perf_counter() - t0

    def timed_score(*args):
        t0 = time.perf_counter()
        try:
            return score(*args)
        finally:
            scored[0] = time.perf_counter() - t0

    ev.Child.__init__, ev.Child.batch, ev.Child.hello, ev.score = counted_init, timed_batch, timed_hello, timed_score
    ev.PROBE_ROWS[name] = probes
    try:
        with profile_data(name, val, hold, token_bytes):
            result = ev.evaluate("cuda", work, checkpoint, timeout=600)
    finally:
        ev.Child.__init__, ev.Child.batch, ev.Child.hello, ev.score = init, batch, hello, score
        ev.PROBE_ROWS.clear()
        ev.PROBE_ROWS.update(saved)
    if result.status != "ok":
        sys.exit(f"{name}: the real evaluation ended {result.status}: {result.reason}\n{result.log[-3000:]}")
    stdin, stdout = pipes["child"].proc.stdin, pipes["child"].proc.stdout
    sent, back = new_bytes(T, n_val + n_hold, B, sum(ks), ks)
    return dict(rows=n_val + n_hold, probes=sum(ks) * B, B=B, counted_in=stdin.bytes - stdin.first,
                counted_out=stdout.bytes - stdout.first, sent=sent, back=back, seconds=result.seconds,
                startup=result.seconds - scored[0] + loading[0], harness=scored[0] - loading[0] - waited[0],
                waited=waited[0])


def gpu_forward():
    """(params, forward FLOPs per token) of backends/cuda/train.py's default model at the gpu profile: its own
    estimate_flops (training: 6 per weight plus attention) divided by 3, the forward's share."""
    import torch

    spec = importlib.util.spec_from_file_location("cuda_train", ROOT / "backends" / "cuda" / "train.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    p = prepare.PROFILES["gpu"]
    d = math.ceil(m.DEPTH * m.ASPECT_RATIO / m.HEAD_DIM) * m.HEAD_DIM
    config = m.GPTConfig(sequence_len=p.seq_len, vocab_size=p.vocab_size, n_layer=m.DEPTH, n_head=d // m.HEAD_DIM,
                         n_kv_head=d // m.HEAD_DIM, n_embd=d, window_pattern=m.WINDOW_PATTERN)
    with torch.device("meta"):
        model = m.GPT(config)
    return model.num_params(), model.estimate_flops() / 3


def main():
    started, load = time.time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="eval-scale-"))
    os.environ["AUTORESEARCH_CACHE"] = str(work / "cache")  # the scoring process's copy of the checkpoint goes here
    os.environ["AUTORESEARCH_STATE"] = str(work / "state")  # and its sealed log here
    rows, real = {}, {}
    try:
        for name in ORDER:
            T, V, val_n, hold_old, hold_new = shapes(name)
            per_row, before_s = old_seconds(name)
            log(f"{name}: before {before_s:.1f}s ({', '.join(f'{n} rows {s * 1e3:.1f} ms/row' for n, s in per_row)})")
            after_s, sent, back, ks = new_seconds(name)
            copies = -(-probe_rows(name) // BATCH[name])
            expect = new_bytes(T, val_n + hold_new, BATCH[name], copies, ks)
            assert (sent, back) == expect, (name, sent, back, expect)
            log(f"{name}: after {after_s:.2f}s, {sent + back} bytes")
            rows[name] = dict(T=T, V=V, val=val_n, hold_old=hold_old, hold_new=hold_new, per_row=per_row,
                              before_bytes=old_bytes(T, V, val_n + hold_old), before_s=before_s,
                              after_bytes=sent + back, sent=sent, back=back, after_s=after_s, copies=copies)
            real[name] = real_run(name, work)
            log(f"{name}: real evaluate() {real[name]}")
        params, flops = gpu_forward()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, real, params, flops, load, time.time() - started)


def report(rows, real, params, flops, load, seconds):
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({cpu_name()}), load average {load:.1f} at the start; "
          f"the script ran {seconds:.0f} s.\n")
    print("| profile | T | V | rows scored (val + holdout) before / after | probed rows before / after | "
          "host bytes before | host bytes after | before / after | harness s before | harness s after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['T']} | {r['V']} | {r['val']} + {r['hold_old']} / {r['val']} + {r['hold_new']} | "
              f"{OLD_PROBE_ROWS} / {r['copies'] * BATCH[name]} | {fmt_bytes(r['before_bytes'])} | "
              f"{fmt_bytes(r['after_bytes'])} | {r['before_bytes'] / r['after_bytes']:,.0f}x | {r['before_s']:,.1f} | "
              f"{r['after_s']:.2f} |")
    print("\nBefore, linearity: seconds per row (logits copied out of the memfd and cross_entropy) at 1, 2 and 4 "
          "units of rows; the projection uses the last.\n")
    print("| profile | per row at 1 unit | at 2 units | at 4 units | spread |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        ms = [s * 1e3 for _, s in r["per_row"]]
        cells = " | ".join(f"{v:.2f} ms ({n} rows)" for (n, _), v in zip(r["per_row"], ms))
        print(f"| {name} | {cells} | {(max(ms) - min(ms)) / min(ms):.0%} |")
    print("\nAfter, the real path: a tiny bigram model exported by prepare.export_model and scored by the harness's "
          "scoring process (autoresearch.scorer.TorchScorer) in a full evaluate(), its pipes counted. Counted bytes "
          "leave out the job line (in) and the hello line (out); the protocol's are new_bytes() for the same rows, "
          "batch and draws of k. Startup: from evaluate()'s start to the scorer's hello (process, imports, "
          "checkpoint copy, graph load and check). Harness s: the rest of score() less the time Child.batch waited "
          "on the scorer (which includes the pipe writes and reads).\n")
    print("| profile | rows (batch) | probed rows | bytes in counted / protocol | bytes out counted / protocol | "
          "evaluate() s | startup and graph load s | waiting on the scorer s | harness s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in real.items():
        same = "=" if (r["counted_in"], r["counted_out"]) == (r["sent"], r["back"]) else "MISMATCH"
        print(f"| {name} | {r['rows']} ({r['B']}) | {r['probes']} | {r['counted_in']:,} / {r['sent']:,} {same} | "
              f"{r['counted_out']:,} / {r['back']:,} {same} | {r['seconds']:.1f} | {r['startup']:.2f} | "
              f"{r['waited']:.2f} | {r['harness']:.2f} |")
    g = rows["gpu"]
    tokens = (g["val"] + g["hold_new"]) * g["T"] + g["copies"] * BATCH["gpu"] * g["T"]
    forward = tokens * flops / (MFU * PEAK_FLOPS)
    logits = tokens * g["V"] * LOGIT_BYTES / HBM_BYTES_PER_S
    host = g["after_s"] * HOST_FACTOR
    pipe = g["after_bytes"] / PIPE_BYTES_PER_S
    startup = real["gpu"]["startup"] + CUDA_INIT_S
    total = forward + logits + host + pipe + startup
    # before: the same device work, every logit over PCIe, and the harness's copy and reduction (the child's own
    # write into the shared buffer left out: the figure is low, if anything)
    old_total = forward + logits + g["before_bytes"] / PCIE_BYTES_PER_S + g["before_s"] * HOST_FACTOR + startup
    print(f"\nProjection, gpu profile on one H100 (estimates, not measurements): backends/cuda/train.py's default "
          f"model, {params / 1e6:.1f}M parameters, {flops / 1e6:.1f} MFLOP per token forward; {tokens / 1e6:.2f}M "
          f"tokens ({g['val']} validation + {g['hold_new']} holdout rows + {g['copies'] * BATCH['gpu']} probed rows, "
          f"x {g['T']}).\n")
    print("| piece | seconds | how |")
    print("|---|---|---|")
    print(f"| forward matmuls | {forward:.1f} | {tokens * flops:.3g} FLOP at {MFU:.0%} of {PEAK_FLOPS / 1e12:.0f} "
          "TFLOP/s |")
    print(f"| passes over the logits on the GPU | {logits:.1f} | {tokens * g['V']:.3g} logits x {LOGIT_BYTES} B at "
          f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s |")
    print(f"| harness on the host | {host:.1f} | measured here (after), x {HOST_FACTOR:g} |")
    print(f"| pipes | {pipe:.2f} | {fmt_bytes(g['after_bytes'])} at {PIPE_BYTES_PER_S / 1e9:.0f} GB/s |")
    print(f"| scoring process startup and graph load | {startup:.1f} | measured here (gpu shapes, tiny graph) + "
          f"{CUDA_INIT_S:g} s CUDA init and weights |")
    print(f"| **evaluation, after** | **{total:.1f}** | target 26 s |")
    print(f"| evaluation, before | {old_total:,.0f} | the same device terms and startup, "
          f"{fmt_bytes(g['before_bytes'])} of logits over PCIe at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s, the old "
          "harness's copy and reduction |")
    print(f"\nexperiments_per_hour = 3600 / (300 + {TRAIN_STARTUP_S:g} startup + eval): after "
          f"**{3600 / (300 + TRAIN_STARTUP_S + total):.2f}**, before {3600 / (300 + TRAIN_STARTUP_S + old_total):.2f}.")


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
