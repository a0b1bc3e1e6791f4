"""The scoring process's graph loader (autoresearch/scorer.py) against hand-made graphs: what an agent could write
into graph.json or tensors.npz directly, instead of what torch.export would. Each is refused with one line before
any row reaches it, and nothing in them is imported, evaluated or unpickled."""

import json

import numpy as np
import pytest

import prepare
from autoresearch.scorer import Refused, TorchScorer

torch = pytest.importorskip("torch")


class Tiny(torch.nn.Module):
    """Embedding, a buffer and a head: a graph with parameters, a buffer and a handful of operators."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, idx):
        return self.head(torch.tanh(self.wte(idx) * self.scale))


@pytest.fixture
def exported(tmp_path):
    model = Tiny()
    prepare.export_model(model, 2, 5)(tmp_path)
    return tmp_path, model


def edit(folder, change):
    path = folder / "graph.json"
    program = json.loads(path.read_text())
    change(program["graph_module"])
    path.write_text(json.dumps(program))


def nodes(module):
    return module["graph"]["nodes"]


def test_the_exported_graph_gives_the_models_logits(exported):
    folder, model = exported
    scorer = TorchScorer(folder)
    x = np.arange(10, dtype=np.int32).reshape(2, 5)
    with torch.no_grad():
        want = model(torch.from_numpy(x).long()).numpy()
    assert (scorer.batch, scorer.seq_len) == (2, 5)
    assert np.array_equal(scorer.logits(x).numpy(), want)


@pytest.mark.parametrize("target", ["builtins.eval", "os.system", "torch.ops.aten.rand.default",
                                    "torch.ops.aten.empty.memory_format", "torch.ops.aten.tanh.out",
                                    "torch.ops.aten.tanh_.default", "torch.ops.aten.tanh.nonexistent"])
def test_an_operator_outside_the_allowlist_is_refused(exported, target):
    folder, _ = exported

    def swap(module):
        node = next(n for n in nodes(module) if n["target"] == "torch.ops.aten.tanh.default")
        node["target"] = target

    edit(folder, swap)
    with pytest.raises(Refused, match="the graph calls .* (not among the operators|an overload the referee)"):
        TorchScorer(folder)


def test_symbolic_shapes_are_refused_before_any_expression_is_parsed(exported):
    """sympy would parse an expression string with eval: such a graph is refused before its strings are read."""
    folder, _ = exported

    def symbolic(module):
        module["graph"]["sym_int_values"] = {"s0": {"as_expr": {"expr_str": "__import__('os').system('true')"}}}

    edit(folder, symbolic)
    with pytest.raises(Refused, match="symbolic shapes"):
        TorchScorer(folder)


def test_an_argument_kind_the_referee_does_not_run_is_refused(exported):
    folder, _ = exported

    def graph_argument(module):
        node = next(n for n in nodes(module) if n["target"] == "torch.ops.aten.tanh.default")
        node["inputs"][0]["arg"] = {"as_graph": {"name": "g", "graph": {}}}

    edit(folder, graph_argument)
    scorer = TorchScorer(folder)  # the arguments are read when the graph runs, before any row: the dry run
    with pytest.raises(Refused, match="argument of kind as_graph"):
        scorer.logits(np.zeros((2, 5), np.int32))


def test_a_graph_that_mutates_a_buffer_is_refused(exported):
    """A buffer the graph writes would carry what one batch saw into the next."""
    folder, _ = exported

    def mutate(module):
        out = module["signature"]["output_specs"]
        out.insert(0, {"buffer_mutation": {"arg": {"name": "tanh"}, "buffer_name": "scale"}})

    edit(folder, mutate)
    with pytest.raises(Refused, match="one input .* one output .* mutating nothing"):
        TorchScorer(folder)


def test_tensors_that_do_not_match_the_graph_are_refused(exported):
    folder, _ = exported
    with np.load(folder / "tensors.npz") as f:
        arrays = {name: f[name] for name in f.files}
    np.savez(folder / "tensors.npz", **dict(arrays, **{"head.weight": arrays["head.weight"][:, :4]}))
    with pytest.raises(Refused, match="'head.weight' is \\(32, 4\\)"):
        TorchScorer(folder)
    np.savez(folder / "tensors.npz", **{k: v for k, v in arrays.items() if k != "scale"})
    with pytest.raises(Refused, match="tensors.npz has no 'scale'"):
        TorchScorer(folder)


def test_a_pickle_in_the_tensors_is_never_loaded(exported, tmp_path):
    folder, _ = exported
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with np.load(folder / "tensors.npz") as f:
        arrays = {name: f[name] for name in f.files}
    weights = np.empty(1, dtype=object)
    weights[0] = Payload()
    np.savez(folder / "tensors.npz", **dict(arrays, **{"head.weight": weights}))
    with pytest.raises(Refused, match="tensors.npz is not a numpy archive of arrays"):
        TorchScorer(folder)
    assert not marker.exists()


def test_json_that_is_not_a_program_is_refused(exported):
    folder, _ = exported
    (folder / "graph.json").write_text("[" * 100_000)
    with pytest.raises(Refused, match="not a torch.export program"):
        TorchScorer(folder)


def test_attention_that_drops_out_at_random_is_refused(tmp_path):
    class Dropping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(32, 8)

        def forward(self, idx):
            q = self.wte(idx)[:, None]
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.3, is_causal=True)[:, 0]

    prepare.export_model(Dropping(), 2, 5)(tmp_path)
    with pytest.raises(Refused, match="drops out at random"):
        TorchScorer(tmp_path)


@pytest.mark.parametrize("offset", [0.0, 2.0**20, 2.0**22, 2.0**30])
def test_every_loss_is_of_a_distribution_whatever_the_logits_scale(tmp_path, offset):
    """The losses of every possible next token at a position are those of one distribution: their probabilities
    add up to 1. A log-sum-exp of raw logits of 2^30 rounds its normalizer away, and every loss came out 0."""

    class Shifted(Tiny):
        def forward(self, idx):
            return super().forward(idx) * 4.0 + offset

    prepare.export_model(Shifted(), 2, 5)(tmp_path)
    scorer = TorchScorer(tmp_path)
    x = np.arange(10, dtype=np.int32).reshape(2, 5)
    logits = scorer.logits(x)
    every = np.stack([scorer.nats(logits, np.full((2, 5), token, np.int32)) for token in range(32)])
    assert np.allclose(np.exp(-every.astype(np.float64)).sum(0), 1.0, atol=1e-4), np.exp(-every).sum(0)


def test_tensors_the_graph_does_not_take_are_never_read(exported):
    """An archive entry no input names (a bomb that inflates to gigabytes, say) stays compressed and unread."""
    import zipfile

    folder, model = exported
    with zipfile.ZipFile(folder / "tensors.npz", "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("unused.npy", b"not an array" * 1000)
    scorer = TorchScorer(folder)
    x = np.arange(10, dtype=np.int32).reshape(2, 5)
    with torch.no_grad():
        assert np.array_equal(scorer.logits(x).numpy(), model(torch.from_numpy(x).long()).numpy())
