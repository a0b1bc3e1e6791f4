"""autoresearch: the shared harness that drives the backends' train.py files."""

import sys
from pathlib import Path

# The referee writes no bytecode beside the sources: a cache there is something a run could plant or go stale.
sys.dont_write_bytecode = True

BACKENDS = ("cuda", "mps", "mlx")


def repo_root():
    """The checkout holding prepare.py and backends/: the working directory's, else this package's."""
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent):
        if (base / "prepare.py").exists() and (base / "backends").is_dir():
            return base
    raise FileNotFoundError("no autoresearch checkout (prepare.py and backends/) here or above")


def train_file(backend, root=None):
    return (root or repo_root()) / "backends" / backend / "train.py"
