"""The fixed validation rows: one pass over the validation split, never a document scored twice."""

import json
from pathlib import Path

import numpy as np
import pytest

import prepare
from conftest import MIXED_EN, ROOT, SHAKESPEARE, cli


def _split(cache):
    """The validation split's tokens and its BOS id, as prepare tokenized them."""
    tokens, _ = prepare._load_tokens(Path(prepare.VAL_FILENAME).stem, cache / "tokens")
    return np.asarray(tokens, dtype=np.int64), int(tokens[0])  # the split's first token is its first document's BOS


def _assert_read_once(rows, cache):
    """Rows start with a document, and carry no token of the split more often than the split holds it."""
    tokens, bos = _split(cache)
    assert (rows[:, 0] == bos).all()
    size = max(int(tokens.max()), int(rows.max())) + 1
    held = np.bincount(tokens[tokens != bos], minlength=size)
    used = np.bincount(rows[rows != bos].astype(np.int64), minlength=size)
    # rows cut from a split read ten times over (the cycling packer) fail this on hundreds of token ids
    assert (used <= held).all(), f"{int((used > held).sum())} token ids scored more often than the split holds them"
    return int(held.sum()) - int(used.sum())  # the split's text tokens no row carries


def _assert_recorded(rows, meta):
    assert len(np.unique(rows, axis=0)) == len(rows)
    assert (meta["val_rows"], meta["val_distinct_rows"], meta["val_repeats"]) == (len(rows), len(rows), False)


def test_mixed_en_rows_are_distinct_and_read_once(use_cache):
    rows = np.asarray(prepare.get_val_rows())
    prof, meta = prepare.load_profile(), prepare.load_meta()
    # mixed-en's 113,164 validation tokens fill the profile's rows in one pass
    assert rows.shape == (prepare.val_row_count(prof), prof.seq_len + 1) == (prof.eval_tokens // 256, 257)
    _assert_recorded(rows, meta)
    assert meta["val_note"] is None
    assert len(np.unique(rows[:, :64], axis=0)) == len(rows)  # not even two rows begin alike
    _assert_read_once(rows, use_cache)


def test_a_split_too_small_gives_fewer_rows_and_says_so(tmp_path):
    # tinyshakespeare's validation documents hold about 33,000 tokens, half the cpu profile's 65,536
    cache = tmp_path / "cache"
    proc = cli(ROOT, "prepare", "--profile", "cpu", "--source", SHAKESPEARE, env={"AUTORESEARCH_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((cache / "profile.json").read_text())
    rows = np.load(cache / "tokens" / "val_rows.npy")
    assert 0 < len(rows) < 256 and rows.shape[1] == 257
    _assert_recorded(rows, meta)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("validation:")]
    assert said == [meta["val_note"]], proc.stdout + proc.stderr
    assert said[0].startswith(f"validation: {len(rows)} rows of 257 tokens, fewer than the profile's 256 rows: "
                              f"the split holds only {meta['val_tokens']:,} tokens")
    # one pass, to the end: what is left of the split is less than one more row
    assert 0 <= _assert_read_once(rows, cache) < 257


def _tiny_split_source(tmp_path):
    """tinyshakespeare's training documents and, as the whole validation split, one line of it (under a row)."""
    docs = [d for d in prepare.read_documents(SHAKESPEARE) if not prepare.is_validation(d, 0.1)]
    line = next(t for t in SHAKESPEARE.read_text().splitlines() if t.strip() and prepare.is_validation(t, 0.1))
    src = tmp_path / "tiny-val.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + [line]))
    return src


def test_a_split_shorter_than_one_row_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    src = _tiny_split_source(tmp_path)
    with pytest.raises(prepare.PrepareError) as err:
        prepare.prepare(profile="cpu", sources=[src])
    message = str(err.value)
    assert "\n" not in message and "the validation split holds" in message
    assert "in 1 document, too few for one row of 257 tokens (profile cpu)" in message
    assert sorted(cache.rglob("*")) == []  # no profile.json, no staging folder, no tokens

    # over a prepared cache, with --force: the failure leaves that cache as it was
    prepare.prepare(profile="cpu", sources=[MIXED_EN])
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    with pytest.raises(prepare.PrepareError, match="too few for one row"):
        prepare.prepare(profile="cpu", sources=[src], force=True)
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before
    assert prepare.check_cache().startswith("cache ok")


def test_the_holdout_is_other_documents_and_out_of_the_trainers_view(use_cache):
    val, holdout = np.asarray(prepare.get_val_rows()), np.asarray(prepare.get_holdout_rows())
    prof, meta = prepare.load_profile(), prepare.load_meta()
    assert holdout.shape == (prepare.holdout_row_count(prof), prof.seq_len + 1) and meta["holdout_rows"] == len(holdout)
    # together they carry no token of the split more often than it holds it: no text scored in both
    _assert_read_once(np.concatenate([val, holdout]), use_cache)
    val_docs, holdout_docs = prepare._split_documents(prof, use_cache / "tokens")
    digests = [{bytes(d[1:]) for d in docs} for docs in (val_docs, holdout_docs)]
    assert digests[0] and digests[1] and not digests[0] & digests[1]
    assert all(np.array_equal(a, b) for a, b in zip(prepare.build_eval_rows(prof), (val, holdout)))
    # the trainer's view holds neither the split nor the rows made of it; asked there, the loader refuses
    view = prepare.trainer_view()
    assert not list(view.rglob("holdout_rows.npy")) and not list(view.rglob("val_rows.npy"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTORESEARCH_CACHE", str(view))
        with pytest.raises(prepare.PrepareError, match="not available to training"):
            prepare.get_holdout_rows()


def test_a_changed_holdout_is_a_damaged_cache(tmp_path, monkeypatch, cpu_cache):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cpu_cache, cache, ignore=shutil.ignore_patterns("trainer-view", "runs", "compile", "swarm"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    assert "holdout_rows.npy" in prepare.check_cache()
    path = cache / "tokens" / "holdout_rows.npy"
    rows = np.load(path)
    rows[0, 1] ^= 1
    np.save(path, rows)
    with pytest.raises(prepare.PrepareError, match="holdout_rows.npy does not hold the rows prepare wrote"):
        prepare.check_cache()
