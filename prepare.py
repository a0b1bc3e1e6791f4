"""
Fixed harness for autoresearch: eval profiles, data, tokenizer, loader and the val_bpb evaluator.

Every backend's train.py imports this file; the agent never edits it. It imports neither torch
nor mlx, so the metric is computed by the same numpy code on every machine.

Cache layout (upstream autoresearch's, plus our own files beside it):
    $AUTORESEARCH_CACHE (default ~/.cache/autoresearch)/
        data/shard_XXXXX.parquet      training shards; shard_06542.parquet is the validation shard
        tokenizer/tokenizer.pkl       pickled tiktoken.Encoding (upstream's format)
        tokenizer/token_bytes.npy     int32 byte length of every token id, 0 for special tokens
        tokens/shard_XXXXX.npy        the shard tokenized, BOS before every document (uint16/uint32)
        tokens/shard_XXXXX.offsets.npy  start of every document in the line above, plus the end
        tokens/val_rows.npy           the fixed validation rows, (N, seq_len + 1)
        profile.json                  eval profile, provenance, file sizes and the val_rows hash (check_cache);
                                      written last, marks the cache ready
        trainer-view/                 the cache as training sees it, without the validation split (trainer_view)
        checkpoint/                   train.py's trained model when AUTORESEARCH_CHECKPOINT is unset
"""

import bisect
import hashlib
import json
import math
import os
import pickle
import shlex
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

# ---------------------------------------------------------------------------
# Eval profiles (fixed when data is prepared; every result records its profile)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalProfile:
    name: str
    seq_len: int  # context length of training and evaluation
    vocab_size: int  # BPE vocabulary, special tokens included
    eval_tokens: int  # validation tokens scored by evaluate_bpb
    time_budget: float  # training seconds, startup and compilation excluded


PROFILES = {
    # upstream autoresearch's values, for H100-class GPUs
    "gpu": EvalProfile("gpu", seq_len=2048, vocab_size=8192, eval_tokens=40 * 524288, time_budget=300),
    # Apple Silicon laptops and small GPUs
    "laptop": EvalProfile("laptop", seq_len=1024, vocab_size=8192, eval_tokens=4 * 524288, time_budget=300),
    # CPUs: short context, small vocabulary and eval, so a 5-minute run sees enough steps
    "cpu": EvalProfile("cpu", seq_len=256, vocab_size=4096, eval_tokens=2**16, time_budget=300),
}

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"
VAL_SHARD = 6542  # upstream's pinned validation shard number, used for imported data too
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"
TOKENIZER_MAX_CHARS = 1_000_000_000  # upstream's tokenizer training limits
TOKENIZER_DOC_CAP = 10_000
IMPORT_SHARD_CHARS = 100_000_000  # imported text is cut into shards of about this size
TXT_DOC_CHARS = 2_000  # plain text: blank-line paragraphs grouped into documents of this size
ROW_GROUP_DOCS = 1024
SOURCE_SUFFIXES = (".parquet", ".txt", ".jsonl")


@dataclass(frozen=True)
class Dataset:
    base_url: str
    max_shard: int  # training shards are 0 .. max_shard - 1
    val_shard: int


DATASETS = {
    "climbmix": Dataset("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542, 6542),
    "tinystories": Dataset("https://huggingface.co/datasets/karpathy/tinystories-gpt4-clean/resolve/main", 6542, 6542),
}


class PrepareError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def cache_dir():
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


def data_dir():
    return cache_dir() / "data"


def tokenizer_dir():
    return cache_dir() / "tokenizer"


def tokens_dir():
    return cache_dir() / "tokens"


def _meta_path():
    return cache_dir() / "profile.json"


def load_meta():
    path = _meta_path()
    if not path.exists():
        raise PrepareError(f"no prepared data in {cache_dir()}: run `autoresearch prepare` first")
    return json.loads(path.read_text())


def load_profile():
    """The eval profile this cache was prepared with."""
    return EvalProfile(**load_meta()["profile"])


def time_budget(profile=None):
    """Training seconds: the profile's, or AUTORESEARCH_BUDGET for tests and smoke runs."""
    raw = os.environ.get("AUTORESEARCH_BUDGET")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise PrepareError(f"AUTORESEARCH_BUDGET must be a positive number of seconds, got {raw!r}")
        return value
    return (profile or load_profile()).time_budget


def _atomic_save_npy(path, array):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Data: download (parallel, retried, resumable) and import of local files
# ---------------------------------------------------------------------------


def _check_parquet(path, label=None):
    """Number of documents in a parquet file with a `text` column; PrepareError otherwise."""
    label = label or path
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"{label}: not a readable parquet file ({type(e).__name__}: {e})".splitlines()[0]) from None
    if "text" not in pf.schema_arrow.names:
        raise PrepareError(f"{label}: parquet file has no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
    return pf.metadata.num_rows


def download_file(url, dest, retries=5, timeout=30, backoff=0.5):
    """Download url to dest, resuming a partial `.part` file; dest appears only when complete."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    last = None
    for attempt in range(1, retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status == 206:
                    mode = "ab"
                    total = have + int(response.headers.get("Content-Length", -have - 1))
                else:
                    mode, have = "wb", 0
                    total = int(response.headers.get("Content-Length", -1))
                with open(part, mode) as f:
                    shutil.copyfileobj(response, f, 1 << 20)
            size = part.stat().st_size
            if total >= 0 and size != total:
                raise HTTPException(f"connection closed at {size} of {total} bytes")
            _check_parquet(part, label=url)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our partial file is stale or complete-but-unrenamed: start over
                part.unlink(missing_ok=True)
            elif e.code < 500 and e.code != 429:
                raise PrepareError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            last = f"HTTP {e.code} {e.reason}"
        except PrepareError:
            part.unlink(missing_ok=True)  # complete but corrupt: never keep it
            if attempt == retries:
                raise
            last = "downloaded file is not valid parquet"
        except (urllib.error.URLError, HTTPException, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < retries:
            time.sleep(min(backoff * 2 ** (attempt - 1), 10))
    raise PrepareError(f"download of {url} failed after {retries} attempts ({last})")


def download_dataset(name, num_shards, workers=8, base_url=None, retries=5, progress=None, out=None):
    """Download training shards 0..num_shards-1 and the pinned validation shard into out (default data/)."""
    if name not in DATASETS:
        raise PrepareError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or use --source PATH")
    spec = DATASETS[name]
    if num_shards < 1:
        raise PrepareError(f"--num-shards must be at least 1, got {num_shards}")
    base_url = (base_url or spec.base_url).rstrip("/")
    out = Path(out or data_dir())
    out.mkdir(parents=True, exist_ok=True)
    indices = list(range(min(num_shards, spec.max_shard))) + [spec.val_shard]
    todo = [i for i in indices if not (out / shard_name(i)).exists()]
    if progress:
        progress("download", len(indices) - len(todo), len(indices))
    if not todo:
        return
    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
        futures = [pool.submit(download_file, f"{base_url}/{shard_name(i)}", out / shard_name(i), retries) for i in todo]
        try:
            for future in as_completed(futures):
                future.result()
                if progress:
                    progress("download", 1, None)
        except PrepareError as e:
            for f in futures:
                f.cancel()
            raise PrepareError(f"{e}; offline? import local files instead: autoresearch prepare --source PATH") from None


def list_source_files(paths):
    """Expand files and directories (sorted, recursive) into the source files to import."""
    files = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise PrepareError(f"source {raw}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
            if not found:
                raise PrepareError(f"source {raw}: directory holds no {'/'.join(SOURCE_SUFFIXES)} files")
            files.extend(found)
        elif path.suffix in SOURCE_SUFFIXES:
            files.append(path)
        else:
            raise PrepareError(f"source {raw}: unsupported file type (use {', '.join(SOURCE_SUFFIXES)})")
    return files


def read_documents(path):
    """Documents of one source file; every problem is a one-line PrepareError."""
    path = Path(path)
    if path.suffix == ".parquet":
        _check_parquet(path)
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        docs = [d for d in docs if d]
    elif path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PrepareError(f"{path}:{lineno}: not a JSON object with a `text` field") from None
                if text:
                    docs.append(str(text))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        docs, current = [], ""
        for para in text.split("\n\n"):
            if para.strip():
                current = f"{current}\n\n{para}" if current else para
            if len(current) >= TXT_DOC_CHARS:
                docs.append(current)
                current = ""
        if current:
            docs.append(current)
    if not docs:
        raise PrepareError(f"{path}: no text found")
    return docs


def is_validation(doc, val_fraction):
    """Deterministic split by content hash: independent of file order and machine."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def _write_shard(path, docs):
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(table, path, row_group_size=ROW_GROUP_DOCS)


def import_sources(paths, out_dir, val_fraction=0.1):
    """Read local sources and write them as upstream-named shards into out_dir. Returns counts."""
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    train, val = [], []
    for f in list_source_files(paths):
        for doc in read_documents(f):
            (val if is_validation(doc, val_fraction) else train).append(doc)
    if not train or not val:
        raise PrepareError(f"sources hold too little text for a train/validation split ({len(train) + len(val)} documents)")
    shard, chars, index = [], 0, 0
    for doc in train:
        shard.append(doc)
        chars += len(doc)
        if chars >= IMPORT_SHARD_CHARS:
            _write_shard(out_dir / shard_name(index), shard)
            shard, chars, index = [], 0, index + 1
    if shard:
        _write_shard(out_dir / shard_name(index), shard)
    _write_shard(out_dir / VAL_FILENAME, val)
    return {"train_docs": len(train), "val_docs": len(val)}


def list_shards(directory=None):
    """(training shard paths, validation shard path) in a data directory."""
    directory = Path(directory or data_dir())
    shards = sorted(p for p in directory.glob("shard_*.parquet"))
    val = directory / VAL_FILENAME
    train = [p for p in shards if p.name != VAL_FILENAME]
    if not train or not val.exists():
        raise PrepareError(f"{directory}: needs at least one training shard and the validation shard {VAL_FILENAME}")
    return train, val


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _training_text(train_shards):
    nchars = 0
    for path in train_shards:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = text[:TOKENIZER_DOC_CAP]
                nchars += len(doc)
                yield doc
                if nchars >= TOKENIZER_MAX_CHARS:
                    return


def train_tokenizer(train_shards, vocab_size, out_dir):
    """BPE with rustbpe, saved as upstream's tiktoken pickle plus token_bytes.npy."""
    import rustbpe

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_text(train_shards), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    enc = tiktoken.Encoding(
        name="rustbpe",
        pat_str=bpe.get_pattern(),
        mergeable_ranks=ranks,
        special_tokens={name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    with open(out_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    # exact byte lengths (decode_single_token_bytes), so partial UTF-8 tokens count what they hold
    special = {enc.encode_single_token(s) for s in SPECIAL_TOKENS}
    lengths = [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    np.save(out_dir / "token_bytes.npy", np.array(lengths, dtype=np.int32))
    sample = "Hello world! Numbers: 123. Unicode: 你好"
    if enc.decode(enc.encode_ordinary(sample)) != sample:
        raise PrepareError("tokenizer round-trip check failed")
    return enc


class Tokenizer:
    """Upstream's tokenizer wrapper over the pickled tiktoken encoding."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory=None):
        path = Path(directory or tokenizer_dir()) / "tokenizer.pkl"
        if not path.exists():
            raise PrepareError(f"no tokenizer at {path}: run `autoresearch prepare` first")
        with open(path, "rb") as f:
            return cls(pickle.load(f))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ([prepend] + ids) if prepend is not None else ids
        ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend is not None:
            for row in ids:
                row.insert(0, prepend)
        return ids

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes():
    """Byte length of every token id (int32 numpy array); 0 marks special tokens."""
    return np.load(tokenizer_dir() / "token_bytes.npy")


# ---------------------------------------------------------------------------
# Tokenized shards (batched tokenization, cached once, memory-mapped by the loader)
# ---------------------------------------------------------------------------


def tokenize_shard(tokenizer, shard_path, out_dir, batch_docs=1024):
    """Write <shard>.npy (BOS + document tokens, back to back) and <shard>.offsets.npy."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    bos = tokenizer.get_bos_token_id()
    pf = pq.ParquetFile(shard_path)
    chunks, lengths = [], []
    for batch in pf.iter_batches(batch_size=batch_docs, columns=["text"]):
        for ids in tokenizer.encode(batch.column(0).to_pylist(), prepend=bos, num_threads=os.cpu_count() or 1):
            chunks.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
    stem = Path(shard_path).stem
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(out_dir / f"{stem}.npy", np.concatenate(chunks) if chunks else np.zeros(0, dtype))
    np.save(out_dir / f"{stem}.offsets.npy", offsets)
    return int(offsets[-1])


def _load_tokens(stem, directory=None):
    directory = Path(directory or tokens_dir())
    tokens = np.load(directory / f"{stem}.npy", mmap_mode="r")
    offsets = np.load(directory / f"{stem}.offsets.npy")
    return tokens, offsets


def _documents(split, directory=None):
    """Endless (document tokens, epoch) stream of a split, in shard order."""
    if split == "val" and directory is None:
        require_validation()
    directory = Path(directory or tokens_dir())
    if split == "val":
        stems = [Path(VAL_FILENAME).stem]
    elif split == "train":
        stems = sorted(p.name[: -len(".offsets.npy")] for p in directory.glob("shard_*.offsets.npy"))
        stems = [s for s in stems if s != Path(VAL_FILENAME).stem]
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not stems:
        raise PrepareError(f"no tokenized {split} shards in {directory}: run `autoresearch prepare` first")
    shards = [_load_tokens(s, directory) for s in stems]
    epoch = 1
    while True:
        for tokens, offsets in shards:
            for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                yield tokens[start:end], epoch
        epoch += 1


def pack_rows(documents, B, T, buffer_size=1000, keep_remainders=False):
    """
    BOS-aligned best-fit packing: every row starts with a document (BOS), no padding.
    Each slot takes the largest buffered document that fits; when none fits, the shortest is
    cropped to fill the row exactly. Upstream drops the cropped tail, which is harmless on a
    large dataset; keep_remainders puts it back in the buffer behind its document's BOS, so a
    small local dataset is not cut to the first row of each document (mixed-en at T=256 keeps
    ~20% of its tokens otherwise). Yields ((B, T+1) int32 array, epoch).
    """
    capacity = T + 1
    lengths, docs = [], []  # kept sorted by length; equal lengths oldest-last, so popped first

    def push(doc):
        i = bisect.bisect_left(lengths, len(doc))
        lengths.insert(i, len(doc))
        docs.insert(i, doc)

    epoch = 1
    while True:
        rows = np.empty((B, capacity), dtype=np.int32)
        for r in range(B):
            pos = 0
            while pos < capacity:
                while len(docs) < buffer_size:
                    doc, epoch = next(documents)
                    push(doc)
                remaining = capacity - pos
                i = bisect.bisect_right(lengths, remaining) - 1
                if i < 0:
                    i = 0  # nothing fits: crop the shortest
                lengths.pop(i)
                doc = docs.pop(i)
                n = min(len(doc), remaining)
                rows[r, pos : pos + n] = doc[:n]
                pos += n
                if keep_remainders and n < len(doc):
                    push(np.concatenate([doc[:1], doc[n:]]))  # doc[0] is its BOS
        yield rows, epoch


def make_dataloader(tokenizer, B, T, split="train", buffer_size=1000):
    """
    Upstream's loader contract on numpy: yields (inputs, targets, epoch), each (B, T) int32.
    Training keeps cropped remainders (see pack_rows); validation rows are built as upstream's.
    """
    del tokenizer  # documents come pre-tokenized from the cache; kept for upstream's signature
    if split == "val":
        require_validation()  # here, not at the first batch: a generator would fail only when iterated
    rows = pack_rows(_documents(split), B, T, buffer_size, keep_remainders=split == "train")
    return _by_pass(rows, _split_tokens(split))


def _split_tokens(split):
    stem = Path(VAL_FILENAME).stem
    names = [p.name for p in tokens_dir().glob("shard_*.offsets.npy")]
    names = [n for n in names if (n[: -len(".offsets.npy")] == stem) == (split == "val")]
    return max(1, sum(int(np.load(tokens_dir() / n)[-1]) for n in names))


def _by_pass(rows, split_tokens):
    """(inputs, targets, epoch): epoch is the pass over the split's tokens that this batch's tokens fall in (the
    packer reads up to buffer_size documents ahead, so its own reader's pass runs early on small data)."""
    trained = 0
    for batch, _ in rows:
        yield batch[:, :-1], batch[:, 1:], 1 + trained // split_tokens
        trained += batch[:, 1:].size


def build_val_rows(profile, directory=None):
    """The fixed validation rows: the first eval_tokens // seq_len packed rows of the val split."""
    n_rows = max(1, profile.eval_tokens // profile.seq_len)
    rows, _ = next(pack_rows(_documents("val", directory), n_rows, profile.seq_len))
    return rows


def get_val_rows():
    require_validation()
    return np.load(tokens_dir() / "val_rows.npy", mmap_mode="r")


def require_validation():
    """Fail at once, in one line, where training asks for validation data in the trainer's view."""
    path = _meta_path()
    if path.exists() and json.loads(path.read_text()).get("trainer_view"):
        raise PrepareError(f"the validation split is not available to training: {cache_dir()} is the trainer's view "
                           "of the cache; the harness scores the checkpoint train.py saves (backends/README.md)")


# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE: this is the fixed metric)
# ---------------------------------------------------------------------------


def evaluate_bpb(loss_fn, batch_size, rows=None):
    """
    Bits per byte on the fixed validation rows, for every backend.
    loss_fn(inputs, targets) takes (b, T) int32 numpy arrays and returns per-token cross-entropy
    in nats, shape (b, T), as anything numpy can convert. Tokens with byte length 0 (special
    tokens) count in neither sum. The rows do not depend on batch_size, so neither does the result.
    rows: the validation rows when the caller has read them already (the harness's evaluator).
    """
    rows = get_val_rows() if rows is None else rows
    token_bytes = get_token_bytes()
    total_nats, total_bytes = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = np.ascontiguousarray(rows[start : start + batch_size])
        x, y = chunk[:, :-1], chunk[:, 1:]
        losses = np.asarray(loss_fn(x, y), dtype=np.float64)
        if losses.shape != y.shape:
            raise ValueError(f"loss_fn returned shape {losses.shape}, expected {y.shape}")
        nbytes = token_bytes[y]
        total_nats += float(np.sum(losses * (nbytes > 0)))
        total_bytes += int(nbytes.sum())
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------
# Checkpoint (train.py -> the harness's evaluator) and the trainer's view of the cache
# ---------------------------------------------------------------------------

VIEW_NAME = "trainer-view"


def checkpoint_dir():
    """Where train.py leaves its trained model: AUTORESEARCH_CHECKPOINT (the harness sets it), else <cache>/checkpoint."""
    return Path(os.environ.get("AUTORESEARCH_CHECKPOINT") or cache_dir() / "checkpoint")


def save_checkpoint(config, weights, path=None):
    """
    The trained model for the evaluator: config.json (the GPTConfig fields) and weights.npz (float32 arrays
    under export_weights' names). Each file is written to a temporary name and renamed; config.json goes
    last and is removed first, so a checkpoint without it is incomplete and never read.
    """
    path = Path(path or checkpoint_dir())
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)
    tmp = path / "weights.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **{name: np.asarray(w, dtype=np.float32) for name, w in weights.items()})
    os.replace(tmp, path / "weights.npz")
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path / "config.json")
    return path


def load_checkpoint(path=None):
    """(config dict, {name: float32 array}) of a checkpoint save_checkpoint wrote."""
    path = Path(path or checkpoint_dir())
    if not (path / "config.json").exists():
        raise PrepareError(f"no checkpoint in {path}: train.py saves one at the end of training (prepare.save_checkpoint)")
    config = json.loads((path / "config.json").read_text())
    with np.load(path / "weights.npz", allow_pickle=False) as f:
        return config, {name: f[name] for name in f.files}


def _link_or_copy(src, dest):
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dest)


def trainer_view():
    """
    The cache as training sees it: every file but the validation shard, its tokens and val_rows.npy, hard-linked
    (copied where links fail) into <cache>/trainer-view, whose profile.json carries a `trainer_view` marker (the
    hash of the cache's own profile.json, which every prepare rewrites: a changed cache rebuilds the view).
    Run train.py with AUTORESEARCH_CACHE set to the returned path. Only the loader is kept out: the view sits
    inside the cache, so a train.py that walks up the directory tree can still find the validation files.
    """
    root = cache_dir()
    meta_path = _meta_path()
    if not meta_path.exists():
        raise PrepareError(f"no prepared data in {root}: run `autoresearch prepare` first")
    if json.loads(meta_path.read_text()).get("trainer_view"):
        return root  # already the view
    stamp = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    view = root / VIEW_NAME
    try:
        if json.loads((view / "profile.json").read_text()).get("trainer_view") == stamp:
            return view
    except (OSError, ValueError):
        pass
    val_stem = Path(VAL_FILENAME).stem
    hidden = {VAL_FILENAME, f"{val_stem}.npy", f"{val_stem}.offsets.npy", "val_rows.npy"}
    staging, old = root / f".view-staging-{os.getpid()}", root / f".view-old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for sub in ("data", "tokenizer", "tokens"):
            (staging / sub).mkdir(parents=True)
            for src in sorted((root / sub).glob("*")):
                if src.is_file() and src.name not in hidden and not src.name.endswith((".tmp", ".part")):
                    _link_or_copy(src, staging / sub / src.name)
        meta = json.loads(meta_path.read_text())
        (staging / "profile.json").write_text(json.dumps(dict(meta, trainer_view=stamp), indent=2) + "\n")
        if view.exists():
            os.replace(view, old)
        os.replace(staging, view)
    except OSError as e:
        raise PrepareError(f"cannot build the trainer's view of {root}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return view


# ---------------------------------------------------------------------------
# Cache check: the files prepare wrote, as it wrote them (sizes, and a hash of the small val_rows.npy)
# ---------------------------------------------------------------------------


def _file_sizes(root):
    return {f"{sub}/{p.name}": p.stat().st_size for sub in ("tokenizer", "tokens")
            for p in sorted((Path(root) / sub).glob("*")) if p.is_file()}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def repair_command(meta):
    """The prepare command that rebuilds this cache from what profile.json records."""
    origin = (f"--dataset {meta['dataset']}" if meta.get("dataset")
              else " ".join(f"--source {shlex.quote(s)}" for s in meta.get("sources", [])))
    return f"autoresearch prepare --force --profile {meta['profile']['name']} {origin}".rstrip()


def check_cache():
    """
    The cache as prepare left it: every file it recorded present with its size, and val_rows.npy with its hash.
    Fast (file sizes and the hash of one small file). Returns a one-line note of what was checked; raises
    PrepareError naming the first problem and the command that repairs it.
    """
    root = cache_dir()
    meta = load_meta()
    recorded = meta.get("files")
    if recorded is None:
        return f"cache prepared before file sizes were recorded: not checked ({repair_command(meta)} records them)"
    missing_dirs = [sub for sub in ("tokenizer", "tokens") if not (root / sub).is_dir()]
    problems = [f"{sub}/ is missing" for sub in missing_dirs]
    sizes = _file_sizes(root)
    for name, size in recorded.items():
        if name.split("/")[0] in missing_dirs:
            continue
        if name not in sizes:
            problems.append(f"{name} is missing")
        elif sizes[name] != size:
            problems.append(f"{name} has {sizes[name]:,} bytes, prepare wrote {size:,}")
    val_rows = root / "tokens" / "val_rows.npy"
    if not problems and _sha256(val_rows) != meta.get("val_rows_sha256"):
        problems.append("tokens/val_rows.npy does not hold the rows prepare wrote (its hash differs)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PrepareError(f"the cache {root} is damaged: {problems[0]}{more}; repair it: {repair_command(meta)}")
    return f"cache ok: {len(recorded)} files at their recorded sizes, val_rows.npy hash matches"


# ---------------------------------------------------------------------------
# Prepare: everything is built in a staging folder and moved into place at the end
# ---------------------------------------------------------------------------


def _check_writable(directory):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrepareError(f"cache directory {directory} is not writable ({e.strerror})") from None


def prepare(profile="cpu", dataset=None, sources=None, num_shards=10, workers=8, base_url=None,
            val_fraction=0.1, force=False, progress=None):
    """Build the cache. Returns the metadata written to profile.json."""
    if profile not in PROFILES:
        raise PrepareError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if bool(dataset) == bool(sources):
        raise PrepareError("give either a dataset name or --source PATH, not both or neither")
    if dataset and dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)} or use --source PATH")
    if sources:
        list_source_files(sources)  # a missing or unsupported path fails before anything is touched
    prof = PROFILES[profile]
    root = cache_dir()
    _check_writable(root)
    origin = {"dataset": dataset} if dataset else {"sources": [str(Path(s).resolve()) for s in sources]}
    other_data = False  # the cache holds shards of other data: downloads must not mix with them
    if _meta_path().exists():
        old = load_meta()
        other_data = any(old.get(k) != v for k, v in origin.items())
        if not force and old["profile"] == asdict(prof) and not other_data:
            return old
        if not force:
            raise PrepareError(f"{root} was prepared with profile {old['profile']['name']!r} from other data; "
                               "use --force to rebuild it, or AUTORESEARCH_CACHE for a second cache")

    staging = root / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for sub in ("data", "tokenizer", "tokens"):
            (staging / sub).mkdir(parents=True)
        stats = {}
        if sources:
            if progress:
                progress("import", 0, 1)
            stats = import_sources(sources, staging / "data", val_fraction)
            train_shards, val_shard = list_shards(staging / "data")
        else:
            fresh = staging / "data" if other_data else data_dir()
            download_dataset(dataset, num_shards, workers, base_url, progress=progress, out=fresh)
            train_shards, val_shard = list_shards(fresh)
        for path in train_shards + [val_shard]:
            _check_parquet(path)
        if progress:
            progress("tokenizer", 0, 1)
        enc = train_tokenizer(train_shards, prof.vocab_size, staging / "tokenizer")
        tokenizer = Tokenizer(enc)
        all_shards = train_shards + [val_shard]
        if progress:
            progress("tokenize", 0, len(all_shards))
        counts = {}
        for path in all_shards:
            counts[path.name] = tokenize_shard(tokenizer, path, staging / "tokens")
            if progress:
                progress("tokenize", 1, None)
        val_rows = build_val_rows(prof, staging / "tokens")
        np.save(staging / "tokens" / "val_rows.npy", val_rows)
        val_tokens = counts[VAL_FILENAME]
        meta = {
            "profile": asdict(prof),
            **origin,
            **stats,
            "train_tokens": sum(v for k, v in counts.items() if k != VAL_FILENAME),
            "val_tokens": val_tokens,
            "val_repeats": val_tokens < prof.eval_tokens,  # eval cycles through a small val split
            "vocab_size": enc.n_vocab,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": _file_sizes(staging),  # check_cache compares these before every run
            "val_rows_sha256": _sha256(staging / "tokens" / "val_rows.npy"),
        }
        # commit: replace what a previous prepare left, then write profile.json last
        _meta_path().unlink(missing_ok=True)
        for sub in ("tokenizer", "tokens") + (("data",) if sources or other_data else ()):
            shutil.rmtree(root / sub, ignore_errors=True)
            os.replace(staging / sub, root / sub)
        tmp = root / "profile.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, _meta_path())
        return meta
    except KeyboardInterrupt:
        raise
    except PrepareError:
        raise
    except OSError as e:
        raise PrepareError(f"prepare failed: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    import sys

    sys.exit("use the CLI: autoresearch prepare --help")
