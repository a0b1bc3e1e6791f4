"""`autoresearch dashboard` on a real run branch: the JSON endpoint, then the page in a real headless Chromium
(Debian's /usr/bin/chromium, driven by playwright) while a real `loop` adds a row."""

import dataclasses
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import BUDGET
from autoresearch.ledger import COLUMNS, Row, append_row, format_row, now, read_ledger
from autoresearch.summary import parse_step

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=window.__xss=1>"
PAGE_ROWS = 200  # the ledger rows the page draws at a time (dashboard_page.html)


def start_dashboard(root, *args):
    """The real command in a fresh process; returns (process, its URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "autoresearch", "dashboard", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"http://\S+/", line)
    if not match:
        proc.kill()
        pytest.fail(f"the dashboard did not start: {line}{proc.communicate()[1]}")
    return proc, match[0]


def stop(proc):
    proc.terminate()
    proc.communicate(timeout=10)


def get(url, method="GET"):
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
        return json.loads(response.read())


def best_kept(root):
    return min(r.val_bpb for r in read_ledger(root / "results.tsv") if r.status == "keep")


def ledger_rows(n, hardware=("cuda-h100", "mlx-m3max", "cpu-x86")):
    """n rows of len(hardware) run branches taking turns, as a swarm's would: a baseline each, then mostly
    discards, every 25th a keep that lowers its best, every 40th a crash."""
    rows, best = [], {}
    for k in range(n):
        hw = hardware[k % len(hardware)]
        status = "keep" if k < len(hardware) or k % 25 == 0 else "crash" if k % 40 == 0 else "discard"
        value = best.get(hw, 1.5) - (0.001 if status == "keep" else -0.003 * (k % 7))
        best[hw] = value if status == "keep" else best[hw]
        rows.append(Row(
            commit=f"{k * 2654435761 % (1 << 28):07x}", val_bpb=0.0 if status == "crash" else value, memory_gb=20.5,
            status=status, description="baseline" if k < len(hardware) else f"experiment {k}: scale the lr",
            hardware=hw, backend="mlx", eval_profile="default", budget=300.0, seed=k,
            timestamp=f"2025-01-{1 + k // 86400:02d}T{k // 3600 % 24:02d}:{k // 60 % 60:02d}:{k % 60:02d}+0000",
            training_seconds=300.0, num_steps=1000 + k % 50, num_params_M=50.3, tokens=450_000_000, config="-",
            gate="greedy", train_hash=f"{k:016x}", branch=f"autoresearch/bench-{hw}",
            samples="-" if status == "crash" else f"{value:.6f}"))
    return rows


def write_ledger(path, rows):
    path.write_text("\t".join(COLUMNS) + "\n" + "".join(format_row(r) for r in rows))


def fetch(url):
    """A GET as the page makes it: the body's bytes, as the server sent them."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


@pytest.fixture(scope="module")
def project(branch_template, tmp_path_factory):
    """A copy of the real run branch (its baseline row in results.tsv and in the git notes)."""
    dest = tmp_path_factory.mktemp("dashboard") / "project"
    shutil.copytree(branch_template, dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def dashboard(project):
    proc, url = start_dashboard(project, "--port", "0")
    yield url
    stop(proc)


def test_state_endpoint_and_safety(project, dashboard):
    state = get(dashboard + "api/state")
    row, = read_ledger(project / "results.tsv")
    s, = state["series"]
    assert s["summary"]["hardware"] == row.hardware and s["summary"]["branch"] == row.branch
    assert s["summary"]["best"]["val_bpb"] == best_kept(project) and s["rows"][0]["description"] == "baseline"
    assert state["error"] is None and state["live"] is None
    # a trainer in flight: its pid file as the runner writes it, the real progress lines setup left in run.log
    steps = [parse_step(line) for line in (project / ".autoresearch/run.log").read_text().splitlines()]
    pid_file = project / ".autoresearch/trainer.pid"
    pid_file.write_text(f"{os.getpid()} python backends/mlx/train.py\n")
    try:
        live = get(dashboard + "api/state")["live"]
    finally:
        pid_file.unlink()
    assert live["progress"] == [p for p in steps if p][-1] and live["progress"]["step"] >= 0
    assert {"percent", "loss", "remaining_seconds"} <= set(live["progress"])
    # the baseline's diff of train.py, on demand; a commit no row kept is not diffed
    diff = get(dashboard + f"api/diff?commit={row.commit}")
    assert diff["path"] == "backends/mlx/train.py" and "+++ b/backends/mlx/train.py" in diff["diff"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(dashboard + "api/diff?commit=--output=x")
    assert refused.value.code == 404
    # read-only: every other method is refused
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(dashboard + "api/state", method)
        assert refused.value.code == 405
    # bound to 127.0.0.1 by default: another loopback address finds nobody listening
    assert dashboard.startswith("http://127.0.0.1:")
    port = int(dashboard.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()


def test_bad_source_and_taken_port_are_one_line_errors(project):
    for args in (["no-such-ledger.tsv"], ["--port", "{port}"]):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            argv = [a.format(port=taken.getsockname()[1]) for a in args]
            proc = subprocess.run([sys.executable, "-m", "autoresearch", "dashboard", *argv], cwd=project,
                                  capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
    assert "in use" in proc.stderr


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium): the page is tested in a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url):
    """A new tab on the dashboard once it has drawn; its /api/state answers' sizes recorded as they arrive, and its
    errors."""
    page = browser.new_page()
    page.polls, page.errors = [], []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("response", lambda r: "/api/state" in r.url and page.polls.append(int(r.headers["content-length"])))
    page.goto(url)
    page.wait_for_selector("body[data-shown]", timeout=120_000)
    return page


def test_page_follows_a_real_loop(project, dashboard, cpu_cache, browser):
    page = browser.new_page()
    try:
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dashboard)
        page.wait_for_selector("h2.series-title")
        row, = read_ledger(project / "results.tsv")
        assert page.inner_text("h2.series-title") == row.hardware
        assert page.inner_text(".best") == f"{best_kept(project):.6f}"
        assert page.locator("table.ledger tbody tr").count() == 1
        assert page.locator(".chart .scatterlayer .point").count() >= 1  # plotly drew the baseline
        # the baseline's holdout, in its row and in the kept commits' list, beside the val_bpb
        assert f"{row.holdout_bpb:.6f}" in page.inner_text("table.ledger tbody tr") and row.holdout_bpb > 0
        assert f"holdout {row.holdout_bpb:.6f}" in page.inner_text("details.kept summary")
        # remember this page (a reload would forget) and every text the live panel shows
        page.evaluate("""() => { window.__same = 1; window.__live = [];
            new MutationObserver(() => window.__live.push(document.getElementById('live').textContent))
                .observe(document.getElementById('live'), {childList: true, subtree: true}); }""")

        # a real experiment: the page shows it in flight, then its row, without a reload
        loop = subprocess.run([sys.executable, "-m", "autoresearch", "--backend", "mlx", "loop", "--agent",
                               "random", "-n", "1", "--budget", str(BUDGET)], cwd=project, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, AUTORESEARCH_CACHE=str(cpu_cache)))
        assert loop.returncode == 0, loop.stdout + loop.stderr
        rows = read_ledger(project / "results.tsv")
        assert len(rows) == 2 or "1 repeat" in loop.stdout
        page.wait_for_function(f"() => document.querySelectorAll('table.ledger tbody tr').length === {len(rows)}",
                               timeout=10_000)
        shown = page.evaluate("window.__live")
        assert any(re.search(r"step \d+ · [\d.]+% of budget · loss [\d.]+", t) for t in shown), shown
        assert page.inner_text("#live") == "No experiment in flight."
        assert page.inner_text(".best") == f"{best_kept(project):.6f}"

        # a row appended as the harness does, with a description that is markup: shown as text, never run
        started = time.time()
        append_row(project / "results.tsv", dataclasses.replace(rows[0], status="discard", description=XSS,
                                                                timestamp=now()))
        page.wait_for_function(f"() => document.querySelectorAll('table.ledger tbody tr').length === {len(rows) + 1}",
                               timeout=6_000)
        assert time.time() - started < 6
        assert page.locator("td.desc", has_text=XSS).count() == 1
        assert page.evaluate("window.__xss") is None and page.locator("main img").count() == 0
        assert page.evaluate("window.__same") == 1

        # the ledger sorts by a column; a kept commit's diff opens on demand
        page.click("th[data-col=val_bpb]")
        shown_values = page.locator("table.ledger tbody tr td:nth-child(5)").all_inner_texts()
        assert shown_values[0] == f"{min(r.val_bpb for r in rows if r.status in ('keep', 'discard')):.6f}"
        page.click(f"details.kept[data-commit='{row.commit}'] summary")
        page.wait_for_selector("pre.diff")
        assert "+++ b/backends/mlx/train.py" in page.inner_text("pre.diff")
        assert not errors, errors
    finally:
        page.close()


def test_polls_send_what_changed_and_connections_end_quietly(project):
    proc, url = start_dashboard(project, "--port", "0")
    try:
        state = get(url + "api/state")
        assert state["series"] and state["version"]
        with urllib.request.urlopen(url + f"api/state?since={state['version']}", timeout=10) as response:
            body = response.read()
        again = json.loads(body)
        assert again["unchanged"] is True and "series" not in again and again["live"] is None and len(body) < 500
        host, port = url.split("//")[1].strip("/").rsplit(":", 1)
        # a tab closed mid-reply: the connection reset before the reply is read
        for _ in range(3):
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.sendall(b"GET /plotly.min.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.close()
        # an idle connection and a half-sent request: the server hangs up on both, freeing their threads
        idle, half = socket.create_connection((host, int(port))), socket.create_connection((host, int(port)))
        half.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for s in (idle, half):
            s.settimeout(120)
            assert s.recv(1) == b""
            s.close()
        assert get(url + "api/state")["version"] == state["version"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err and "Error" not in err, err


def test_page_appends_new_rows_and_reloads_a_rewritten_ledger(tmp_path, browser):
    ledger = tmp_path / "results.tsv"
    rows = ledger_rows(2 * PAGE_ROWS + 100, hardware=("cuda-h100", "mlx-m3max"))
    write_ledger(ledger, rows)
    proc, url = start_dashboard(tmp_path, str(ledger), "--port", "0")
    try:
        page = open_page(browser, url)
        page.evaluate("window.__same = 1")
        full = fetch(url + "api/state")
        version = json.loads(full)["version"]
        assert page.evaluate("document.body.dataset.shown") == version and page.polls[0] == len(full)
        assert page.locator("table.ledger").nth(0).locator("tbody tr").count() == PAGE_ROWS
        assert page.inner_text(".pager .shown >> nth=0") == f"rows 1–{PAGE_ROWS} of {len(rows) // 2}"

        # a row appended as the harness does: the poll that carries it holds that row, not the ledger again
        new = dataclasses.replace(rows[-2], commit="abcdef1", seed=len(rows), description=XSS, timestamp=now())
        append_row(ledger, new)
        body = fetch(url + f"api/state?since={version}")
        answer = json.loads(body)
        assert answer["delta"] is True and answer["rows"] == len(rows) + 1 and "matrix" not in answer
        grown = [s for s in answer["series"] if s["rows"]]
        assert len(grown) == 1 and [r["description"] for r in grown[0]["rows"]] == [XSS]
        assert len(body) * 50 < len(full), (len(body), len(full))
        page.wait_for_function("(v) => document.body.dataset.shown === v", arg=answer["version"], timeout=10_000)
        assert page.polls[1:] and max(page.polls[1:]) * 50 < len(full), page.polls  # never the whole state again
        assert page.inner_text("#sources").startswith(f"{len(rows) + 1} rows")
        page.click(".pager >> nth=0 >> button[data-page=last]")
        assert page.locator("td.desc", has_text=XSS).count() == 1 and page.evaluate("window.__xss") is None

        # the ledger rewritten (shortened, one row changed): not an append, so the page reloads it whole
        polls = len(page.polls)
        write_ledger(ledger, [dataclasses.replace(rows[0], description="rewritten")] + rows[1:PAGE_ROWS])
        answer = json.loads(fetch(url + f"api/state?since={answer['version']}"))
        assert "delta" not in answer and answer["rows"] == PAGE_ROWS
        page.wait_for_function("(v) => document.body.dataset.shown === v", arg=answer["version"], timeout=10_000)
        assert page.inner_text("#sources").startswith(f"{PAGE_ROWS} rows")
        assert page.inner_text("table.ledger >> nth=0 >> td.desc >> nth=0") == "rewritten"
        assert page.locator("table.ledger").nth(0).locator("tbody tr").count() == PAGE_ROWS // 2
        assert max(page.polls[polls:]) > len(full) / 4  # this time the whole state
        assert page.evaluate("window.__same") == 1 and not page.errors, page.errors
        page.close()
    finally:
        stop(proc)


def test_a_100000_row_ledger_opens(tmp_path, browser):
    ledger = tmp_path / "results.tsv"
    rows = ledger_rows(100_000)
    write_ledger(ledger, rows)
    proc, url = start_dashboard(tmp_path, str(ledger), "--port", "0")
    try:
        page = open_page(browser, url)
        assert page.inner_text("#sources").startswith("100,000 rows")
        assert page.locator("h2.series-title").all_inner_texts() == ["cuda-h100", "mlx-m3max", "cpu-x86"]
        sizes = [sum(r.hardware == hw for r in rows) for hw in ("cuda-h100", "mlx-m3max", "cpu-x86")]
        assert page.locator(".pager .shown").all_inner_texts() == [f"rows 1–{PAGE_ROWS} of {n:,}" for n in sizes]
        first = page.locator("table.ledger").nth(0)
        assert first.locator("tbody tr").count() == PAGE_ROWS
        assert first.locator("tbody tr td:nth-child(1)").all_inner_texts()[:3] == ["0", "1", "2"]
        assert page.locator(".chart .main-svg").count() >= 3  # plotly drew every chart
        # the next page, and a sort over all the series' rows, not only the page shown
        page.click(".pager >> nth=0 >> button[data-page=next]")
        assert first.locator("tbody tr td:nth-child(1)").all_inner_texts()[0] == str(PAGE_ROWS)
        page.click("table.ledger >> nth=0 >> th[data-col=val_bpb]")
        lowest = min(r.val_bpb for r in rows[::3] if r.status != "crash")
        assert first.locator("tbody tr td:nth-child(5)").all_inner_texts()[0] == f"{lowest:.6f}"
        assert page.inner_text(".pager .shown >> nth=0").startswith(f"rows 1–{PAGE_ROWS} of")
        assert not page.errors, page.errors
        page.close()
    finally:
        stop(proc)
