"""
Benchmark: the dashboard on a large ledger, in a real headless Chromium (Debian's /usr/bin/chromium, via playwright).

- the ledger: N rows (real Row objects through ledger.format_row) over a few hardware tags and run branches;
- the server: `autoresearch dashboard LEDGER` in its own process, as a user runs it;
- time to first render: page.goto until every series shows its heading, its ledger table and its drawn chart;
- bytes per poll: a real GET /api/state as the page makes it, whole, idle (since= the page's version), and after
  one row is appended (since= the version before it);
- idle CPU: the CPU seconds of the browser's processes and of the server over IDLE seconds with the page open.

Usage: python bench/dashboard_load.py [--rows 100000] [--series 3] [--idle 20]
"""

import argparse
import dataclasses
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.ledger import COLUMNS, Row, append_row, format_row  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
HARDWARE = ["cuda-h100-80gb", "mlx-m3max-128gb", "cpu-x86_64-16c-64gb"]
TICKS = os.sysconf("SC_CLK_TCK")


def make_rows(n, series=3, seed=0):
    """n rows of `series` run branches, interleaved as a swarm's would be: mostly discards, some keeps that lower
    the best, a few crashes and verify re-runs; descriptions of a realistic length."""
    rnd = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    best = {i: 1.0 + 0.05 * i for i in range(series)}
    rows = []
    for k in range(n):
        i = k % series
        hw = HARDWARE[i % len(HARDWARE)] + ("" if i < len(HARDWARE) else f"-{i}")
        first = k < series
        status = "keep" if first else rnd.choices(["discard", "keep", "crash", "verify"], [90, 4, 4, 2])[0]
        value = best[i] if first else best[i] + rnd.gauss(0.004, 0.01)
        if status == "keep":
            value = best[i] = best[i] - abs(rnd.gauss(0.002, 0.001)) if not first else value
        if status == "crash":
            value = 0.0
        rows.append(Row(
            commit=f"{rnd.getrandbits(28):07x}", val_bpb=value, memory_gb=round(rnd.uniform(10, 40), 1),
            status=status, description="baseline" if first else f"try {k}: scale the learning rate by "
            f"{rnd.uniform(0.5, 2):.2f} and warm up over {rnd.randint(10, 500)} steps", hardware=hw,
            backend="cuda" if hw.startswith("cuda") else "mlx", eval_profile="default", budget=300.0, seed=k,
            timestamp=(start + timedelta(seconds=60 * k)).strftime("%Y-%m-%dT%H:%M:%S%z"),
            training_seconds=300.0, num_steps=rnd.randint(900, 1100), num_params_M=50.3,
            tokens=rnd.randint(400_000_000, 500_000_000), config="-", gate="greedy",
            train_hash=f"{rnd.getrandbits(64):016x}", branch=f"autoresearch/bench-{hw}",
            samples="-" if status == "crash" else f"{value:.6f}", worker=f"w{k % 4}"))
    return rows


def write_ledger(path, rows):
    Path(path).write_text("\t".join(COLUMNS) + "\n" + "".join(format_row(r) for r in rows))


def start_dashboard(cwd, *args):
    """The real command in its own process; (process, URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "autoresearch", "dashboard", "--port", "0", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"http://\S+/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the dashboard did not start: {line}{proc.communicate()[1]}")
    return proc, match[0]


def fetch(url):
    with urllib.request.urlopen(url, timeout=600) as response:
        return response.read()


def descendants(pid):
    """pid and every process below it (the playwright driver, Chromium and its renderers)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


# the condition for "rendered", true of the page before and after this change: every series has its heading, a
# ledger table with rows and a drawn chart
RENDERED = """(n) => document.querySelectorAll('h2.series-title').length === n &&
    [...document.querySelectorAll('section.series')].every((s) =>
        s.querySelector('table.ledger tbody tr') && s.querySelector('.chart .main-svg'))"""


def measure(rows_n, series, idle):
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="dashboard-bench-"))
    rows = make_rows(rows_n, series)
    write_ledger(work / "results.tsv", rows)
    started = time.time()
    proc, url = start_dashboard(work, str(work / "results.tsv"))
    out = {"rows": rows_n, "series": series, "server_start_s": round(time.time() - started, 2)}
    try:
        t = time.time()
        full = fetch(url + "api/state")
        out["full_state_bytes"], out["full_state_get_s"] = len(full), round(time.time() - t, 2)
        version = json.loads(full)["version"]
        out["idle_poll_bytes"] = len(fetch(url + f"api/state?since={version}"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            t = time.time()
            page.goto(url)
            page.wait_for_function(RENDERED, arg=series, timeout=600_000, polling=100)
            out["first_render_s"] = round(time.time() - t, 2)
            page.wait_for_timeout(3000)  # let the first polls settle
            pids, server = descendants(os.getpid()), [proc.pid]
            before, server_before, t = cpu_seconds(pids), cpu_seconds(server), time.time()
            time.sleep(idle)
            spent = time.time() - t
            out["idle_browser_cpu_pct"] = round(100 * (cpu_seconds(pids) - before) / spent, 1)
            out["idle_server_cpu_pct"] = round(100 * (cpu_seconds(server) - server_before) / spent, 1)
            # one more row, as the harness appends it: the poll that carries it, and the page showing it
            shown = page.evaluate("() => document.getElementById('sources').textContent")
            append_row(work / "results.tsv", dataclasses.replace(rows[-1], commit="fedcba9", seed=rows_n,
                                                                 description="one more row"))
            t = time.time()
            out["new_row_poll_bytes"] = len(fetch(url + f"api/state?since={version}"))
            page.wait_for_function("(old) => document.getElementById('sources').textContent !== old",
                                   arg=shown, timeout=600_000, polling=100)
            out["new_row_shown_s"] = round(time.time() - t, 2)
            browser.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--idle", type=float, default=20, help="seconds of an open, idle page to measure CPU over")
    args = parser.parse_args()
    print(json.dumps(measure(args.rows, args.series, args.idle), indent=1))


if __name__ == "__main__":
    main()
