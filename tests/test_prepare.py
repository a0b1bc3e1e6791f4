"""prepare.py on real text: import, tokenizer, packing, evaluator, cache layout."""

import json
import math
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare
from conftest import MIXED_EN, SHAKESPEARE, PROFILE


def test_cache_layout_is_upstreams(use_cache):
    data = sorted(p.name for p in (use_cache / "data").iterdir())
    assert data == ["shard_00000.parquet", "shard_06542.parquet"]
    with open(use_cache / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == 4096
    assert enc.encode_single_token("<|reserved_0|>") == 4092
    meta = json.loads((use_cache / "profile.json").read_text())
    assert meta["profile"] == {"name": PROFILE, "seq_len": 256, "vocab_size": 4096, "eval_tokens": 16384,
                               "time_budget": 300, "holdout_tokens": 4096}
    assert meta["train_docs"] + meta["val_docs"] == 1030  # every document of the four shards
    assert not list(use_cache.glob(".staging-*"))


def test_tokenizer_round_trip_and_byte_lengths(use_cache):
    tok = prepare.Tokenizer.from_directory()
    text = SHAKESPEARE.read_text()[:20000] + " Unicode: naïve café 你好 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2.5  # the BPE actually compresses English
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == np.int32 and len(token_bytes) == tok.get_vocab_size()
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert token_bytes[tok.get_bos_token_id()] == 0 and (token_bytes[:256] == 1).all()
    batch = tok.encode(["a b", "c"], prepend=tok.get_bos_token_id())
    assert [row[0] for row in batch] == [tok.get_bos_token_id()] * 2


def _segments(row, bos):
    starts = np.flatnonzero(row == bos)
    return [row[a:b] for a, b in zip(starts, list(starts[1:]) + [len(row)])]


def test_packing_invariants(use_cache):
    tok = prepare.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    tokens, offsets = prepare._load_tokens("shard_00000")
    docs = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    whole = {tuple(d.tolist()) for d in docs}
    text = b"|".join(d[1:].astype(np.int32).tobytes() for d in docs)  # all text, to find slices in
    B, T = 8, 256
    loader = prepare.make_dataloader(tok, B, T, "train")
    used, emitted, remainders = 0, 0, 0
    for _ in range(60):
        x, y, _ = next(loader)
        assert x.shape == (B, T) and y.shape == (B, T) and x.dtype == np.int32
        assert (x[:, 1:] == y[:, :-1]).all()
        rows = np.concatenate([x, y[:, -1:]], axis=1)
        assert (rows[:, 0] == bos).all()  # every row starts with a document
        for row in rows:
            segs = _segments(row, bos)
            assert sum(len(s) for s in segs) == T + 1  # no padding: documents fill the row
            for s in segs:
                # a whole document, or BOS then one contiguous piece of a document's text
                if tuple(s.tolist()) not in whole:
                    assert s[1:].tobytes() in text
                    remainders += s is not segs[-1]
            used += len(segs)
        emitted += rows.size
    assert emitted == 60 * B * (T + 1) and used > 60 * B  # several documents per row on average
    assert remainders > 0  # cropped tails come back later, whole within a row


def test_epoch_is_the_pass_over_the_training_tokens(use_cache):
    # the packer's 1000-document buffer reads past all of mixed-en's documents at once: its reader is on its
    # second pass before the first batch, but the first pass's tokens are still being trained on
    B, T = 64, 256
    train_tokens = prepare.load_meta()["train_tokens"]
    loader = prepare.make_dataloader(None, B, T, "train")
    epochs = [next(loader)[2] for _ in range(train_tokens // (B * T) + 3)]
    assert epochs == [1 + step * B * T // train_tokens for step in range(len(epochs))]
    assert epochs[0] == 1 and epochs[-1] == 2


def _token_use(keep_remainders, batches=1500, buffer_size=64):
    """Share of the documents' text tokens (BOS excluded) that packed rows carry, steady state."""
    read = [0]

    def counted():
        for doc, epoch in prepare._documents("train"):
            read[0] += len(doc) - 1
            yield doc, epoch

    rows = prepare.pack_rows(counted(), 16, 256, buffer_size, keep_remainders)
    bos = next(rows)[0][0, 0]
    start, carried = read[0], 0
    for _ in range(batches):
        carried += int((next(rows)[0] != bos).sum())
    return carried / (read[0] - start)


def test_training_rows_keep_cropped_remainders(use_cache):
    # mixed-en's documents average ~1,100 tokens: cropping at 257 without keeping the tail
    # (upstream's rule, still the val split's loader's) would train on a fifth of them
    assert _token_use(keep_remainders=True) > 0.97
    assert _token_use(keep_remainders=False) < 0.5


def test_validation_rows_are_fixed(use_cache):
    prof = prepare.load_profile()
    rows = prepare.get_val_rows()
    assert rows.shape == (prof.eval_tokens // prof.seq_len, prof.seq_len + 1)
    assert np.array_equal(rows, prepare.build_val_rows(prof))  # rebuilt from tokens: identical
    assert np.array_equal(rows, prepare.get_val_rows())


def _hand_cache(root):
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokens").mkdir()
    np.save(root / "tokenizer" / "token_bytes.npy", np.array([0, 2, 3, 5], dtype=np.int32))
    np.save(root / "tokens" / "val_rows.npy", np.array([[0, 1, 2, 3, 0, 1], [0, 3, 3, 2, 1, 0]], dtype=np.int32))


def test_evaluator_matches_hand_computation(tmp_path, monkeypatch):
    _hand_cache(tmp_path)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    losses = {0: [0.5, 1.0, 1.5, 2.0, 2.5], 1: [1.0, 1.0, 0.25, 0.75, 3.0]}

    def loss_fn(x, y):
        # targets row 0: 1 2 3 0 1 (bytes 2 3 5 0 2); row 1: 3 3 2 1 0 (bytes 5 5 3 2 0)
        first = 0 if y[0, 0] == 1 else 1
        return np.array([losses[first + i] for i in range(len(y))])

    # nats over byte-bearing targets: row 0 skips the 2.0, row 1 skips the 3.0
    expected = (0.5 + 1.0 + 1.5 + 2.5 + 1.0 + 1.0 + 0.25 + 0.75) / (math.log(2) * (12 + 15))
    assert prepare.evaluate_bpb(loss_fn, batch_size=2) == pytest.approx(expected, rel=1e-12)
    assert prepare.evaluate_bpb(loss_fn, batch_size=1) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        prepare.evaluate_bpb(lambda x, y: np.zeros(3), batch_size=2)


def test_evaluator_on_real_cache_counts_decoded_bytes(use_cache):
    tok = prepare.Tokenizer.from_directory()
    rows = prepare.get_val_rows()
    y = rows[:, 1:]
    special = {tok.get_bos_token_id()}
    nbytes = sum(len(tok.enc.decode_single_token_bytes(t)) for t in y.ravel().tolist() if t not in special)
    ntokens = sum(1 for t in y.ravel().tolist() if t not in special)
    bpb = prepare.evaluate_bpb(lambda x, t: np.full(t.shape, 2.0), batch_size=64)
    assert bpb == pytest.approx(2.0 * ntokens / (math.log(2) * nbytes), rel=1e-9)


def _docs_of(path):
    return pq.read_table(path).column("text").to_pylist()


def test_import_formats_and_deterministic_split(tmp_path):
    texts = [t for t in _docs_of(MIXED_EN / "shard_00001.parquet")][:120]
    jsonl = tmp_path / "src" / "docs.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    nested = tmp_path / "src" / "nested"
    nested.mkdir()
    shutil.copy(SHAKESPEARE, nested / "shakespeare.txt")
    shutil.copy(MIXED_EN / "shard_00002.parquet", nested / "part.parquet")

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    out_a.mkdir(), out_b.mkdir()
    stats = prepare.import_sources([tmp_path / "src"], out_a, val_fraction=0.1)
    # the same files named in another order split the same way
    prepare.import_sources([nested / "part.parquet", jsonl, nested / "shakespeare.txt"], out_b, val_fraction=0.1)
    val_a, val_b = _docs_of(out_a / "shard_06542.parquet"), _docs_of(out_b / "shard_06542.parquet")
    assert sorted(val_a) == sorted(val_b)

    parquet_docs = len(_docs_of(MIXED_EN / "shard_00002.parquet"))
    txt_docs = prepare.read_documents(nested / "shakespeare.txt")
    paragraphs = [p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    assert "\n\n".join(txt_docs) == "\n\n".join(paragraphs)  # grouping loses and reorders nothing
    assert all(len(d) >= prepare.TXT_DOC_CHARS for d in txt_docs[:-1])
    assert stats["train_docs"] + stats["val_docs"] == 120 + parquet_docs + len(txt_docs)
    assert 0.05 < stats["val_docs"] / (stats["train_docs"] + stats["val_docs"]) < 0.15
    assert set(_docs_of(out_a / "shard_00000.parquet")).isdisjoint(val_a)


def test_prepare_is_idempotent_and_refuses_other_data(use_cache, cpu_cache):
    before = (cpu_cache / "profile.json").read_text()
    assert prepare.prepare(profile=PROFILE, sources=[MIXED_EN])["prepared_at"] == json.loads(before)["prepared_at"]
    with pytest.raises(prepare.PrepareError, match="--force"):
        prepare.prepare(profile="laptop", sources=[MIXED_EN])
    assert (cpu_cache / "profile.json").read_text() == before


def test_budget_override(monkeypatch):
    prof = prepare.PROFILES["cpu"]
    monkeypatch.delenv("AUTORESEARCH_BUDGET", raising=False)
    assert prepare.time_budget(prof) == 300
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "2.5")
    assert prepare.time_budget(prof) == 2.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("AUTORESEARCH_BUDGET", bad)
        with pytest.raises(prepare.PrepareError, match="AUTORESEARCH_BUDGET"):
            prepare.time_budget(prof)


def test_profile_recorded_for_a_larger_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "c"))
    meta = prepare.prepare(profile="laptop", sources=[SHAKESPEARE])
    assert meta["profile"]["seq_len"] == 1024 and meta["vocab_size"] == 8192
    # 1 MB of text cannot fill 2M eval tokens: fewer rows, said, never the same ones again
    rows = prepare.get_val_rows()
    assert rows.shape == (meta["val_rows"], 1025) and 0 < meta["val_rows"] < 2048
    assert meta["val_repeats"] is False and meta["val_note"].startswith(f"validation: {meta['val_rows']} rows of 1,025")


def test_write_parquet_helper_for_bad_input(tmp_path):
    # a parquet file without a `text` column is refused with the columns named
    bad = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), bad)
    with pytest.raises(prepare.PrepareError, match="no `text` column.*body"):
        prepare.read_documents(bad)


@pytest.mark.parametrize("name, data, message", [
    ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "latin1.jsonl:2: not UTF-8 text (invalid"),
    ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "bad \\ud800 here"}\n', "surrogate.jsonl:2: `text` holds a lone"),
    ("number.jsonl", b'{"text": 12}\n', "number.jsonl:1: `text` is int, not a string"),
    ("ints.parquet", pa.table({"text": [1, 2, 3]}), "ints.parquet: the `text` column holds int64, not strings"),
    ("bytes.parquet", pa.table({"text": [b"a", b"b"]}), "bytes.parquet: the `text` column holds binary, not strings"),
    ("lists.parquet", pa.table({"text": [["a"], ["b"]]}), "lists.parquet: the `text` column holds list<"),
])
def test_bad_text_in_a_source_is_one_line(tmp_path, monkeypatch, name, data, message):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / name
    src.write_bytes(data) if isinstance(data, bytes) else pq.write_table(data, src)
    with pytest.raises(prepare.PrepareError) as err:
        prepare.prepare(profile="cpu", sources=[MIXED_EN / "shard_00000.parquet", src])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "profile.json").exists() and not list((tmp_path / "cache").glob(".staging-*"))


def test_too_small_a_vocabulary_is_refused_before_ready(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny.txt"
    src.write_text("\n\n".join(f"the cat {i % 7} sat" for i in range(3000)))
    with pytest.raises(prepare.PrepareError, match=r"its tokenizer learned \d+ of the 4,096 tokens the profile needs"):
        prepare.prepare(profile="cpu", sources=[src])
    assert not (tmp_path / "cache" / "profile.json").exists()


def test_txt_import_streams_and_splits_as_the_whole_file(tmp_path, monkeypatch):
    # blocks far smaller than the file: a paragraph break across two blocks, and "\n\n\n", split as str.split does
    monkeypatch.setattr(prepare, "TXT_READ_BLOCK", 7)
    text = SHAKESPEARE.read_text()[:60_000].replace("\n\n", "\n\n\n", 3)
    src = tmp_path / "s.txt"
    src.write_text(text)
    docs = prepare.read_documents(src)
    assert "\n\n".join(docs) == "\n\n".join(p for p in text.split("\n\n") if p.strip())
    src.write_bytes(text.encode()[:5000] + b"\xff" + text.encode()[5000:])
    with pytest.raises(prepare.PrepareError, match="s.txt: not UTF-8 text .* at byte 5000"):
        prepare.read_documents(src)
