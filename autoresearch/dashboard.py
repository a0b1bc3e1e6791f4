"""`autoresearch dashboard`: one local, read-only page that follows a run as it goes.

Per series (ledger.Series: hardware, eval profile, budget, run branch) it shows the progress chart, the ledger and
each kept commit's diff of train.py; beside them the experiment in flight (from .autoresearch/run.log) and the
findings matrix of `bench report`. Everything it shows comes from report.py; this module only serves it.

The standard library's ThreadingHTTPServer serves it: four read-only GET endpoints need no web framework.

    GET /                the page (autoresearch/dashboard_page.html)
    GET /plotly.min.js   plotly's JavaScript, from the plotly package (no CDN: works offline)
    GET /api/state       everything the page shows, as JSON; the page polls it every 2 s with the version it holds
                         (since=), and gets `unchanged`, or only what changed where rows were appended
    GET /api/diff?commit=SHA   a kept commit's diff of its backend's train.py

Safe by default: it listens on 127.0.0.1, answers every other method with 405, changes nothing, and the page
builds its DOM with textContent only (a Content-Security-Policy refuses any script but its own).
"""

import errno
import hashlib
import ipaddress
import json
import math
import re
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import git

from . import report, train_file
from .branch import BRANCH_PREFIX, STATE_DIR
from .gate import spread
from .ledger import LEDGER_NAME, SCORED, LedgerError, read_ledger
from .ledger import labels as series_labels  # the page has its own `labels`
from .plain import plain
from .progress import HEADER
from .runner import PID_FILE
from .sources import ReportError, branch_rows, load_series
from .summary import parse_step
from .turns import turns_dir

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SOCKET_TIMEOUT = 10  # seconds a connection may wait for a request, or for the client to take the reply
PAGE = Path(__file__).with_name("dashboard_page.html")
LOG_TAIL = 64 * 1024  # bytes of run.log read for the last progress line
COMMIT = re.compile(r"^[0-9a-f]{4,40}$")
HISTORY = 64  # versions a page may hold and still get only what changed since; an older one reloads whole


class DashboardError(Exception):
    """The dashboard cannot start: the message (one line) says why."""


# ---------------------------------------------------------------------------------------------
# What the page shows


def _row(r, index):
    scored = r.status in SCORED and math.isfinite(r.val_bpb)
    return {"index": index, "commit": r.commit, "status": r.status, "val_bpb": r.val_bpb if scored else None,
            "holdout_bpb": r.holdout_bpb if scored and r.holdout_bpb > 0 else None,
            "description": r.description, "seed": r.seed, "seeds": len(r.values()), "timestamp": r.timestamp,
            "training_seconds": r.training_seconds, "memory_gb": r.memory_gb, "num_steps": r.num_steps,
            "tokens_per_sec": report.throughput(r), "gate": r.gate, "worker": r.worker}


def series_data(s, label, root):
    """One series for the page: report.summarize's figures, every row, the running best and the noise spread."""
    summary = report.summarize(s, root=root)
    summary_kept = summary.pop("kept")  # sent once, below with the baseline: not twice per version
    rows, index = [], 0  # the chart's x: the experiment's number, verify rows (re-runs) have none
    for r in s.rows:
        rows.append(_row(r, None if r.status == "verify" else index))
        index += r.status != "verify"
    running, best = [], None
    for r in s.experiments:
        if r.status == "keep" and math.isfinite(r.val_bpb):
            best = r.val_bpb if best is None else min(best, r.val_bpb)
        running.append(best)
    # the spread of the baseline row's own seeds (it travels with the row to other machines), else the noise
    # floor this checkout stored for the hardware, profile and budget
    sigma = spread(s.baseline.values()) if s.baseline is not None else None
    if sigma is None:
        sigma = (summary["noise"] or {}).get("spread")
    base = s.baseline
    kept = ([{"commit": base.commit, "description": base.description, "val_bpb": base.val_bpb, "delta": None,
              "holdout_bpb": summary["baseline"]["holdout_bpb"]}]
            if base else []) + summary_kept
    return {"key": "|".join(map(str, s.key)), "label": label,
            "summary": summary, "rows": rows, "running_best": running, "noise_spread": sigma, "kept": kept}


def in_flight(root):
    """The experiment training now, from its pid file and the last progress line of run.log; None when none."""
    state = Path(root) / STATE_DIR
    try:
        pid = (state / PID_FILE).read_text().strip().partition(" ")[0]  # "pid command"
        with open(state / "run.log", "rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - LOG_TAIL))
            tail = log.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:  # no trainer running (the pid file goes when it exits), or no log yet
        return None
    header, progress = None, None
    for line in reversed(tail):  # the current seed's lines only: run.log holds every seed of the experiment
        if HEADER.match(line):  # the current seed's section of run.log starts here
            header = line.strip("= ")
            break
        progress = progress or parse_step(line)
    return {"pid": int(pid) if pid.isdigit() else None, "run": header, "progress": progress}


def _digest(value):
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _extends(new, old):
    """Whether new is old with rows appended (what `loop` does): each series of old is in new, its rows and running
    best beginning with old's. A ledger rewritten, shortened or re-sorted (ledger rebuild, notes from elsewhere with
    earlier times) is not."""
    now = {s["key"]: s for s in new["series"]}
    for s in old["series"]:
        t = now.get(s["key"])
        if t is None or t["rows"][: len(s["rows"])] != s["rows"] or \
                t["running_best"][: len(s["running_best"])] != s["running_best"]:
            return False
    return True


def _head(data):
    """Everything of data but the rows, the running bests and the version: what a poll sends whole."""
    out = {k: v for k, v in data.items() if k not in ("series", "version")}
    out["series"] = [{k: v for k, v in s.items() if k not in ("rows", "running_best")} for s in data["series"]]
    return out


FIGURES = ("label", "summary", "noise_spread")  # a series' fields besides its rows, running best and kept commits


def _shape(data):
    """What a page holding data has: per series its row and running-best counts, its kept commits' digest and its
    figures' digest; the findings matrix's digest. Enough to send it only what it lacks of a later version."""
    return {"series": {s["key"]: (len(s["rows"]), len(s["running_best"]), _digest(s["kept"]),
                                  _digest([s[k] for k in FIGURES])) for s in data["series"]},
            "matrix": _digest(data["matrix"])}


def delta(data, had):
    """What a page holding a version of shape `had` lacks of data, which extends it: each series' new rows and
    running best (from the counts the page has); its figures, its kept commits and the findings matrix only where
    they changed. A series new since then comes whole."""
    series = []
    for s in data["series"]:
        held = had["series"].get(s["key"])
        if held is None:
            series.append(s)
            continue
        rows, best, kept, figures = held
        part = {"key": s["key"], "rows_from": rows, "rows": s["rows"][rows:], "running_best_from": best,
                "running_best": s["running_best"][best:]}
        if _digest([s[k] for k in FIGURES]) != figures:
            part.update({k: s[k] for k in FIGURES})
        if _digest(s["kept"]) != kept:
            part["kept"] = s["kept"]
        series.append(part)
    out = {k: v for k, v in data.items() if k not in ("series", "matrix", "kept")}
    out.update(delta=True, series=series)
    if _digest(data["matrix"]) != had["matrix"]:
        out["matrix"] = data["matrix"]
    return out


def _json(value):
    return json.dumps(report.finite(value), allow_nan=False).encode()


class Dashboard:
    """The sources, read again whenever one changes; the repository being watched."""

    def __init__(self, sources, repo, root):
        self.sources = sources  # None: this repository's results.tsv and run branches
        self.repo = repo
        self.root = Path(root)
        self.lock = threading.Lock()  # one request at a time reads git: GitPython's object database is not thread-safe
        self.seen = None  # (fingerprint, data) of the last load
        self.session = secrets.token_hex(4)  # a page's version from an earlier server never matches: it reloads
        self.generation = 0
        self.history = {}  # version -> _shape, of the versions the current data extends (and its own), oldest first
        self.bodies = {}  # (since or None, version) -> the encoded data part of an answer: encoded once, not per poll

    def default_sources(self):
        """This checkout's results.tsv and its run branches that have rows in the git notes."""
        ledger = self.root / LEDGER_NAME
        found = [str(ledger)] if ledger.is_file() and read_ledger(ledger) else []
        for head in self.repo.heads if self.repo else []:
            if not head.name.startswith(BRANCH_PREFIX):
                continue
            try:
                branch_rows(self.repo, head.name)
            except ReportError:  # a run branch without rows yet
                continue
            found.append(head.name)
        return found

    def fingerprint(self):
        """What changes whenever a source may have: the ledger files' size and time, the branches' and notes' refs."""
        files = [self.root / LEDGER_NAME] if self.sources is None else [Path(s) for s in self.sources]
        files.append(turns_dir(self.root))  # a turn's record written or finished: its folder's time moves
        stats = []
        for path in files:
            try:
                st = path.stat()
                stats.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                stats.append((str(path), None, None))
        refs = self.repo.git.for_each_ref("--format=%(objectname) %(refname)", "refs/heads", "refs/remotes",
                                          "refs/notes") if self.repo else ""
        return stats, refs

    def load(self):
        sources = self.sources if self.sources is not None else self.default_sources()
        rows, series = load_series(sources, self.repo)
        labels = series_labels(series)
        shown = [series_data(s, label, self.root) for s, label in zip(series, labels)]
        return {"sources": sources, "rows": len(rows), "labels": labels, "series": shown,
                "matrix": report.findings_matrix(series), "notes": report.comparability_notes(series),
                "kept": {k["commit"]: d["summary"]["backend"] for d in shown for k in d["kept"]}}

    def versioned(self, data):
        """data with its version. The last one's where nothing shown changed (a fingerprint moves for more: a
        branch's ref, a ledger rewritten the same), so pages are not redrawn for nothing; else a new one,
        remembered with those it extends (rows appended), or alone where it is no append."""
        old = self.seen[1] if self.seen else None
        extends = old is not None and _extends(data, old)
        if extends and _head(data) == _head(old) and _shape(data) == _shape(old):
            data["version"] = old["version"]
            return data
        self.generation += 1
        data["version"] = f"{self.session}-{self.generation}"
        if not extends:
            self.history.clear()
        self.history[data["version"]] = _shape(data)
        while len(self.history) > HISTORY:
            del self.history[next(iter(self.history))]
        self.bodies.clear()
        return data

    def data(self):
        """The page's data, loaded again only when a source changed. ReportError or LedgerError: a bad source."""
        with self.lock:
            mark = self.fingerprint()
            if self.seen is None or self.seen[0] != mark:
                self.seen = (mark, self.versioned(self.load()))
            return self.seen[1]

    def part(self, since):
        """The encoded data part of GET /api/state for a page holding version `since`: nothing new (unchanged),
        what it lacks (delta) where the data extends its version, else all of it (a page that has nothing yet, or
        a ledger rewritten: it reloads whole)."""
        data = self.data()
        version = data["version"]
        if since == version:
            return _json({"version": version, "unchanged": True})
        with self.lock:
            base = since if since in self.history else None
            body = self.bodies.get((base, version))
            if body is None:
                shown = delta(data, self.history[base]) if base else {k: v for k, v in data.items() if k != "kept"}
                body = self.bodies[(base, version)] = _json(shown)  # kept: the diff endpoint's lookup
            return body

    def state(self, since=None):
        """GET /api/state, encoded: the data (or what of it is new to the page, or the error reading it) and the
        experiment in flight, which changes every poll and so is never cached."""
        try:
            part, error = self.part(since), None
        except (ReportError, LedgerError, OSError, git.GitCommandError) as e:
            part, error = b"{}", str(e)
        with self.lock:
            live = in_flight(self.root)
            if live and self.repo is not None:  # the harness commits the experiment before it trains it
                try:
                    head = self.repo.head.commit
                    live.update(commit=head.hexsha[:7], subject=head.summary)
                except ValueError:  # no commit yet
                    pass
        tail = _json({"error": error, "live": live, "repository": str(self.root)})
        return tail if part == b"{}" else part[:-1] + b", " + tail[1:]

    def diff(self, commit):
        """GET /api/diff: (status, body) for one kept commit's diff of its backend's train.py."""
        backend = self.data()["kept"].get(commit) if COMMIT.match(commit or "") else None
        if backend is None:
            return 404, {"error": f"{commit!r} is not a kept commit of these series"}
        path = str(train_file(backend, Path()))
        with self.lock:
            if self.repo is None:
                return 404, {"error": f"{commit}: not inside a git repository"}
            try:
                found = self.repo.commit(commit)
            except (git.BadName, git.BadObject, ValueError):
                return 404, {"error": f"{commit} is not in {self.root} (fetch its run branch to see its diff)"}
            # a root commit (a baseline without calibration) adds the whole file: diff against the empty tree
            parent = found.parents[0].hexsha if found.parents else self.repo.git.hash_object("-t", "tree", "/dev/null")
            text = self.repo.git.diff(parent, found.hexsha, "--", path)
        return 200, {"commit": commit, "path": path, "diff": text}


# ---------------------------------------------------------------------------------------------
# The server


def _is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    server_version = "autoresearch-dashboard"
    timeout = SOCKET_TIMEOUT  # an idle or half-sent connection frees its thread after this many seconds

    def do_GET(self):
        if not self.addressed_here():
            return self.send(403, b"forbidden: this dashboard answers only requests to localhost\n", "text/plain")
        url = urlsplit(self.path)
        board = self.server.board
        if url.path == "/":
            nonce = secrets.token_urlsafe(16)
            return self.send(200, self.server.page.replace(b"__NONCE__", nonce.encode()), "text/html", nonce)
        if url.path == "/plotly.min.js":
            return self.send(200, self.server.plotly_js, "text/javascript")
        if url.path == "/api/state":
            return self.send(200, board.state(parse_qs(url.query).get("since", [None])[0]), "application/json")
        if url.path == "/api/diff":
            try:
                return self.send_json(*board.diff(parse_qs(url.query).get("commit", [""])[0]))
            except (ReportError, LedgerError, OSError, git.GitCommandError) as e:
                return self.send_json(503, {"error": str(e)})
        self.send(404, b"not found\n", "text/plain")

    def refuse(self):
        """Read-only: any method but GET is refused."""
        self.send(405, b"method not allowed: this dashboard is read-only\n", "text/plain")

    def __getattr__(self, name):  # http.server looks up do_<METHOD>: every method it would not find is refused
        if name.startswith("do_"):
            return self.refuse
        raise AttributeError(name)

    def addressed_here(self):
        """Listening on loopback, answer only requests addressed to a loopback name: a web page elsewhere cannot
        read the dashboard by rebinding its own name to 127.0.0.1."""
        if not self.server.loopback:
            return True
        name = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        return _is_loopback(name)

    def send(self, code, body, content_type, nonce=None):
        self.send_response(code)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if code == 405:
            self.send_header("Allow", "GET")
        if nonce:  # only the page's own scripts run; plotly sets inline styles
            self.send_header("Content-Security-Policy", f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; "
                             "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
                             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, code, value):
        self.send(code, json.dumps(report.finite(value), allow_nan=False).encode(), "application/json")

    def log_request(self, code="-", size="-"):  # the page polls every 2 s: no line per request; errors still print
        pass

    def log_error(self, format, *args):
        if not format.startswith("Request timed out"):  # an idle connection closed by the timeout: nothing wrong
            super().log_error(format, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser's open connection does not keep Ctrl-C waiting

    def __init__(self, host, port, board, plotly_js):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.board, self.plotly_js, self.loopback = board, plotly_js, _is_loopback(host)
        self.page = PAGE.read_bytes()
        super().__init__((host, port), Handler)

    def handle_error(self, request, client_address):
        """A browser that closed its tab, or hung up mid-reply, is no error of the dashboard's: no traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _plotly_js():
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise DashboardError("the dashboard needs plotly: pip install -e '.[dashboard]'") from None
    return get_plotlyjs().encode()


def _repo():
    """The repository of the working directory, or None outside one."""
    try:
        return git.Repo(Path.cwd(), search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


def serve(sources=None, host=DEFAULT_HOST, port=DEFAULT_PORT, say=print):
    """Serve the dashboard of sources (ledger files or run branches; None: this checkout's results.tsv and run
    branches) until interrupted. DashboardError: plotly missing, a bad source, the port taken."""
    plotly_js = _plotly_js()
    repo = _repo()
    root = Path(repo.working_tree_dir) if repo is not None and repo.working_tree_dir else Path.cwd()
    if sources is None and repo is None and not (root / LEDGER_NAME).is_file():
        raise DashboardError(f"no {LEDGER_NAME} here and not a git repository: run it in a checkout or name SOURCES")
    board = Dashboard(sources, repo, root)
    try:
        board.data()
    except (ReportError, LedgerError) as e:
        raise DashboardError(str(e)) from None
    try:
        server = Server(host, port, board, plotly_js)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DashboardError(f"port {port} on {host} is in use: pick another with --port") from None
        raise DashboardError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    say(plain(f"dashboard: http://{shown}:{bound}/ (read-only; watching {root}; Ctrl-C to stop)"), flush=True)
    if not server.loopback:
        say(f"warning: listening on {host}: anyone who can reach this machine can read the dashboard", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
