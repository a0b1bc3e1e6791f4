"""Read and rewrite the plain-constant hyperparameter block of a train.py, as an agent would."""

import ast
import json

MAX_PARAMS_CHARS = 2000  # a row's copy of the block (Row.params): numbers and short names, never a file's worth


def _constant_assigns(source):
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    yield name, ast.literal_eval(node.value), node.value
                except ValueError:
                    continue  # computed constants are not hyperparameters


def read_constants(source):
    """Module-level UPPER_CASE names bound to literals, e.g. {"DEPTH": 8, "ADAM_BETAS": (0.8, 0.95)}."""
    return {name: value for name, value, _ in _constant_assigns(source)}


def set_constants(source, updates):
    """Return source with the literals of the named constants replaced; unknown names are an error."""
    nodes = {name: node for name, _, node in _constant_assigns(source)}
    missing = sorted(set(updates) - set(nodes))
    if missing:
        raise KeyError(f"no constant {', '.join(missing)} in the hyperparameter block")
    lines = source.splitlines(keepends=True)
    # edit from the bottom so earlier positions stay valid
    for name in sorted(updates, key=lambda n: (nodes[n].lineno, nodes[n].col_offset), reverse=True):
        node = nodes[name]
        if node.lineno != node.end_lineno:
            raise ValueError(f"{name} spans several lines; cannot rewrite it")
        line = lines[node.lineno - 1]
        start = len(line.encode()[: node.col_offset].decode())
        end = len(line.encode()[: node.end_col_offset].decode())
        lines[node.lineno - 1] = line[:start] + repr(updates[name]) + line[end:]
    return "".join(lines)


def block_json(source):
    """The block's numbers, short strings and flat tuples of them as one line of JSON (Row.params: what TPE fits), "-"
    where the source does not parse. Anything else an agent bound to a name is left out, and so is what passes
    MAX_PARAMS_CHARS."""
    def plain(v, nested=False):
        if isinstance(v, bool) or v is None:
            return True
        if isinstance(v, (int, float)):
            return abs(v) < 1e300
        if isinstance(v, str):
            return len(v) <= 32 and v.isprintable()
        return isinstance(v, tuple) and not nested and len(v) <= 8 and all(plain(x, True) for x in v)

    try:
        constants = read_constants(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "-"
    kept = {}
    for name, value in constants.items():
        if plain(value) and len(name) <= 64:
            kept[name] = value
            if len(json.dumps(kept, separators=(",", ":"))) > MAX_PARAMS_CHARS:
                del kept[name]
                break
    return json.dumps(kept, separators=(",", ":")) if kept else "-"
