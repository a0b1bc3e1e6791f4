"""Bad input to `autoresearch prepare`: one line, non-zero exit, nothing half-written."""

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MIXED_EN, ROOT


def run_prepare(cache, *args):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "autoresearch", "prepare", "--profile", "cpu", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def cache_files(cache):
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def make_bad_inputs(tmp):
    good = tmp / "good.parquet"
    shutil.copy(MIXED_EN / "shard_00000.parquet", good)
    empty_txt = tmp / "empty.txt"
    empty_txt.write_text("\n\n  \n")
    corrupt = tmp / "corrupt.parquet"
    corrupt.write_bytes(good.read_bytes()[:4000])  # a truncated real shard
    notext = tmp / "notext.parquet"
    pq.write_table(pa.table({"content": ["some words"] * 10}), notext)
    empty_shard = tmp / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), empty_shard)
    badjson = tmp / "bad.jsonl"
    badjson.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    return good, {
        "missing": ((tmp / "nope.parquet",), "no such file"),
        "empty text": ((empty_txt,), "no text found"),
        "corrupt shard": ((good, corrupt), "not a readable parquet"),
        "no text column": ((notext,), "no `text` column"),
        "empty shard": ((good, empty_shard), "no text found"),
        "bad jsonl": ((badjson,), "bad.jsonl:2"),
        "unsupported": ((ROOT / "pyproject.toml",), "unsupported file type"),
    }


def test_each_bad_source_is_one_line_and_leaves_no_cache(tmp_path):
    _, cases = make_bad_inputs(tmp_path)
    for label, (paths, expected) in cases.items():
        cache = tmp_path / f"cache-{label.replace(' ', '-')}"
        args = [a for p in paths for a in ("--source", p)]
        proc = run_prepare(cache, *args)
        assert proc.returncode == 1, label
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (label, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert cache_files(cache) == [], (label, cache_files(cache))


def test_unknown_dataset_and_unwritable_cache(tmp_path):
    proc = run_prepare(tmp_path / "cache", "--dataset", "wikipedia")
    assert proc.returncode == 1 and "unknown dataset 'wikipedia'" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    proc = run_prepare(blocker / "cache", "--source", MIXED_EN)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not writable" in errors[0]


def test_failure_keeps_an_existing_cache_intact(tmp_path):
    good, cases = make_bad_inputs(tmp_path)
    cache = tmp_path / "cache"
    assert run_prepare(cache, "--source", good).returncode == 0
    before = {p: (cache / p).read_bytes() for p in cache_files(cache) if (cache / p).is_file()}
    paths, _ = cases["corrupt shard"]
    proc = run_prepare(cache, "--force", *[a for p in paths for a in ("--source", p)])
    assert proc.returncode == 1
    after = {p: (cache / p).read_bytes() for p in cache_files(cache) if (cache / p).is_file()}
    assert after == before  # the failed rebuild touched nothing


@pytest.mark.parametrize("flag, env, code, message", [
    (["--budget", "0"], {}, 2, "error: --budget must be a positive number"),  # a bad option: exit 2
    ([], {"AUTORESEARCH_BUDGET": "fast"}, 1, "error: AUTORESEARCH_BUDGET must be a positive number"),
])
def test_bad_budget_is_refused(flag, env, code, message, use_cache):
    proc = subprocess.run([sys.executable, "-m", "autoresearch", "--backend", "mlx", *flag], cwd=ROOT,
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
