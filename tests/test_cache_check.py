"""prepare.check_cache: a damaged cache is named, with the command that repairs it, before a run can blame the candidate."""

import json
import shutil

import numpy as np
import pytest

import prepare
from conftest import MIXED_EN, PROFILE

REPAIR = f"repair it: autoresearch prepare --force --profile {PROFILE} --source {MIXED_EN.resolve()}"


@pytest.fixture
def cache(cpu_cache, tmp_path, monkeypatch):
    """A private copy of the prepared cache, to damage."""
    path = tmp_path / "cache"
    shutil.copytree(cpu_cache, path, ignore=shutil.ignore_patterns(prepare.VIEW_NAME, "checkpoint"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(path))
    return path


def damaged(cache):
    with pytest.raises(prepare.PrepareError) as e:
        prepare.check_cache()
    message = str(e.value)
    assert message.startswith(f"the cache {cache} is damaged: ") and message.endswith(REPAIR), message
    return message


def test_a_sound_cache_passes(cache):
    meta = prepare.load_meta()
    assert "tokens/val_rows.npy" in meta["files"] and "tokenizer/tokenizer.pkl" in meta["files"]
    assert prepare.check_cache() == f"cache ok: {len(meta['files'])} files at their recorded sizes, val_rows.npy, holdout_rows.npy and token_bytes.npy hashes match"


def test_truncated_token_shard(cache):
    shard = cache / "tokens" / "shard_00000.npy"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert f"tokens/shard_00000.npy has {size // 2:,} bytes, prepare wrote {size:,}; " in damaged(cache)


def test_missing_tokens_dir(cache):
    shutil.rmtree(cache / "tokens")
    assert f"damaged: tokens/ is missing; {REPAIR}" in damaged(cache)


def test_val_rows_cut_to_8_rows(cache):
    path = cache / "tokens" / "val_rows.npy"
    size = path.stat().st_size
    np.save(path, np.load(path)[:8])
    assert f"tokens/val_rows.npy has {path.stat().st_size:,} bytes, prepare wrote {size:,}; " in damaged(cache)


def test_val_rows_changed_in_place_fail_the_hash(cache):
    path = cache / "tokens" / "val_rows.npy"
    rows = np.load(path)
    rows[0, 5] = (rows[0, 5] + 1) % 4096  # same size, other content
    np.save(path, rows)
    assert "tokens/val_rows.npy does not hold the rows prepare wrote (its hash differs)" in damaged(cache)


def test_cache_prepared_before_sizes_were_recorded_still_loads(cache):
    meta = json.loads((cache / "profile.json").read_text())
    del meta["files"], meta["val_rows_sha256"]
    (cache / "profile.json").write_text(json.dumps(meta))
    note = prepare.check_cache()
    assert note == ("cache prepared before file sizes were recorded: not checked "
                    f"({REPAIR.removeprefix('repair it: ')} records them)")
    assert prepare.get_val_rows().shape == (64, 257) and prepare.load_profile().name == PROFILE


def test_repair_command_for_a_download():
    meta = {"profile": {"name": "gpu"}, "dataset": "climbmix"}
    assert prepare.repair_command(meta) == "autoresearch prepare --force --profile gpu --dataset climbmix"
