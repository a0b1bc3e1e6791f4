"""
Fixed harness for autoresearch: eval profiles, data, tokenizer, loader and the val_bpb evaluator.

Every backend's train.py imports this file; the agent never edits it. It imports neither torch
nor mlx (export_model imports the model's own framework), so the metric is computed by the same numpy code on
every machine.

Cache layout (upstream autoresearch's, plus our own files beside it):
    $AUTORESEARCH_CACHE (default ~/.cache/autoresearch)/
        data/shard_XXXXX.parquet      training shards; shard_06542.parquet is the validation shard
        tokenizer/tokenizer.pkl       pickled tiktoken.Encoding (upstream's format)
        tokenizer/token_bytes.npy     int32 byte length of every token id, 0 for special tokens
        tokens/shard_XXXXX.npy        the shard tokenized, BOS before every document (uint16/uint32)
        tokens/shard_XXXXX.offsets.npy  start of every document in the line above, plus the end
        tokens/val_rows.npy           the fixed validation rows, (N, seq_len + 1)
        tokens/holdout_rows.npy       the holdout: rows of other validation documents, scored beside them, never
                                      read by a keep decision (its val_bpb is a check on the selection)
        profile.json                  eval profile, provenance, file sizes and the val_rows hash (check_cache);
                                      written last, marks the cache ready
        trainer-view/                 the cache as training sees it, without the validation split (trainer_view)
        checkpoint/                   train.py's exported graph and its tensors when AUTORESEARCH_CHECKPOINT is unset
"""

import bisect
import hashlib
import json
import math
import os
import pickle
import queue
import re
import shlex
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
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
    holdout_tokens: int = 0  # tokens of the holdout rows, from validation documents the val rows do not hold


PROFILES = {
    # upstream autoresearch's values, for H100-class GPUs
    "gpu": EvalProfile("gpu", seq_len=2048, vocab_size=8192, eval_tokens=40 * 524288, time_budget=300,
                       holdout_tokens=40 * 524288),
    # Apple Silicon laptops and small GPUs
    "laptop": EvalProfile("laptop", seq_len=1024, vocab_size=8192, eval_tokens=4 * 524288, time_budget=300,
                          holdout_tokens=4 * 524288),
    # CPUs: short context, small vocabulary and eval, so a 5-minute run sees enough steps
    "cpu": EvalProfile("cpu", seq_len=256, vocab_size=4096, eval_tokens=2**16, time_budget=300, holdout_tokens=2**16),
    # the cpu profile scored on a quarter of its rows (64), and a holdout of 16: for tests and smoke checks, where
    # scoring would take most of a few-second experiment; its val_bpb is noisier, and a series of its own (the
    # profile is in the key)
    "smoke": EvalProfile("smoke", seq_len=256, vocab_size=4096, eval_tokens=2**14, time_budget=300,
                         holdout_tokens=2**12),
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
TXT_READ_BLOCK = 1 << 20  # plain text is read this many bytes at a time
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


DOWNLOAD_TIMEOUT = 30  # seconds one read may wait for the server's next bytes
STALL_SECONDS = 30  # a transfer slower than MIN_RATE over this many seconds is cut off and retried
MIN_RATE = 4096  # bytes per second
DOWNLOAD_DEADLINE = 3600  # seconds one shard may take, all its attempts together
DOWNLOADS = ".downloads"  # <cache>/.downloads/<dataset>/: shards (and .part files) not yet in data/


def _is_text(kind):
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or (pa.types.is_dictionary(kind) and _is_text(kind.value_type)))


def _check_parquet(path, label=None):
    """Number of documents in a parquet file with a string `text` column; PrepareError otherwise."""
    label = label or path
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(_one_line(f"{label}: not a readable parquet file ({type(e).__name__}: {e})")) from None
    if "text" not in pf.schema_arrow.names:
        raise PrepareError(f"{label}: parquet file has no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
    kind = pf.schema_arrow.field("text").type
    if not _is_text(kind):
        raise PrepareError(f"{label}: the `text` column holds {kind}, not strings")
    return pf.metadata.num_rows


def check_shard(path, label=None):
    """A shard as training and evaluation need it, read whole: a string `text` column, at least one row and some
    text (an empty split makes the loader spin and the evaluator divide by zero). Returns its number of rows."""
    label = label or path
    rows = _check_parquet(path, label)
    if rows == 0:
        raise PrepareError(f"{label}: the shard holds no documents (0 rows)")
    chars = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_DOCS, columns=["text"]):
            lengths = pa.compute.utf8_length(batch.column(0).cast(pa.string()))
            chars += pa.compute.sum(lengths).as_py() or 0
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(_one_line(f"{label}: not a readable parquet file ({type(e).__name__}: {e})")) from None
    if chars == 0:
        raise PrepareError(f"{label}: the shard holds no text ({rows:,} documents, every one empty)")
    return rows


def _one_line(text):
    """A message from elsewhere (an exception, a server's reason phrase) as one line."""
    return " ".join(str(text).split())


class _Restart(Exception):
    """The server's reply does not continue the partial file: start the file again from its first byte."""


class _Stalled(Exception):
    """The transfer went slower than the floor: retried, resuming where it stopped."""


class Cancelled(Exception):
    """Another download failed, or the process is being stopped: this one ends at its next chunk."""


def _source_path(part):
    return part.with_name(part.name + ".source")  # where the .part came from: its URL and the server's validators


def _resumable(part, url):
    """(bytes of part to resume, its recorded source) for url; a .part of another URL, or one with no record of
    where it came from, is deleted: appending another server's bytes to it would splice two files."""
    try:
        source = json.loads(_source_path(part).read_text())
    except (OSError, ValueError):
        source = None
    if not part.exists() or not isinstance(source, dict) or source.get("url") != url:
        part.unlink(missing_ok=True)
        _source_path(part).unlink(missing_ok=True)
        return 0, None
    return part.stat().st_size, source


def _discard(part):
    part.unlink(missing_ok=True)
    _source_path(part).unlink(missing_ok=True)


def _content_range(value):
    """(first byte, complete length) of a Content-Range header, or None when it is not one."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    return (int(match[1]), None if match[3] == "*" else int(match[3])) if match else None


def _length(headers):
    """Content-Length as an int, -1 when absent or not a number (the shard's own check catches a short file)."""
    value = (headers.get("Content-Length") or "").strip()
    return int(value) if value.isdigit() else -1


def _open_part(response, part, url, have, source):
    """(file mode, bytes already there, total expected or -1) for this reply, after checking that a partial
    reply continues the .part exactly: from its last byte, of the same file (ETag, Last-Modified)."""
    validators = {"etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
    if have and response.status == 206:
        found = _content_range(response.headers.get("Content-Range"))
        same = all(source.get(k) in (None, v) for k, v in validators.items())
        if found is None or found[0] != have or not same:
            raise _Restart(f"the server's partial reply does not continue the {have:,} bytes downloaded so far")
        total = found[1] if found[1] is not None else have + _length(response.headers)
        if _length(response.headers) >= 0 and found[1] is not None and have + _length(response.headers) != found[1]:
            raise _Restart("the server's partial reply has the wrong length")
        return "ab", have, total
    _source_path(part).write_text(json.dumps({"url": url, **validators}))  # before the first byte
    return "wb", 0, _length(response.headers)


def _copy(response, f, url, limits, cancel):
    """Copy the reply into f chunk by chunk (read1: whatever has arrived), so that a cancel, the deadline and
    the rate floor are checked while bytes trickle in."""
    ends, deadline, min_rate, stall = limits
    window, window_bytes = time.monotonic(), 0
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(url)
        chunk = response.read1(1 << 20)
        if not chunk:
            return
        f.write(chunk)
        now = time.monotonic()
        if now > ends:
            raise PrepareError(f"download of {url} took longer than its deadline ({deadline:g}s)")
        window_bytes += len(chunk)
        if now - window >= stall:
            if window_bytes < min_rate * (now - window):
                raise _Stalled(f"slower than {min_rate:,} bytes/s for {stall:g}s")
            window, window_bytes = now, 0


def download_file(url, dest, retries=5, timeout=DOWNLOAD_TIMEOUT, backoff=0.5, deadline=DOWNLOAD_DEADLINE,
                  min_rate=MIN_RATE, stall=STALL_SECONDS, cancel=None):
    """Download url to dest, resuming a partial `.part` file of the same source; dest appears only when complete
    and checked (check_shard). One PrepareError line when it cannot: every attempt within `deadline` seconds."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    ends = time.monotonic() + deadline
    limits = (ends, deadline, min_rate, stall)
    last = None
    for attempt in range(1, retries + 1):
        total = -1
        have, source = _resumable(part, url)
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and (source.get("etag") or source.get("last_modified")):
            headers["If-Range"] = source.get("etag") or source.get("last_modified")  # changed file: a whole 200
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                mode, have, total = _open_part(response, part, url, have, source)
                with open(part, mode) as f:
                    _copy(response, f, url, limits, cancel)
            size = part.stat().st_size
            if total >= 0 and size != total:
                raise HTTPException(f"connection closed at {size} of {total} bytes")
            check_shard(part, label=url)
            os.replace(part, dest)
            _source_path(part).unlink(missing_ok=True)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our partial file is stale or complete-but-unrenamed: start over
                _discard(part)
            elif e.code < 500 and e.code != 429:
                raise PrepareError(_one_line(f"download of {url} failed: HTTP {e.code} {e.reason}")) from None
            last = f"HTTP {e.code} {e.reason}"
        except _Restart as e:
            _discard(part)
            last = str(e)
            continue  # nothing wrong with the server's health: ask again at once, for the whole file
        except PrepareError:
            _discard(part)  # not a usable shard, or past the deadline: never keep it
            if total >= 0 or attempt == retries or time.monotonic() > ends:
                raise  # all of the bytes the server announced: it would send the same again
            last = "downloaded file is not a usable shard"
        except _Stalled as e:
            last = str(e)
        except (urllib.error.URLError, HTTPException, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if time.monotonic() > ends:
            break
        if attempt < retries:
            time.sleep(min(backoff * 2 ** (attempt - 1), 10, max(ends - time.monotonic(), 0)))
    raise PrepareError(_one_line(f"download of {url} failed after {attempt} attempts ({last})"))


def download_dataset(name, num_shards, workers=8, base_url=None, retries=5, progress=None, out=None, reuse=None,
                     **limits):
    """Download training shards 0..num_shards-1 and the pinned validation shard into out (default data/), but for
    those already in out or reuse that pass check_shard. Returns {shard name: path} of every one of them.

    The downloads run on daemon threads: a signal (Ctrl-C, SIGTERM) ends the main thread's wait at once, the
    workers stop at their next chunk, and none of them holds up the process's exit (a ThreadPoolExecutor's
    workers are joined at exit: a 1 byte/s server would keep the process alive for hours)."""
    if name not in DATASETS:
        raise PrepareError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or use --source PATH")
    spec = DATASETS[name]
    if num_shards < 1:
        raise PrepareError(f"--num-shards must be at least 1, got {num_shards}")
    base_url = (base_url or spec.base_url).rstrip("/")
    out = Path(out or data_dir())
    out.mkdir(parents=True, exist_ok=True)
    names = [shard_name(i) for i in list(range(min(num_shards, spec.max_shard))) + [spec.val_shard]]
    found = {n: _usable(n, ([Path(reuse)] if reuse else []) + [out]) for n in names}
    todo = [n for n in names if found[n] is None]
    if progress:
        progress("download", len(names) - len(todo), len(names))
    jobs, done, cancel = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for n in todo:
        jobs.put(n)

    def work():
        while not cancel.is_set():
            try:
                n = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((n, download_file(f"{base_url}/{n}", out / n, retries, cancel=cancel, **limits)))
            except Exception as e:  # the main thread raises it
                done.put((n, e))

    for i in range(max(1, min(workers, len(todo)))):
        threading.Thread(target=work, name=f"download-{i}", daemon=True).start()
    try:
        for _ in todo:
            n, result = done.get()
            if isinstance(result, Cancelled):
                continue
            if isinstance(result, PrepareError):
                raise PrepareError(f"{result}; offline? import local files instead: autoresearch prepare --source PATH")
            if isinstance(result, Exception):
                raise PrepareError(_one_line(f"download of {base_url}/{n} failed: {type(result).__name__}: {result}"))
            found[n] = result
            if progress:
                progress("download", 1, None)
    finally:
        cancel.set()  # the other workers stop at their next chunk
    return found


def _usable(name, folders):
    """The first folder's copy of shard `name` that passes check_shard, else None: a damaged one is downloaded
    again (and replaces it where it lies in data/ only when the prepare that fetched it succeeds)."""
    for folder in folders:
        path = folder / name
        if path.exists():
            try:
                check_shard(path)
                return path
            except PrepareError:
                continue
    return None


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
    """Documents of one source file, as a list; every problem is a one-line PrepareError."""
    return list(iter_documents(path))


def iter_documents(path):
    """Documents of one source file, one at a time: a file larger than memory is imported by streaming it. Every
    problem is a one-line PrepareError; a file that holds no text is one."""
    path = Path(path)
    reader = {".parquet": _parquet_documents, ".jsonl": _jsonl_documents}.get(path.suffix, _txt_documents)
    found = False
    for doc in reader(path):
        found = True
        yield doc
    if not found:
        raise PrepareError(f"{path}: no text found")


def _parquet_documents(path):
    _check_parquet(path)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_DOCS, columns=["text"]):
            yield from (d for d in batch.column(0).to_pylist() if d)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise PrepareError(_one_line(f"{path}: not a readable parquet file ({type(e).__name__}: {e})")) from None


def _jsonl_documents(path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                                   ) from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise PrepareError(f"{path}:{lineno}: not a JSON object with a `text` field") from None
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{lineno}: `text` is {type(text).__name__}, not a string")
            _check_unicode(text, f"{path}:{lineno}")
            yield text


def _check_unicode(text, label):
    """JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 file (a shard) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PrepareError(f"{label}: `text` holds a lone surrogate ({text[e.start]!r} at character {e.start}), "
                           "not valid Unicode") from None


def _txt_documents(path):
    """Blank-line paragraphs grouped into documents of about TXT_DOC_CHARS, read a block at a time. Paragraphs are
    split as bytes: b"\\n\\n" never occurs inside a UTF-8 sequence, so each decodes on its own."""
    current, offset = "", 0
    for para in _paragraphs(path):
        try:
            text = para.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None
        offset += len(para) + 2
        if text.strip():
            current = f"{current}\n\n{text}" if current else text
        if len(current) >= TXT_DOC_CHARS:
            yield current
            current = ""
    if current:
        yield current


def _paragraphs(path):
    """The file's bytes split on b"\\n\\n", exactly as bytes.split would split the whole file."""
    pending = b""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(TXT_READ_BLOCK), b""):
            *whole, pending = (pending + chunk).split(b"\n\n")
            yield from whole
    yield pending


def is_validation(doc, val_fraction):
    """Deterministic split by content hash: independent of file order and machine."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


class _ShardWriter:
    """Documents written to a parquet shard a row group at a time: an import holds one row group in memory, not
    the corpus."""

    def __init__(self, path):
        self.path, self.writer, self.docs, self.count, self.chars = path, None, [], 0, 0

    def add(self, doc):
        self.docs.append(doc)
        self.count += 1
        self.chars += len(doc)
        if len(self.docs) >= ROW_GROUP_DOCS:
            self.flush()

    def flush(self):
        if self.docs:
            table = pa.table({"text": pa.array(self.docs, type=pa.string())})
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.path, table.schema)
            self.writer.write_table(table, row_group_size=ROW_GROUP_DOCS)
            self.docs = []

    def close(self):
        self.flush()
        if self.writer is not None:
            self.writer.close()


def import_sources(paths, out_dir, val_fraction=0.1):
    """Read local sources and write them as upstream-named shards into out_dir, streaming. Returns counts; on
    any error the shards it wrote are removed."""
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    out_dir = Path(out_dir)
    val, train, written = _ShardWriter(out_dir / VAL_FILENAME), None, []
    n_train = 0
    try:
        for f in list_source_files(paths):
            for doc in iter_documents(f):
                if is_validation(doc, val_fraction):
                    val.add(doc)
                    continue
                if train is None:
                    train = _ShardWriter(out_dir / shard_name(len(written)))
                    written.append(train)
                train.add(doc)
                n_train += 1
                if train.chars >= IMPORT_SHARD_CHARS:
                    train.close()
                    train = None
        val.close()
        if train is not None:
            train.close()
        if not n_train or not val.count:
            raise PrepareError(f"sources hold too little text for a train/validation split "
                               f"({n_train + val.count} documents)")
    except BaseException:
        for w in written + [val]:
            if w.writer is not None:
                w.writer.close()
            w.path.unlink(missing_ok=True)
        raise
    return {"train_docs": n_train, "val_docs": val.count}


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


def _documents(split, directory=None, passes=None):
    """(document tokens, epoch) stream of a split, in shard order: endless, or `passes` passes over it."""
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
    while passes is None or epoch <= passes:
        for tokens, offsets in shards:
            for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                yield tokens[start:end], epoch
        epoch += 1


class _RowPacker:
    """
    BOS-aligned best-fit packing: every row starts with a document (BOS), no padding.
    Each slot takes the largest buffered document that fits; when none fits, the shortest is
    cropped to fill the row exactly. Upstream drops the cropped tail, which is harmless on a
    large dataset; keep_remainders puts it back in the buffer behind its document's BOS, so a
    small local dataset is not cut to the first row of each document (mixed-en at T=256 keeps
    ~20% of its tokens otherwise). The buffer is refilled to buffer_size documents before every
    slot; on a finite stream of documents the packer ends when the stream and the buffer run out.
    """

    def __init__(self, documents, buffer_size=1000, keep_remainders=False):
        self.documents, self.buffer_size, self.keep_remainders = documents, buffer_size, keep_remainders
        self.lengths, self.docs = [], []  # kept sorted by length; equal lengths oldest-last, so popped first
        self.epoch = 1  # the epoch of the last document read
        self.exhausted = False

    def _push(self, doc):
        i = bisect.bisect_left(self.lengths, len(doc))
        self.lengths.insert(i, len(doc))
        self.docs.insert(i, doc)

    def fill(self, row):
        """Fill row (a 1-D int32 array) entirely; False, the row unusable, when the documents ran out first."""
        pos = 0
        while pos < len(row):
            while not self.exhausted and len(self.docs) < self.buffer_size:
                try:
                    doc, self.epoch = next(self.documents)
                except StopIteration:
                    self.exhausted = True
                    break
                self._push(doc)
            if not self.docs:
                return False
            remaining = len(row) - pos
            i = bisect.bisect_right(self.lengths, remaining) - 1
            if i < 0:
                i = 0  # nothing fits: crop the shortest
            self.lengths.pop(i)
            doc = self.docs.pop(i)
            n = min(len(doc), remaining)
            row[pos : pos + n] = doc[:n]
            pos += n
            if self.keep_remainders and n < len(doc):
                self._push(np.concatenate([doc[:1], doc[n:]]))  # doc[0] is its BOS
        return True


def pack_rows(documents, B, T, buffer_size=1000, keep_remainders=False):
    """Batches of packed rows (see _RowPacker) from an endless documents stream: yields ((B, T+1) int32, epoch)."""
    packer = _RowPacker(documents, buffer_size, keep_remainders)
    while True:
        rows = np.empty((B, T + 1), dtype=np.int32)
        for r in range(B):
            if not packer.fill(rows[r]):
                return  # a finite stream ran out: a partial batch would break the (B, T+1) contract
        yield rows, packer.epoch


def make_dataloader(tokenizer, B, T, split="train", buffer_size=1000):
    """
    Upstream's loader contract on numpy: yields (inputs, targets, epoch), each (B, T) int32.
    Training keeps cropped remainders (see _RowPacker); the val split's loader packs as upstream does, cycling
    the split. The fixed validation rows the metric scores are build_val_rows's, from one pass over it.
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


def _pack_all(documents, n_rows, seq_len):
    """Up to n_rows rows packed from a finite documents stream, cropped tails kept: no token is scored twice."""
    packer = _RowPacker(documents, keep_remainders=True)
    rows = np.empty((n_rows, seq_len + 1), dtype=np.int32)
    for r in range(n_rows):
        if not packer.fill(rows[r]):
            return rows[:r]
    return rows


def _split_documents(profile, directory):
    """The validation split's documents in two: the first ones, until they hold the val rows' tokens with room to
    spare for the packing, for the val rows; the rest, but for copies of those (the same text twice in a split),
    for the holdout rows. The val rows come first, so a small split gives the holdout what they leave."""
    row = profile.seq_len + 1
    need, need_holdout = val_row_count(profile) * row * 1.1, holdout_row_count(profile) * row * 1.1
    val, holdout, seen, held, held_out = [], [], set(), 0, 0
    for doc, _ in _documents("val", directory, passes=1):
        digest = hashlib.blake2b(doc[1:].tobytes(), digest_size=16).digest()  # doc[0] is its BOS
        if held < need:
            val.append(doc)
            seen.add(digest)
            held += len(doc)
        elif held_out >= need_holdout:
            break
        elif digest not in seen:
            holdout.append(doc)
            held_out += len(doc)
    return val, holdout


def build_eval_rows(profile, directory=None):
    """
    (validation rows, holdout rows): up to eval_tokens // seq_len rows, and holdout_tokens // seq_len, each packed
    from its own documents of one pass over the val split (_split_documents), cropped tails kept. A split too
    small gives fewer rows (prepare says so); one too small for a single validation row is a PrepareError.
    """
    val_docs, holdout_docs = _split_documents(profile, directory)
    rows = _pack_all(((d, 1) for d in val_docs), val_row_count(profile), profile.seq_len)
    if not len(rows):
        offsets = _load_tokens(Path(VAL_FILENAME).stem, directory)[1]
        docs = f"{len(offsets) - 1:,} document" + ("s" if len(offsets) != 2 else "")
        raise PrepareError(f"the validation split holds {int(offsets[-1]):,} tokens in {docs}, "
                           f"too few for one row of {profile.seq_len + 1:,} tokens (profile {profile.name}); "
                           "give it more text (for --source, a larger --val-fraction)")
    holdout = _pack_all(((d, 1) for d in holdout_docs), holdout_row_count(profile), profile.seq_len)
    return rows, holdout


def build_val_rows(profile, directory=None):
    """The fixed validation rows (build_eval_rows)."""
    return build_eval_rows(profile, directory)[0]


def val_row_count(profile):
    """The validation rows a profile asks for; a split too small for them gives fewer (build_val_rows)."""
    return max(1, profile.eval_tokens // profile.seq_len)


def holdout_row_count(profile):
    """The holdout rows a profile asks for (0: none)."""
    return profile.holdout_tokens // profile.seq_len


def get_val_rows():
    require_validation()
    return np.load(tokens_dir() / "val_rows.npy", mmap_mode="r")


def get_holdout_rows():
    """The holdout rows, or None for a cache prepared before there was a holdout (prepare --force adds one)."""
    require_validation()
    path = tokens_dir() / "holdout_rows.npy"
    return np.load(path, mmap_mode="r") if path.exists() else None


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
# Peak FLOP/s of NVIDIA GPUs, for MFU (every train.py reads this one table: a reported figure, not the agent's)
# ---------------------------------------------------------------------------

# Dense bf16 tensor-core rates, from NVIDIA's datasheets (the sparse figures are twice these). Exact device
# names, as torch.cuda.get_device_name() and mlx[cuda] report them, first; then families, matched as whole
# words after the exact names miss, the more specific first: an "H200 NVL" is not an H200 SXM.
GPU_PEAK_FLOPS_EXACT = {
    "NVIDIA H100 80GB HBM3": 989.5e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989.5e12, "NVIDIA H200 NVL": 835e12, "NVIDIA H800": 989.5e12, "NVIDIA H800 PCIe": 756e12,
    "NVIDIA GH200 480GB": 989.5e12, "NVIDIA B200": 2250e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12,
}
GPU_PEAK_FLOPS_FAMILIES = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H800 PCIe", 756e12), ("GH200", 989.5e12),
    ("H200", 989.5e12), ("H100", 989.5e12), ("H800", 989.5e12), ("GB200", 2500e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12),
    ("A6000", 155e12), ("RTX 5090", 209.5e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
)


def gpu_peak_flops(name):
    """Peak dense bf16 FLOP/s of the NVIDIA GPU of this name, or None (unknown: then no MFU is reported)."""
    if name in GPU_PEAK_FLOPS_EXACT:
        return GPU_PEAK_FLOPS_EXACT[name]
    words = f" {re.sub(r'[^A-Za-z0-9]+', ' ', name)} "
    return next((peak for key, peak in GPU_PEAK_FLOPS_FAMILIES if f" {key} " in words), None)


# Flash Attention 3 builds on the kernels hub: (repository, kernel API version, compute capabilities of its
# builds), best first. cuda/train.py loads the first that fits its GPU; the harness fetches that one into the
# local hub cache ahead (autoresearch/hub.py), since no trainer or evaluator has a network.
FA3_KERNELS = (
    ("varunneal/flash-attention-3", 1, ((9, 0),)),  # upstream's Hopper build
    ("kernels-community/flash-attn3", 1, ((8, 0), (8, 6), (8, 7), (8, 9), (9, 0))),  # sm80 and sm90a builds
)


# ---------------------------------------------------------------------------
# Checkpoint (train.py -> the harness's evaluator) and the trainer's view of the cache
# ---------------------------------------------------------------------------

VIEW_NAME = "trainer-view"
SCORED_FILES = ("token_bytes.npy", "tokenizer.pkl")  # copied into the view, never hard-linked


def checkpoint_dir():
    """Where train.py leaves its trained model: AUTORESEARCH_CHECKPOINT (the harness sets it), else <cache>/checkpoint."""
    return Path(os.environ.get("AUTORESEARCH_CHECKPOINT") or cache_dir() / "checkpoint")


CHECKPOINT_FILES = ("graph.json", "graph.mlxfn", "tensors.npz")  # a checkpoint is some of these and nothing else
GRAPH_FILE = {"torch": "graph.json", "mlx": "graph.mlxfn"}


def export_model(model, batch_size, seq_len, context=None):
    """
    Trace train.py's model into a graph the harness runs (backends/README.md, "Scoring"), and return save(), which
    writes the checkpoint: that graph and the trained values of its tensors. Call it once the model is built,
    before training: the trace costs seconds of startup, and save() at the end only writes arrays. The graph takes
    (batch_size, seq_len) token ids and returns (batch_size, seq_len, vocab) float32 logits; context is what the
    forward runs under (the PyTorch files' autocast_ctx()).
    """
    mlx = type(model).__module__.startswith("mlx") or hasattr(model, "trainable_parameters")
    try:
        return _export_mlx(model, batch_size, seq_len) if mlx else _export_torch(model, batch_size, seq_len, context)
    except Exception as e:  # the framework's message runs to pages: its first line, and what the harness needs
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]
        raise SystemExit(f"FAIL: the model cannot be exported for the harness's evaluator ({type(e).__name__}: "
                         f"{first}); its forward must trace to a static graph of tensor operators (backends/README.md, "
                         '"Scoring")') from e


def _export_torch(model, batch_size, seq_len, context):
    import contextlib

    import torch
    from torch._export.serde.serialize import serialize

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the real module here
    device = next(model.parameters()).device
    example = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
    with context or contextlib.nullcontext(), torch.no_grad():
        program = torch.export.export(model, (example,)).run_decompositions({})
    graph = serialize(program).exported_program  # the graph's JSON; its pickled parts are never written
    tensors = {**program.state_dict, **program.constants}  # the model's own tensors: save() writes their values

    def save(path=None):
        path = _checkpoint_folder(path)
        _write(path / "graph.json", lambda f: f.write(graph))
        arrays = {}
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            arrays[name] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
        _write(path / "tensors.npz", lambda f: np.savez(f, **arrays))
        return path

    return save


def _export_mlx(model, batch_size, seq_len):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path

    names = [name for name, _ in tree_flatten(model.parameters())]

    def put(values):
        given = dict(zip(names, values))
        model.update(tree_map_with_path(lambda name, p: given[name], model.parameters()))

    def forward(idx, *values):  # the weights are the graph's inputs, so the trace holds none of their values
        put(values)
        return model(idx).astype(mx.float32)

    values = [p for _, p in tree_flatten(model.parameters())]
    meta = json.dumps({"tensors": names, "dtypes": [str(v.dtype).rsplit(".", 1)[-1] for v in values],
                       "input": [batch_size, seq_len]})
    folder = Path(tempfile.mkdtemp(prefix="graph-"))
    try:
        mx.export_function(str(folder / "graph.mlxfn"), forward, mx.zeros((batch_size, seq_len), mx.int32), *values,
                           metadata=meta)
        graph = (folder / "graph.mlxfn").read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    put(values)

    def save(path=None):
        path = _checkpoint_folder(path)
        _write(path / "graph.mlxfn", lambda f: f.write(graph))
        arrays = {}
        for name, p in tree_flatten(model.parameters()):
            arrays[name] = np.array(p.view(mx.int16) if p.dtype == mx.bfloat16 else p)
        _write(path / "tensors.npz", lambda f: np.savez(f, **arrays))
        return path

    return save


def _checkpoint_folder(path):
    path = Path(path or checkpoint_dir())
    path.mkdir(parents=True, exist_ok=True)
    (path / "tensors.npz").unlink(missing_ok=True)  # written last: a checkpoint without it is incomplete
    return path


def _write(path, write):
    """A file written under a temporary name and renamed: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _link_or_copy(src, dest):
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dest)


def trainer_view():
    """
    The cache as training sees it: every file but the validation shard, its tokens and the rows made of them
    (val_rows.npy, holdout_rows.npy), hard-linked
    (copied where links fail; the tokenizer and its byte counts always copied) into <cache>/trainer-view, whose
    profile.json carries a `trainer_view` marker (the
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
    hidden = {VAL_FILENAME, f"{val_stem}.npy", f"{val_stem}.offsets.npy", "val_rows.npy", "holdout_rows.npy"}
    staging, old = root / f".view-staging-{os.getpid()}", root / f".view-old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for sub in ("data", "tokenizer", "tokens"):
            (staging / sub).mkdir(parents=True)
            for src in sorted((root / sub).glob("*")):
                if src.is_file() and src.name not in hidden and not src.name.endswith((".tmp", ".part")):
                    # what the harness scores with is copied: a write through the view never reaches it
                    (shutil.copy2 if src.name in SCORED_FILES else _link_or_copy)(src, staging / sub / src.name)
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
    holdout = root / "tokens" / "holdout_rows.npy"
    if not problems and meta.get("holdout_rows_sha256") not in (None, _sha256(holdout)):
        problems.append("tokens/holdout_rows.npy does not hold the rows prepare wrote (its hash differs)")
    token_bytes = root / "tokenizer" / "token_bytes.npy"
    if not problems and meta.get("token_bytes_sha256") not in (None, _sha256(token_bytes)):
        problems.append("tokenizer/token_bytes.npy does not hold the byte counts prepare wrote (its hash differs)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PrepareError(f"the cache {root} is damaged: {problems[0]}{more}; repair it: {repair_command(meta)}")
    rows = "val_rows.npy, holdout_rows.npy" if meta.get("holdout_rows_sha256") else "val_rows.npy"
    return f"cache ok: {len(recorded)} files at their recorded sizes, {rows} and token_bytes.npy hashes match"


# ---------------------------------------------------------------------------
# Prepare: everything is built in a staging folder and moved into place at the end
# ---------------------------------------------------------------------------


def _dataset_shards(dataset, num_shards, workers, base_url, progress, other_data):
    """(training shards, validation shard) of a dataset: those in data/ that pass check_shard (unless data/ holds
    other data), the rest downloaded into <cache>/.downloads/<dataset>, which prepare moves into data/ only when it
    succeeds: a failed prepare leaves data/ as it was, and its finished downloads for the next one."""
    reuse = None if other_data else data_dir()
    found = download_dataset(dataset, num_shards, workers, base_url, progress=progress,
                             out=cache_dir() / DOWNLOADS / dataset, reuse=reuse)
    extra = sorted(reuse.glob("shard_*.parquet")) if reuse is not None and reuse.is_dir() else []
    for path in extra:  # shards an earlier, larger prepare downloaded are trained on too, unless damaged
        if path.name not in found and _usable(path.name, [reuse]):
            found[path.name] = path
    val = found.pop(VAL_FILENAME)
    return [found[n] for n in sorted(found)], val


def _same_profile(recorded, prof):
    """Whether a cache's recorded profile is prof: one recorded before the holdout existed matches too."""
    fields_then = {k: v for k, v in asdict(prof).items() if k != "holdout_tokens"}
    return recorded == asdict(prof) or recorded == fields_then


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
        if not force and _same_profile(old["profile"], prof) and not other_data:
            return old  # a cache from before the holdout stays as it is: --force adds one
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
        else:  # every shard passed check_shard: a download's own, or the one already in data/
            train_shards, val_shard = _dataset_shards(dataset, num_shards, workers, base_url, progress, other_data)
        if progress:
            progress("tokenizer", 0, 1)
        enc = train_tokenizer(train_shards, prof.vocab_size, staging / "tokenizer")
        if enc.n_vocab < prof.vocab_size:  # the evaluator refuses such a cache: say so now, not after training
            raise PrepareError(f"too little training text for profile {prof.name}: its tokenizer learned "
                               f"{enc.n_vocab:,} of the {prof.vocab_size:,} tokens the profile needs; add text")
        tokenizer = Tokenizer(enc)
        all_shards = train_shards + [val_shard]
        if progress:
            progress("tokenize", 0, len(all_shards))
        counts = {}
        for path in all_shards:
            counts[path.name] = tokenize_shard(tokenizer, path, staging / "tokens")
            if progress:
                progress("tokenize", 1, None)
        val_rows, holdout_rows = build_eval_rows(prof, staging / "tokens")
        np.save(staging / "tokens" / "val_rows.npy", val_rows)
        np.save(staging / "tokens" / "holdout_rows.npy", holdout_rows)
        val_tokens = counts[VAL_FILENAME]
        wanted = val_row_count(prof)
        val_note = None
        if len(val_rows) < wanted:  # fewer rows, never repeated ones: in profile.json, and the CLI says it
            val_note = (f"validation: {len(val_rows):,} rows of {prof.seq_len + 1:,} tokens, fewer than the profile's "
                        f"{wanted:,} rows: the split holds only {val_tokens:,} tokens, and no document is scored twice")
        holdout_wanted = holdout_row_count(prof)
        holdout_note = None
        if len(holdout_rows) < holdout_wanted:
            holdout_note = (f"holdout: {len(holdout_rows):,} rows, fewer than the profile's {holdout_wanted:,}: the "
                            "validation rows take the split's documents first" + (
                                " (for --source, a larger --val-fraction gives the holdout more)" if sources else ""))
        distinct = len(np.unique(val_rows, axis=0))
        meta = {
            "profile": asdict(prof),
            **origin,
            **stats,
            "train_tokens": sum(v for k, v in counts.items() if k != VAL_FILENAME),
            "val_tokens": val_tokens,
            "val_rows": len(val_rows),
            "val_distinct_rows": distinct,
            "val_repeats": distinct < len(val_rows),  # from the rows themselves: only duplicate documents repeat
            "val_note": val_note,
            "holdout_rows": len(holdout_rows),
            "holdout_note": holdout_note,
            "vocab_size": enc.n_vocab,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": _file_sizes(staging),  # check_cache compares these before every run
            "val_rows_sha256": _sha256(staging / "tokens" / "val_rows.npy"),
            "holdout_rows_sha256": _sha256(staging / "tokens" / "holdout_rows.npy"),
            "token_bytes_sha256": _sha256(staging / "tokenizer" / "token_bytes.npy"),
        }
        # commit: replace what a previous prepare left, then write profile.json last
        _meta_path().unlink(missing_ok=True)
        for sub in ("tokenizer", "tokens") + (("data",) if sources or other_data else ()):
            shutil.rmtree(root / sub, ignore_errors=True)
            os.replace(staging / sub, root / sub)
        for path in train_shards + [val_shard]:  # downloaded shards join data/ only now that all went well
            if dataset and path.parent == root / DOWNLOADS / dataset:
                (root / "data").mkdir(exist_ok=True)
                os.replace(path, root / "data" / path.name)
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
