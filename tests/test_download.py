"""The download code against a real HTTP server on 127.0.0.1 serving real shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import MIXED_EN, ROOT


class ShardServer:
    """Serves files from a folder with Range support; can drop a connection half-way through a file."""

    def __init__(self, folder):
        self.folder = folder
        self.requests = []  # (path, Range header or None)
        self.drop_once = set()  # file names whose first full response is cut off
        self.fail_status = {}  # file name -> HTTP status to answer with
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name in server.fail_status:
                    self.send_error(server.fail_status[name])
                    return
                path = server.folder / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.drop_once and not rng:
                    server.drop_once.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection dies mid-file
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path):
    """A dataset mirror: shards 0 and 1 for training, 6542 for validation, copied from ../shared."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    for i, src in ((0, "shard_00000"), (1, "shard_00001"), (6542, "shard_00003")):
        shutil.copy(MIXED_EN / f"{src}.parquet", folder / prepare.shard_name(i))
    with ShardServer(folder) as server:
        yield server


def test_download_resumes_after_dropped_connection(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    mirror.drop_once.add("shard_00001.parquet")
    prepare.download_dataset("climbmix", num_shards=2, workers=3, base_url=mirror.url)
    data = tmp_path / "cache" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet",
                                                       "shard_06542.parquet"]
    for p in data.iterdir():
        assert p.read_bytes() == (mirror.folder / p.name).read_bytes()
    resumed = [r for name, r in mirror.requests if name == "shard_00001.parquet"]
    size = (mirror.folder / "shard_00001.parquet").stat().st_size
    assert resumed == [None, f"bytes={size // 2}-"]  # the second request continued where the first stopped
    # downloading again asks for nothing
    n = len(mirror.requests)
    prepare.download_dataset("climbmix", num_shards=2, base_url=mirror.url)
    assert len(mirror.requests) == n


def test_missing_shard_is_one_clear_error(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(prepare.PrepareError) as err:
        prepare.download_dataset("climbmix", num_shards=3, base_url=mirror.url)  # shard 2 is not served
    message = str(err.value)
    assert "shard_00002.parquet" in message and "HTTP 404" in message and "--source" in message
    assert "\n" not in message
    assert not (tmp_path / "cache" / "data" / "shard_00002.parquet").exists()


def test_server_errors_are_retried_then_reported(mirror, tmp_path):
    mirror.fail_status["shard_00000.parquet"] = 503
    dest = tmp_path / "shard_00000.parquet"
    with pytest.raises(prepare.PrepareError, match="after 3 attempts.*503"):
        prepare.download_file(f"{mirror.url}/shard_00000.parquet", dest, retries=3, backoff=0.01)
    assert len(mirror.requests) == 3 and not dest.exists()


def test_corrupt_download_never_lands(mirror, tmp_path):
    (mirror.folder / "shard_00000.parquet").write_bytes(os.urandom(5000))
    dest = tmp_path / "shard_00000.parquet"
    with pytest.raises(prepare.PrepareError, match="not valid parquet|not a readable parquet"):
        prepare.download_file(f"{mirror.url}/shard_00000.parquet", dest, retries=2, backoff=0.01)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_cli_prepare_from_mirror_builds_cache(mirror, tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path / "cache"))
    mirror.drop_once.add("shard_06542.parquet")
    proc = subprocess.run([sys.executable, "-m", "autoresearch", "prepare", "--dataset", "climbmix",
                           "--num-shards", "2", "--base-url", mirror.url, "--profile", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ready: profile cpu" in proc.stderr
    env_meta = (tmp_path / "cache" / "profile.json").read_text()
    assert '"dataset": "climbmix"' in env_meta
    assert (tmp_path / "cache" / "tokens" / "shard_00001.npy").exists()


def test_unreachable_host_names_the_offline_alternative(tmp_path):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path / "cache"))
    with ShardServer(tmp_path) as dead:
        url = dead.url
    proc = subprocess.run([sys.executable, "-m", "autoresearch", "prepare", "--dataset", "tinystories",
                           "--num-shards", "1", "--base-url", url, "--profile", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--source" in errors[0] and "failed after" in errors[0]
    assert not (tmp_path / "cache" / "profile.json").exists()
    assert not list((tmp_path / "cache" / "data").glob("*.parquet"))


def test_switching_from_local_sources_to_a_download_never_mixes_shards(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    prepare.prepare(profile="cpu", sources=[MIXED_EN / "shard_00002.parquet"])  # imported shard_00000 + val
    with pytest.raises(prepare.PrepareError, match="--force"):
        prepare.prepare(profile="cpu", dataset="climbmix", num_shards=2, base_url=mirror.url)
    meta = prepare.prepare(profile="cpu", dataset="climbmix", num_shards=2, base_url=mirror.url, force=True)
    assert meta["dataset"] == "climbmix" and "sources" not in meta
    data = tmp_path / "cache" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet",
                                                       "shard_06542.parquet"]
    for p in data.iterdir():  # the imported shard of the same name was replaced, not reused
        assert p.read_bytes() == (mirror.folder / p.name).read_bytes()


class HostileServer(ShardServer):
    """A mirror that misbehaves in one chosen way (mode) for the files it serves."""

    def __init__(self, folder, mode):
        super().__init__(folder)
        self.mode = mode
        handler = self.httpd.RequestHandlerClass
        plain_get, server = handler.do_GET, self

        def do_GET(h):
            name = h.path.rsplit("/", 1)[-1]
            data = (server.folder / name).read_bytes() if (server.folder / name).is_file() else b""
            rng = h.headers.get("Range")
            server.requests.append((name, rng))
            if server.mode == "trickle":  # the whole length announced, then a byte a second
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                for byte in data:
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
                    time.sleep(1)
            elif server.mode == "whole206" and rng:  # claims the rest of the file, sends all of it
                start = int(rng.split("=")[1].split("-")[0])
                h.send_response(206)
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)
            elif server.mode == "badlength":
                h.send_response(200)
                h.send_header("Content-Length", "abc")
                h.end_headers()
                h.wfile.write(data)
                h.close_connection = True
            elif server.mode == "loop":
                h.send_response(302)
                h.send_header("Location", h.path)
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif server.mode == "escapes":
                h.send_response(404, "\x1b]0;pwned\x07\x1b[2K\rall good, shards verified")
                h.send_header("Content-Length", "0")
                h.end_headers()
            else:
                server.requests.pop()
                plain_get(h)

        handler.do_GET = do_GET


def hostile(tmp_path, mode, train=None, val=None):
    """A mirror folder (real mixed-en shards unless train or val tables are given) served in `mode`."""
    folder = tmp_path / f"mirror-{mode}-{len(list(tmp_path.glob('mirror-*')))}"
    folder.mkdir()
    for i, src in enumerate(train or [MIXED_EN / "shard_00000.parquet", MIXED_EN / "shard_00001.parquet"]):
        (pq.write_table(src, folder / prepare.shard_name(i)) if isinstance(src, pa.Table)
         else shutil.copy(src, folder / prepare.shard_name(i)))
    val = MIXED_EN / "shard_00003.parquet" if val is None else val
    (pq.write_table(val, folder / prepare.VAL_FILENAME) if isinstance(val, pa.Table)
     else shutil.copy(val, folder / prepare.VAL_FILENAME))
    return HostileServer(folder, mode)


def prepare_cli(cache, url, *extra, shards=2):
    return subprocess.run([sys.executable, "-m", "autoresearch", "prepare", "--dataset", "climbmix", "--num-shards",
                           str(shards), "--base-url", url, "--profile", "cpu", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, AUTORESEARCH_CACHE=str(cache)))


def one_error(proc):
    """The one `error:` line of a failed command; no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    return errors[0]


def snapshot(cache):
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and ".downloads" not in p.parts}


def test_a_trickling_mirror_is_cut_off_by_the_rate_floor(tmp_path):
    with hostile(tmp_path, "trickle") as server:
        dest = tmp_path / "shard_00000.parquet"
        with pytest.raises(prepare.PrepareError) as err:
            prepare.download_file(f"{server.url}/shard_00000.parquet", dest, retries=2, backoff=0.01, stall=2)
    assert "after 2 attempts" in str(err.value) and "slower than 4,096 bytes/s" in str(err.value)
    assert not dest.exists()
    assert server.requests[1][1] is not None  # the second attempt resumed the trickle's bytes


def test_a_trickling_mirror_stops_at_the_deadline(tmp_path):
    with hostile(tmp_path, "trickle") as server:
        with pytest.raises(prepare.PrepareError, match=r"longer than its deadline \(3s\)"):
            prepare.download_file(f"{server.url}/shard_00000.parquet", tmp_path / "s.parquet", deadline=3,
                                  min_rate=0, stall=1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_a_stuck_download_at_once(tmp_path, sig, code):
    with hostile(tmp_path, "trickle") as server:
        proc = subprocess.Popen([sys.executable, "-m", "autoresearch", "prepare", "--dataset", "climbmix",
                                 "--num-shards", "2", "--base-url", server.url, "--profile", "cpu"], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path / "cache")))
        while len(server.requests) < 3:  # every download started and trickling
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)  # not the hours a trickle of three shards would take
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("interrupted")
    assert not (tmp_path / "cache" / "profile.json").exists()


def test_a_206_carrying_the_whole_file_restarts_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    with hostile(tmp_path, "whole206") as server:
        data = tmp_path / "cache" / "data"
        data.mkdir(parents=True)
        whole = (server.folder / "shard_00001.parquet").read_bytes()
        part = data / "shard_00001.parquet.part"  # an earlier attempt's first half, recorded as from this mirror
        part.write_bytes(whole[: len(whole) // 2])
        (data / "shard_00001.parquet.part.source").write_text(json.dumps({"url": f"{server.url}/shard_00001.parquet"}))
        prepare.download_dataset("climbmix", num_shards=2, base_url=server.url)
    assert (data / "shard_00001.parquet").read_bytes() == whole  # not half + whole
    assert [r for n, r in server.requests if n == "shard_00001.parquet"] == [f"bytes={len(whole) // 2}-", None]


def test_a_part_from_another_mirror_is_not_resumed(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "cache" / "data"
    data.mkdir(parents=True)
    other = (MIXED_EN / "shard_00002.parquet").read_bytes()
    (data / "shard_00000.parquet.part").write_bytes(other[: len(other) // 2])  # an older version's, no source
    (data / "shard_00001.parquet.part").write_bytes(other[: len(other) // 2])
    (data / "shard_00001.parquet.part.source").write_text(json.dumps({"url": "http://elsewhere/shard_00001.parquet"}))
    prepare.download_dataset("climbmix", num_shards=2, base_url=mirror.url)
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        assert (data / name).read_bytes() == (mirror.folder / name).read_bytes()
    assert all(rng is None for _, rng in mirror.requests)
    assert not list(data.glob("*.part*"))


def test_a_changed_file_behind_the_same_url_is_not_spliced(mirror, tmp_path, monkeypatch):
    """The recorded ETag goes out as If-Range; a server whose file changed answers 200 with the new whole file."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "cache" / "data"
    data.mkdir(parents=True)
    url = f"{mirror.url}/shard_00000.parquet"
    old = (MIXED_EN / "shard_00002.parquet").read_bytes()
    (data / "shard_00000.parquet.part").write_bytes(old[: len(old) // 2])
    (data / "shard_00000.parquet.part.source").write_text(json.dumps({"url": url, "etag": '"old"'}))
    prepare.download_file(url, data / "shard_00000.parquet")
    assert (data / "shard_00000.parquet").read_bytes() == (mirror.folder / "shard_00000.parquet").read_bytes()


@pytest.mark.parametrize("train, val, message", [
    (None, pa.table({"text": pa.array([], pa.string())}), "shard_06542.parquet: the shard holds no documents (0 rows)"),
    ([pa.table({"text": pa.array([], pa.string())})], None, "shard_00000.parquet: the shard holds no documents"),
    ([pa.table({"text": [""] * 50})], None, "shard_00000.parquet: the shard holds no text (50 documents, every one"),
    (None, pa.table({"text": [""] * 20}), "shard_06542.parquet: the shard holds no text (20 documents"),
    ([pa.table({"text": list(range(100))})], None, "shard_00000.parquet: the `text` column holds int64, not strings"),
])
def test_an_unusable_shard_is_one_line_and_never_lands(tmp_path, train, val, message):
    with hostile(tmp_path, "plain", train, val) as server:
        proc = prepare_cli(tmp_path / "cache", server.url, shards=1)
    assert message in one_error(proc)
    assert not (tmp_path / "cache" / "profile.json").exists()
    # The unusable shard lands neither in data/ nor staged. A good shard fetched beside it may stay staged
    # for the next prepare, if it finished before the bad one stopped the others (a race, by design).
    bad = message.split(":")[0]
    assert not list((tmp_path / "cache").rglob(bad))
    assert not list((tmp_path / "cache").rglob("data/*.parquet"))
    assert len(server.requests) <= 2  # a complete but unusable shard is not asked for again


def test_a_failed_force_leaves_the_cache_as_it_was(tmp_path):
    cache = tmp_path / "cache"
    with hostile(tmp_path, "plain") as good:
        assert prepare_cli(cache, good.url, shards=1).returncode == 0
    before = snapshot(cache)
    # the rebuild's new shard is unusable: nothing of the working cache may change
    with hostile(tmp_path, "plain", train=[MIXED_EN / "shard_00000.parquet", pa.table({"text": [1, 2]})]) as bad:
        assert "shard_00001.parquet: the `text` column holds int64" in one_error(prepare_cli(cache, bad.url, "--force"))
    assert snapshot(cache) == before
    # a damaged shard already in data/ (as an earlier version could leave one) is downloaded again and replaced
    shard = cache / "data" / "shard_00000.parquet"
    shard.write_bytes(shard.read_bytes()[:1000] + shard.read_bytes())
    with hostile(tmp_path, "whole206") as good:
        proc = prepare_cli(cache, good.url, "--force")
        assert proc.returncode == 0, proc.stderr
        assert shard.read_bytes() == (good.folder / shard.name).read_bytes()
    assert not list((cache / ".downloads").rglob("*.parquet"))


@pytest.mark.parametrize("mode, message", [
    ("loop", "HTTP 302 The HTTP server returned a redirect error that would lead to an infinite loop."),
    ("escapes", "all good, shards verified; offline?"),
])
def test_bad_replies_are_one_plain_line(tmp_path, mode, message):
    with hostile(tmp_path, mode) as server:
        line = one_error(prepare_cli(tmp_path / "cache", server.url, shards=1))
    assert message in line and "\x1b" not in line and "\x07" not in line


def test_a_content_length_that_is_no_number_is_read_to_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    with hostile(tmp_path, "badlength") as server:
        found = prepare.download_dataset("climbmix", num_shards=1, base_url=server.url)
    for name, path in found.items():
        assert path.read_bytes() == (server.folder / name).read_bytes()
