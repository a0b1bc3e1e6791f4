"""The download code against a real HTTP server on 127.0.0.1 serving real shards."""

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
