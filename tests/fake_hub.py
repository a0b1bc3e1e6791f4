"""A Hugging Face hub on 127.0.0.1 serving kernel repositories, as far as `kernels` and huggingface_hub ask it
(refs, trees, revision info, file downloads): the harness's fetch of FA3 runs against it for real."""

import hashlib
import http.server
import json
import threading
import urllib.parse


class FakeHub:
    """repos: {repository: (branch, commit, {path in the repository: bytes})}; seen: every request, in order."""

    def __init__(self, repos):
        self.repos, self.seen = repos, []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path, query):
        """(status, body, headers) for one request."""
        for repo, (branch, commit, files) in self.repos.items():
            api, resolve = f"/api/kernels/{repo}/", f"/kernels/{repo}/resolve/"
            if path == api + "refs":
                return _json({"branches": [{"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": commit}],
                              "tags": [], "converts": []})
            for prefix in (api + "tree/", api + "revision/", resolve):
                if path.startswith(prefix):
                    rev, _, rest = path[len(prefix):].partition("/")
                    if rev not in (branch, commit):
                        return _missing()
                    if prefix == api + "revision/":
                        return _json({"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]})
                    if prefix == resolve:
                        if rest not in files:
                            return _missing()
                        data = files[rest]
                        return 200, data, {"X-Repo-Commit": commit, "ETag": f'"{_oid(data)}"',
                                           "Content-Type": "application/octet-stream"}
                    return _json(_tree(files, rest.strip("/"), query.get("recursive") in (["true"], ["True"])))
        return _missing()

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.seen.append(f"{self.command} {self.path}")
                url = urllib.parse.urlsplit(self.path)
                status, body, headers = hub.answer(urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query))
                self.send_response(status)
                for name, value in dict(headers, **{"Content-Length": str(len(body))}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        return Handler


def _oid(data):
    return hashlib.sha1(data).hexdigest()


def _json(data):
    return 200, json.dumps(data).encode(), {"Content-Type": "application/json"}


def _missing():
    return 404, b'{"error": "not found"}', {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}


def _tree(files, folder, recursive):
    """The entries under folder: its files and folders, or everything below it."""
    prefix = f"{folder}/" if folder else ""
    entries, folders = [], set()
    for path, data in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        if len(parts) == 1 or recursive:
            entries.append({"type": "file", "path": path, "size": len(data), "oid": _oid(data)})
        below = parts[:-1] if recursive else parts[:1] if len(parts) > 1 else []
        folders.update(prefix + "/".join(below[: i + 1]) for i in range(len(below)))
    return entries + [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
