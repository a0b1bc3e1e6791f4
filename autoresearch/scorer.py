"""The evaluator's scoring process: the harness's own code running the graph train.py exported, never train.py.
backends/README.md ("Scoring") states the protocol; autoresearch/evaluate.py is the other end of the pipe."""

import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

MAX_GRAPH_BYTES = 256 << 20  # the graph alone, weights apart: a real one is a few MB
MAX_TENSOR_BYTES = 8 << 30  # the weights: 2 G float32 parameters

# The operators a graph may use. Each is a pure function of its inputs: nothing random, nothing in place, nothing
# that reads memory it did not write (torch.empty would hand out the allocator's earlier blocks: last batch's rows).
TORCH_OPS = {
    "abs", "add", "addmm", "alias", "all", "amax", "amin", "__and__", "any", "arange", "argmax",
    "_assert_tensor_metadata", "baddbmm", "bmm", "cat", "ceil", "clamp", "clamp_max", "clamp_min", "clone",
    "constant_pad_nd", "contiguous", "cos", "cumsum", "div", "embedding", "eq", "erf", "exp", "expand", "flatten",
    "flip", "floor", "floor_divide", "fmod", "full", "full_like", "gather", "ge", "gelu", "gt", "index",
    "index_select", "layer_norm", "le", "lift_fresh_copy", "linear", "log", "log1p", "_log_softmax", "log_softmax",
    "logical_and", "logical_not", "logical_or", "logsumexp", "lt", "masked_fill", "matmul", "max", "maximum", "mean",
    "min", "minimum", "mm", "mul", "native_layer_norm", "ne", "neg", "ones", "ones_like", "__or__", "permute", "pow",
    "reciprocal", "relu", "remainder", "repeat", "repeat_interleave", "reshape", "rms_norm", "roll", "round", "rsqrt",
    "scalar_tensor", "scaled_dot_product_attention", "select", "sigmoid", "sign", "silu", "sin", "slice", "_softmax",
    "softmax", "softplus", "split", "split_with_sizes", "sqrt", "square", "squeeze", "stack", "sub", "sum", "t",
    "tanh", "_to_copy", "transpose", "tril", "triu", "type_as", "unbind", "unflatten", "_unsafe_view", "unsqueeze",
    "var", "view", "where", "zeros", "zeros_like",
}
MLX_OPS = {
    "Abs", "Add", "AddMM", "Arange", "ArgReduce", "AsType", "BitwiseAnd", "BitwiseBinary", "BitwiseOr", "BitwiseXor",
    "Broadcast", "BroadcastAxes", "Ceil", "Concatenate",
    "Contiguous", "Copy", "Cos", "CumSum", "Divide", "Equal", "Erf", "Exp", "ExpandDims", "Flatten", "Floor", "Full",
    "Gather", "GatherAxis", "Greater", "GreaterEqual", "LayerNorm", "Less", "LessEqual", "Load", "Log", "Log1p",
    "LogicalAnd", "LogicalNot", "LogicalOr", "LogSumExp", "Matmul", "Max", "Maximum", "Min", "Minimum", "Multiply",
    "Negative", "NotEqual", "Pad", "Power", "Prod", "RMSNorm", "RoPE", "Reshape", "Round", "Rsqrt",
    "ScaledDotProductAttention", "Select", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Square",
    "Squeeze", "Subtract", "Remainder", "Sum", "Tanh", "Transpose", "Unflatten",
}
PROBLEM = "model:"  # the first word of a one-line reason the graph is refused, on the protocol stream


class Refused(Exception):
    """The graph or its tensors break the contract; the message says how, in one line."""


def send_array(stream, array):
    """One array on a pipe: its dtype and shape on a line, then its bytes."""
    array = np.ascontiguousarray(array)
    stream.write(f"{array.dtype.str} {' '.join(map(str, array.shape))}\n".encode() + array.tobytes())
    stream.flush()


def receive_array(stream):
    head = stream.readline(256).split()
    if not head:
        raise EOFError("the other end closed the pipe")
    dtype, shape = np.dtype(head[0].decode()), tuple(int(n) for n in head[1:])
    if dtype.kind not in "iuf" or len(shape) > 3:
        raise ValueError(f"not an array of numbers: {head!r}")
    size = int(np.prod(shape)) * dtype.itemsize
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the other end closed the pipe mid-array")
    return np.frombuffer(data, dtype).reshape(shape)


def load_tensors(folder, names):
    """The named arrays of the checkpoint's tensors.npz, in numpy's format (never a pickle): only those, and only
    once the archive's own sizes say they fit MAX_TENSOR_BYTES (a few compressed MB can inflate to many GB)."""
    try:
        with np.load(Path(folder) / "tensors.npz", allow_pickle=False) as f:
            sizes = {info.filename.removesuffix(".npy"): info.file_size for info in f.zip.infolist()}
            total = sum(sizes.get(name, 0) for name in names)
            if total > MAX_TENSOR_BYTES:
                raise Refused(f"the graph's tensors are {total:,} bytes, over the {MAX_TENSOR_BYTES:,} it may load")
            return {name: f[name] for name in names if name in sizes}
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as e:
        raise Refused(f"tensors.npz is not a numpy archive of arrays ({type(e).__name__})") from None


class TorchGraph:
    """A torch.export graph (its JSON) run node by node with the checkpoint's tensors: the same operators the
    exported program would call, each one from the allowlist, with no Python of the agent's."""

    def __init__(self, folder):
        import torch
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE, _SERIALIZE_TO_TORCH_LAYOUT

        self.torch, self.dtypes, self.layouts = torch, _SERIALIZE_TO_TORCH_DTYPE, _SERIALIZE_TO_TORCH_LAYOUT
        path = Path(folder) / "graph.json"
        if path.stat().st_size > MAX_GRAPH_BYTES:
            raise Refused(f"graph.json is over {MAX_GRAPH_BYTES >> 20} MB")
        try:
            program = json.loads(path.read_bytes())
            module = program["graph_module"]
            graph, signature = module["graph"], module["signature"]
            self.nodes, self.metas = graph["nodes"], graph["tensor_values"]
            specs = signature["input_specs"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise Refused("graph.json is not a torch.export program") from None
        if program.get("range_constraints") or graph.get("sym_int_values") or graph.get("custom_obj_values"):
            raise Refused("the graph has symbolic shapes or custom objects: export it with static shapes")
        self.ops = [self.operator(node.get("target")) for node in self.nodes]
        for node in self.nodes:  # attention's dropout is the one random argument an allowed operator takes
            for given in node["inputs"]:
                if given.get("name") == "dropout_p" and given["arg"].get("as_float", 0.0) != 0.0:
                    raise Refused("the graph's attention drops out at random: a graph must be a function of its rows")
        own, self.input = {}, None  # the graph's name of each of its tensors -> its name in tensors.npz
        for spec in specs:
            (kind, body), = spec.items()
            if kind == "user_input" and self.input is None:
                self.input = body["arg"]["as_tensor"]["name"]
            elif kind in ("parameter", "buffer", "tensor_constant"):
                own[body["arg"]["name"]] = body.get(f"{kind}_name")
            else:
                raise Refused(f"the graph takes a {kind} input: it may take the token ids and its own tensors only")
        tensors = load_tensors(folder, list(own.values()))
        self.env = {name: self.tensor(name, tensors.get(target), target) for name, target in own.items()}
        outputs = signature["output_specs"]
        if self.input is None or [next(iter(o)) for o in outputs] != ["user_output"]:
            raise Refused("the graph must take one input (the token ids) and return one output (the logits), "
                          "mutating nothing")
        self.output = outputs[0]["user_output"]["arg"]["as_tensor"]["name"]
        # each value is dropped after the last node that reads it: a whole forward's activations would not fit
        last = {}
        for i, node in enumerate(self.nodes):
            for given in node["inputs"]:
                last.update((name, i) for name in tensor_names(given["arg"]) if name)
        self.drops = [[] for _ in self.nodes]
        for name, i in last.items():
            if name != self.output and name not in self.env:
                self.drops[i].append(name)
        meta = self.metas[self.input]
        self.batch, self.seq_len = (int(s["as_int"]) for s in meta["sizes"])
        self.device = self.torch.device(meta["device"]["type"], meta["device"].get("index"))

    def operator(self, target):
        match = re.fullmatch(r"torch\.ops\.aten\.(\w+)\.(\w+)", str(target))
        if not match or match[1] not in TORCH_OPS:
            raise Refused(f"the graph calls {str(target)[:80]}, which is not among the operators the referee runs "
                          "(autoresearch/scorer.py TORCH_OPS)")
        op = getattr(getattr(self.torch.ops.aten, match[1]), match[2], None)
        # an overload that writes into an argument (add.out) would keep state from one batch to the next
        if op is None or any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments):
            raise Refused(f"the graph calls {str(target)[:80]}, an overload the referee does not run (it writes into "
                          "an argument, or does not exist)")
        return op

    def tensor(self, name, array, target):
        meta = self.metas.get(name) or {}
        if array is None:
            raise Refused(f"tensors.npz has no {target!r}, which the graph takes")
        dtype = self.dtypes[meta["dtype"]]
        t = self.torch.from_numpy(np.array(array))
        if dtype == self.torch.bfloat16 and t.dtype == self.torch.int16:
            t = t.view(self.torch.bfloat16)
        shape = tuple(int(s["as_int"]) for s in meta["sizes"])
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise Refused(f"tensors.npz's {target!r} is {tuple(t.shape)} {t.dtype}, the graph takes {shape} {dtype}")
        return t.to(self.torch.device(meta["device"]["type"], meta["device"].get("index")))

    def argument(self, arg, env):
        (kind, value), = arg.items()
        if kind in ("as_tensor", "as_tensors", "as_optional_tensors"):
            names = tensor_names(arg)
            return env[names[0]] if kind == "as_tensor" else [env[n] if n else None for n in names]
        if kind in ("as_int", "as_ints", "as_float", "as_floats", "as_bool", "as_bools", "as_string", "as_none"):
            return None if kind == "as_none" else value
        convert = {"as_scalar_type": self.dtypes.__getitem__, "as_layout": self.layouts.__getitem__,
                   "as_device": lambda d: self.torch.device(d["type"], d.get("index")),
                   "as_memory_format": lambda _: None}.get(kind)  # None: the default, a contiguous result
        if convert is None:
            raise Refused(f"the graph passes an argument of kind {kind[:40]}, which the referee does not run")
        return convert(value)

    def __call__(self, tokens):
        """(batch, seq_len) int64 token ids on the device -> float32 logits."""
        env = dict(self.env)
        env[self.input] = tokens
        for node, op, drops in zip(self.nodes, self.ops, self.drops):
            args, kwargs = [], {}
            for given in node["inputs"]:
                value = self.argument(given["arg"], env)
                if given.get("kind") == 2:
                    kwargs[given["name"]] = value
                else:
                    args.append(value)
            out = op(*args, **kwargs)
            names = node["outputs"]
            if len(names) == 1 and "as_tensor" in names[0]:
                env[names[0]["as_tensor"]["name"]] = out
            elif len(names) == 1 and "as_tensors" in names[0]:
                env.update((v["name"], o) for v, o in zip(names[0]["as_tensors"], out))
            elif len(names) > 1:
                env.update((v["as_tensor"]["name"], o) for v, o in zip(names, out) if "as_tensor" in v)
            for name in drops:
                env.pop(name, None)
        return env[self.output].float()


def tensor_names(arg):
    """The values a node's argument reads."""
    (kind, value), = arg.items()
    if kind == "as_tensor":
        return [value["name"]]
    if kind == "as_tensors":
        return [v["name"] for v in value]
    if kind == "as_optional_tensors":
        return [v["as_tensor"]["name"] if "as_tensor" in v else None for v in value]
    return []


class TorchScorer:
    vocab = None  # the columns scored: the tokenizer's vocabulary, set once the graph has run

    def __init__(self, folder):
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)  # the same inputs give the same bits
        self.torch, self.graph = torch, TorchGraph(folder)
        self.batch, self.seq_len, self.device = self.graph.batch, self.graph.seq_len, str(self.graph.device)
        self.name = torch.cuda.get_device_name(self.graph.device) if self.graph.device.type == "cuda" else self.device

    def logits(self, inputs):
        with self.torch.inference_mode():
            logits = self.graph(self.torch.from_numpy(inputs.astype(np.int64)).to(self.graph.device))
            return logits[..., : self.vocab] if self.vocab else logits  # a padded table's columns are no tokens

    def log_probs(self, logits):
        """Log-probabilities with the peak taken out first: at logits of 2^30 a float32 step is 128, so a log-sum-exp
        of the raw logits would round the normalizer away (every loss 0)."""
        shifted = logits - logits.amax(-1, keepdim=True)
        return shifted - shifted.exp().sum(-1, keepdim=True).log()

    def nats(self, logits, targets):
        """Per-token nats of (B, T, V) float32 logits against (B, T) targets."""
        t = self.torch
        with t.inference_mode():
            y = t.from_numpy(targets.astype(np.int64)).to(logits.device)
            return (-self.log_probs(logits).gather(-1, y[..., None])[..., 0]).cpu().numpy()

    def moved(self, base, probe, cuts):
        """Each row's largest change of a log-probability before its cut: (B, 2) float32 (nats, position)."""
        t = self.torch
        with t.inference_mode():
            out = []
            for i, cut in enumerate(cuts.tolist()):
                a, b = self.log_probs(base[i, :cut]), self.log_probs(probe[i, :cut])
                # -inf alike is no move; NaN counts as the most a move can be
                diff = t.where(a == b, 0.0, (a - b).abs()).nan_to_num(nan=float("inf")).amax(-1)
                out.append(t.stack([diff.max(), diff.argmax().float()]))
            return t.stack(out).cpu().numpy()

    def release(self):
        """Nothing: every operator PyTorch runs here checks its bounds and writes what it returns."""


class MlxScorer:
    """An mx.export_function graph whose inputs are the token ids and then the weights, in its metadata's order."""
    vocab = None

    def __init__(self, folder):
        import mlx.core as mx

        self.mx = mx
        path = Path(folder) / "graph.mlxfn"
        try:
            self.fn, meta = mx.import_function(str(path), return_metadata=True)
            meta = json.loads(meta)
            names, dtypes = list(meta["tensors"]), list(meta["dtypes"])
            self.batch, self.seq_len = (int(n) for n in meta["input"])
        except (ValueError, KeyError, TypeError, RuntimeError, OSError):
            raise Refused("graph.mlxfn is not an mx.export_function graph with its tensors' names") from None
        tensors = load_tensors(folder, names)
        self.values = []
        for name, dtype in zip(names, dtypes):
            if name not in tensors:
                raise Refused(f"tensors.npz has no {name!r}, which the graph takes")
            a = mx.array(np.array(tensors[name]))
            self.values.append(a.view(mx.bfloat16) if dtype == "bfloat16" and a.dtype == mx.int16 else a)
        mx.eval(self.values)
        self.device = self.name = str(mx.default_device())
        self.check()

    def check(self):
        """Every primitive of the graph (as MLX draws it) from the allowlist, before any row reaches it."""
        mx = self.mx
        try:
            out = self.fn(mx.zeros((self.batch, self.seq_len), mx.int32), *self.values)
        except (ValueError, RuntimeError) as e:
            raise Refused(f"graph.mlxfn does not take its tensors and ({self.batch}, {self.seq_len}) token ids: "
                          f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
        dot = Path(os.environ.get("TMPDIR", "/tmp")) / f"graph-{os.getpid()}.dot"
        try:
            mx.export_to_dot(str(dot), *out)
            labels = set(re.findall(r'label ="([^"]+)"', dot.read_text()))
        finally:
            dot.unlink(missing_ok=True)
        unknown = sorted(labels - MLX_OPS)
        if unknown:
            raise Refused(f"the graph uses {', '.join(unknown)[:120]}, not among the primitives the referee runs "
                          "(autoresearch/scorer.py MLX_OPS)")

    def logits(self, inputs):
        mx = self.mx
        out = self.fn(mx.array(inputs.astype(np.int32)), *self.values)[0].astype(mx.float32)
        out = out[..., : self.vocab] if self.vocab else out  # a padded table's columns are no tokens
        mx.eval(out)
        return out

    def log_probs(self, logits):
        shifted = logits - logits.max(axis=-1, keepdims=True)  # as TorchScorer.log_probs says
        return shifted - self.mx.log(self.mx.exp(shifted).sum(axis=-1, keepdims=True))

    def nats(self, logits, targets):
        mx = self.mx
        y = mx.array(targets.astype(np.int32))
        return np.array(-mx.take_along_axis(self.log_probs(logits), y[..., None], axis=-1)[..., 0])

    def moved(self, base, probe, cuts):
        mx = self.mx
        out = []
        for i, cut in enumerate(cuts.tolist()):
            a, b = self.log_probs(base[i, :cut]), self.log_probs(probe[i, :cut])
            diff = mx.where(a == b, 0.0, mx.abs(a - b))
            diff = mx.where(mx.isnan(diff), mx.inf, diff).max(axis=-1)
            out.append(mx.stack([diff.max(), mx.argmax(diff).astype(mx.float32)]))
        return np.array(mx.stack(out))

    def release(self):
        """The buffers of the batch done go back to the system, not to a cache the next batch's arrays come from."""
        self.mx.clear_cache()


SCORERS = {"torch": TorchScorer, "mlx": MlxScorer}


def serve(framework):
    """The scoring process: read the job, load and check the graph, say so, then answer each batch until stdin
    closes. A batch is (B, T + 1) rows, then k spliced copies of their inputs with each row's cut: the answer is the
    rows' per-token nats (B, T) and, per copy, each row's largest move before its cut (B, 2)."""
    protocol, pipe = os.fdopen(os.dup(1), "wb"), os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)  # a framework's prints go to the log, never into the protocol
    job = json.loads(pipe.readline())
    start, vocab = time.time(), int(job["vocab"])
    try:
        scorer = SCORERS[framework](job["checkpoint"])
        # a dry run on zeros, before any row: a graph that cannot run, or gives the wrong shape, says so here
        shape = tuple(scorer.logits(np.zeros((scorer.batch, scorer.seq_len), np.int32)).shape)
        if len(shape) != 3 or shape[:2] != (scorer.batch, scorer.seq_len) or shape[2] < vocab:
            raise Refused(f"the graph returns logits of shape {shape}, not ({scorer.batch}, {scorer.seq_len}, "
                          f"at least {vocab})")
    except Refused as e:
        protocol.write((f"{PROBLEM} {e}\n").encode())
        protocol.flush()
        return
    except Exception as e:  # a malformed graph, or its own error on the dry run: no row has been read yet
        protocol.write((f"{PROBLEM} the graph could not be loaded or run on a batch of zeros ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})\n").encode())
        protocol.flush()
        return
    scorer.vocab = vocab
    hello = {"batch": scorer.batch, "seq_len": scorer.seq_len, "device": scorer.name,
             "seconds": round(time.time() - start, 2)}
    protocol.write((json.dumps(hello) + "\n").encode())
    protocol.flush()
    while pipe.peek(1):
        k = int(pipe.readline())
        # The spliced copies run first, before the batch's own rows are sent: a graph that read memory it was not
        # given (MLX's gathers check no bounds) finds no real tokens past the cuts in this process then.
        probes = []
        for _ in range(k):
            spliced, cuts = receive_array(pipe), receive_array(pipe)
            probes.append((scorer.logits(spliced), cuts))
        if k:
            protocol.write(b"ready\n")
            protocol.flush()
        rows = receive_array(pipe)
        logits = scorer.logits(rows[:, :-1])
        send_array(protocol, scorer.nats(logits, rows[:, 1:]).astype(np.float32))
        for probe, cuts in probes:
            send_array(protocol, scorer.moved(logits, probe, cuts).astype(np.float32))
        del logits, probes
        scorer.release()

if __name__ == "__main__":
    serve(sys.argv[1])
