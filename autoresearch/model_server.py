"""The evaluator's child process: the agent's model, and nothing else. It imports backends/<backend>/train.py,
rebuilds the trained model with its build_model(config, weights) hook, then answers every chunk of input tokens
the harness sends with the model's logits in the shared buffer the harness made (autoresearch/evaluate.py is the
other end, and computes every number from them)."""

import importlib.util
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

import prepare

from .hardware import cpu_cores


def send_array(stream, array):
    """One int32 array on a pipe: its shape on a line, then its bytes."""
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


def load_train(backend, root):
    """backends/<backend>/train.py imported by path; importing defines the model and trains nothing."""
    path = Path(root) / "backends" / backend / "train.py"
    spec = importlib.util.spec_from_file_location(f"autoresearch_eval_{backend}_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


class LogitsShape(ValueError):
    def __init__(self, shape):
        super().__init__(f"model(idx) returned logits of shape {tuple(shape)}")
        self.shape = tuple(int(n) for n in shape)


def check_logits(shape, inputs_shape, vocab):
    if len(shape) != 3 or tuple(shape[:2]) != tuple(inputs_shape) or shape[2] < vocab:
        raise LogitsShape(shape)


def make_logits_fn(backend, module, model, vocab):
    """logits_fn(x): (n, T) int32 numpy inputs -> rows(at, m), rows at..at+m of model(x)'s logits as (m, T, vocab)
    float32 numpy, in the backend's precision (its autocast_ctx() for torch), brought to the host a slice at a
    time; columns past vocab (a padded table) are dropped."""
    return (mlx_logits_fn if backend == "mlx" else torch_logits_fn)(module, model, vocab)


def torch_logits_fn(module, model, vocab):
    import torch

    dev = next(model.parameters()).device
    # Eager everywhere, CUDA included: at the gpu profile compiling would save ~3 s of forward passes and cost
    # 15-40 s in a fresh process whose sandbox sees no compile cache (bench/eval_overhead.md, "Eager or compiled");
    # to be decided again once a GPU has measured both (bench/gpu_smoke.sh).
    @torch.inference_mode()
    def logits_fn(x):
        tokens = torch.from_numpy(np.asarray(x, dtype=np.int64)).to(dev)
        with module.autocast_ctx():
            logits = model(tokens)
        check_logits(logits.shape, x.shape, vocab)
        return lambda at, m: logits[at : at + m, :, :vocab].float().cpu().numpy()

    return logits_fn


def mlx_logits_fn(module, model, vocab):
    import mlx.core as mx

    # On CPUs MLX runs elementwise ops one scalar at a time on one core, and the soft cap's and attention's
    # transcendental passes cost more than the matmuls: the rows are split over one CPU stream per core (streams
    # run side by side, each with a single-threaded BLAS the harness preloads). On a GPU, one call.
    streams = [mx.new_stream(mx.cpu) for _ in range(cpu_cores())] if not module.on_gpu else [None]

    def logits_fn(x):
        x = np.asarray(x, dtype=np.int32)
        parts = np.array_split(x, min(len(streams), len(x)))
        outs = []
        for stream, part in zip(streams, parts):
            with mx.stream(stream or mx.default_stream(mx.default_device())):
                outs.append(model(mx.array(part)).astype(mx.float32))
        mx.eval(outs)
        for part, out in zip(parts, outs):
            check_logits(out.shape, part.shape, vocab)
        logits = mx.concatenate(outs) if len(outs) > 1 else outs[0]
        return lambda at, m: np.asarray(logits[at : at + m, :, :vocab])  # a view: serve copies it once, out

    return logits_fn


def serve(backend, buffer):
    """The child: import train.py, read the job, build the model, say so on the protocol stream, then answer every
    chunk of inputs with its logits in the shared buffer, a slice at a time, until stdin closes."""
    protocol, rows_in = os.fdopen(os.dup(1), "wb"), os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)  # what train.py prints goes to the log, never into the protocol
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # and its stdin is empty
    # Ahead of the job, only the framework's import: train.py's may touch the device (a CUDA context of ~0.5 GB
    # beside training's, which a GPU in EXCLUSIVE_PROCESS mode refuses; MPS's bf16 check), and the job comes
    # once the checkpoint exists, training over.
    importlib.import_module("mlx.core" if backend == "mlx" else "torch")
    job = json.loads(rows_in.readline())
    module = load_train(backend, Path.cwd())
    start = time.time()
    vocab = int(job["vocab_size"])
    config, weights = prepare.load_checkpoint(job["checkpoint"])
    model = module.build_model(config, weights)
    logits_fn = make_logits_fn(backend, module, model, vocab)
    hello = {"dtype": str(module.compute_dtype).rsplit(".", 1)[-1], "device": module.device_name(),
             "rows_per_chunk": int(module.DEVICE_BATCH_SIZE),  # a forward of the rows a training micro-step fits
             "seconds": round(time.time() - start, 2)}
    protocol.write((json.dumps(hello) + "\n").encode())
    protocol.flush()
    view = None
    while rows_in.peek(1):
        x = receive_array(rows_in, np.int32)
        try:
            rows = logits_fn(x)
        except LogitsShape as e:
            protocol.write(("shape " + " ".join(map(str, e.shape)) + "\n").encode())
            protocol.flush()
            return
        size = os.fstat(buffer).st_size
        slice_rows = size // (x.shape[1] * vocab * 4)
        if view is None or len(view) * 4 != size:
            view = np.frombuffer(mmap.mmap(buffer, size), dtype=np.float32)
        for at in range(0, len(x), slice_rows):
            if at:
                rows_in.read(1)  # the harness has copied the last slice out
            part = rows(at, min(slice_rows, len(x) - at))
            view[: part.size] = part.ravel()
            protocol.write(b"logits\n")
            protocol.flush()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
