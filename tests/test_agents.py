"""Driving real agent CLIs: the presets' command lines (fake `claude`, `codex`, `gemini` and `opencode` on PATH that
check what they get, run through the real sandbox), the run's memory in the prompt, the turn records, --max-cost,
and a broken agent that stops the loop instead of spinning."""

import json
import math
import os
import sys
import textwrap

import git
import pytest
from typer.testing import CliRunner

from conftest import BUDGET, cli, make_repo
from autoresearch import agents, sandbox
from autoresearch.agents import AgentFailed
from autoresearch.branch import open_repo
from autoresearch.cli import app
from autoresearch.ledger import Row, read_ledger
from autoresearch.loop import BACKOFF_MAX, TurnRules, build_prompt, make_agent, memory_facts
from autoresearch.memory import Facts, render
from autoresearch.presets import PRESETS, missing_binary
from autoresearch.report import results_summary
from autoresearch.turns import load_turns, read_usage


def report(name, cost):
    """What each fake prints on success: its CLI's report of the turn, in that CLI's format."""
    if name == "claude":
        return json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "done",
                           "total_cost_usd": cost, "usage": {"input_tokens": 1200, "cache_read_input_tokens": 300,
                                                             "output_tokens": 80}})
    if name == "codex":
        return "\n".join([json.dumps({"type": "thread.started"}),
                          json.dumps({"type": "turn.completed", "usage": {"input_tokens": 900, "output_tokens": 40}})])
    if name == "gemini":
        return json.dumps({"response": "done", "stats": {"models": {"gemini-2.5-pro": {"tokens": {
            "prompt": 700, "candidates": 30, "total": 730}}}}})
    return "Edited backends/mlx/train.py"


FAKE = '''#!{python}
"""A fake {name}: exits 2 unless called as the preset says; otherwise does what MODE says."""
import re, sys
from pathlib import Path

want = {argv!r}
args = sys.argv[1:]
if "{{prompt}}" in want:
    i = want.index("{{prompt}}")
    prompt, args = (args[i] if len(args) > i else ""), args[:i] + ["{{prompt}}"] + args[i + 1:]
else:
    prompt = sys.stdin.read()
if args != [a for a in want]:
    sys.exit(f"fake {name}: wrong arguments {{args}}")
if "backends/mlx/train.py" not in prompt or "## The run so far" not in prompt:
    sys.exit("fake {name}: the prompt lacks the file to edit or the run's memory")
mode = "{mode}"
if mode == "broken":
    print("Invalid API key · Please run /login")
    sys.exit(1)
if mode == "twice" and "fake {name} edit" in prompt:  # second turn: the first is in the memory
    if "notes of turn 1" not in prompt:
        sys.exit("fake {name}: my notes did not come back")
    print({report_again!r})  # and no edit this time
    sys.exit(0)
train = Path("backends/mlx/train.py")
train.write_text(re.sub(r"^MATRIX_LR = [0-9.]+", "MATRIX_LR = 0.047", train.read_text(), count=1, flags=re.M))
Path(".autoresearch/description").write_text("fake {name} edit: MATRIX_LR 0.04 -> 0.047\\n")
Path(".autoresearch/notes.md").write_text("notes of turn 1: MATRIX_LR up a little\\n")
print({report!r})
'''


def install_fakes(home, mode="edit", cost=0.4, cost_again=0.7):
    """Fake CLIs in HOME/.npm-global/bin, where `npm install -g` puts a user's; returns PATH with it first."""
    bin_dir = home / ".npm-global" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, preset in PRESETS.items():
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable, name=name, argv=list(preset.argv[1:]), mode=mode,
                                    report=report(name, cost), report_again=report(name, cost_again)))
        path.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_agents_lists_each_preset_and_a_missing_binary_says_how_to_install(monkeypatch, tmp_path):
    result = CliRunner().invoke(app, ["agents"])
    assert result.exit_code == 0
    for preset in PRESETS.values():
        assert f"{preset.name}: {preset.command}" in result.output and preset.package in result.output
    monkeypatch.setenv("PATH", str(tmp_path))
    assert missing_binary("gemini") == ("--agent gemini: gemini is not on PATH; install it with "
                                        "`npm install -g @google/gemini-cli`")
    assert "nosuchtool is not on PATH" in missing_binary("nosuchtool --flag")
    assert missing_binary("random") is None
    monkeypatch.setenv("PATH", install_fakes(tmp_path / "home"))
    assert all(missing_binary(name) is None for name in PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_edits_train_py_from_its_scratch_clone(tmp_path, monkeypatch, name):
    """Through the real sandbox, from a user's npm bin folder under HOME: the arguments and the prompt as the preset
    says (else the fake exits 2), the edit and the notes taken back, the CLI's report of cost and tokens read."""
    root = make_repo(tmp_path / "project", backends=("mlx",))
    monkeypatch.setenv("PATH", install_fakes(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    open_repo(root)  # as every command does: the ledger and .autoresearch/ excluded from git
    (root / ".autoresearch").mkdir()
    reply = make_agent(name).edit(root, "mlx", "Edit backends/mlx/train.py\n## The run so far", 60)
    assert reply.exit == 0 and reply.description == f"fake {name} edit: MATRIX_LR 0.04 -> 0.047", reply.output
    assert "MATRIX_LR = 0.047" in (root / "backends/mlx/train.py").read_text()
    assert (root / ".autoresearch/notes.md").read_text().startswith("notes of turn 1")
    usage = read_usage(reply.output)
    expected = {"claude": (0.4, 1500, 80), "codex": (None, 900, 40), "gemini": (None, 700, 30),
                "opencode": (None, None, None)}[name]
    assert (usage.cost_usd, usage.input_tokens, usage.output_tokens) == expected
    assert git.Repo(root).git.status("--porcelain") == " M backends/mlx/train.py"  # the notes are no edit


def test_claude_preset_loop_records_turns_and_stops_at_max_cost(repo_dir, tmp_path):
    """Turn 1 edits (reported $0.40) and trains; turn 2 finds turn 1 and its notes in the memory, edits nothing
    ($0.70): $1.10 passes --max-cost 1, and the loop ends cleanly at the last keep."""
    home = tmp_path / "home"
    path = install_fakes(home, mode="twice")
    proc = cli(repo_dir, "--backend", "mlx", "loop", "--agent", "claude", "--max-cost", "1", "--budget", BUDGET,
               "--agent-backoff", "0", env={"PATH": path, "HOME": str(home)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loop stopped: the agent's reported cost $1.1000 passed --max-cost $1" in proc.stdout
    assert "loop ended: 1 experiments" in proc.stdout
    rows = read_ledger(repo_dir / "results.tsv")
    assert len(rows) == 2 and rows[-1].description == "fake claude edit: MATRIX_LR 0.04 -> 0.047"
    repo = git.Repo(repo_dir)
    last_keep = [r for r in rows if r.status == "keep"][-1]
    assert repo.head.commit.hexsha.startswith(last_keep.commit) and not repo.is_dirty(untracked_files=True)
    first, second = load_turns(repo_dir)
    assert first["agent"] == "claude" and first["edited"] and first["changed"] == ["MATRIX_LR"]
    assert first["cost_usd"] == 0.4 and first["input_tokens"] == 1500 and first["output_tokens"] == 80
    assert first["status"] == rows[-1].status and first["commit"] == rows[-1].commit
    assert first["result"].startswith("RESULT ") and first["seconds"] > 0 and first["exit"] == 0
    assert "## The run so far: 0 experiments" in first["prompt"] and '"total_cost_usd"' in first["output"]
    assert not second["edited"] and "unchanged" in second["error"] and second["cost_usd"] == 0.7
    assert "fake claude edit" in second["prompt"] and "notes of turn 1" in second["prompt"]
    summary = results_summary(rows, root=repo_dir)["groups"][0]["agent"]
    assert summary == {"turns": 2, "no_experiment": 1, "seconds": summary["seconds"], "cost_usd": 1.1,
                       "input_tokens": 3000, "output_tokens": 160}
    shown = cli(repo_dir, "results", env={"COLUMNS": "200"})
    assert "2 (1 without an experiment)" in shown.stdout and "$1.1000, 3,000 tokens in, 160 out" in shown.stdout

    from autoresearch.dashboard import Dashboard

    state = json.loads(Dashboard(None, repo, repo_dir).state())
    assert state["series"][0]["summary"]["agent"]["cost_usd"] == 1.1


def test_a_broken_agent_stops_the_loop_with_its_error(repo_dir, tmp_path):
    home = tmp_path / "home"
    path = install_fakes(home, mode="broken")
    ledger = (repo_dir / "results.tsv").read_text()
    head = git.Repo(repo_dir).head.commit.hexsha
    missing = cli(repo_dir, "--backend", "mlx", "loop", "--agent", "codex --x", env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == \
        "error: --agent 'codex --x': codex is not on PATH (presets: claude, codex, gemini, opencode; `autoresearch " \
        "agents` lists them)"
    proc = cli(repo_dir, "--backend", "mlx", "loop", "--agent", "claude", "--max-failed-turns", "3",
               "--agent-backoff", "0.01", "--budget", BUDGET, env={"PATH": path, "HOME": str(home)})
    assert proc.returncode == 7, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: loop stopped: 3 agent turns in a row produced no experiment; the last: agent exited "
                      "with 1: Invalid API key · Please run /login (output in .autoresearch/agent.log)"]
    assert proc.stdout.count("produced no experiment") == 3
    records = load_turns(repo_dir)
    assert len(records) == 3 and all(r["exit"] == 1 and not r["edited"] for r in records)
    assert all("Invalid API key" in r["output"] for r in records)
    assert (repo_dir / "results.tsv").read_text() == ledger and git.Repo(repo_dir).head.commit.hexsha == head


def test_turn_rules_back_off_and_refuse_bad_values():
    rules = TurnRules(max_failed=3, backoff=2)
    assert [rules.wait(n) for n in range(5)] == [0, 2, 4, 8, 16]
    assert TurnRules(backoff=400).wait(3) == BACKOFF_MAX
    for bad, word in (({"max_failed": 0}, "--max-failed-turns"), ({"backoff": -1}, "--agent-backoff"),
                      ({"max_cost": 0}, "--max-cost"), ({"max_cost": math.inf}, "--max-cost")):
        with pytest.raises(ValueError, match=word):
            TurnRules(**bad)


def test_usage_is_read_where_the_cli_reports_it():
    failed = read_usage(json.dumps({"type": "result", "is_error": True, "result": "Credit balance is too low",
                                    "total_cost_usd": 0}))
    assert failed.error == "Credit balance is too low" and failed.cost_usd == 0
    assert read_usage("plain text\n{not json").cost_usd is None
    # what a command agent may print instead: a negative cost (paying back --max-cost), NaN, a number too large
    # for a float: none of them counts, and none breaks the sums
    odd = read_usage('{"total_cost_usd": -5, "usage": {"input_tokens": 1' + "0" * 400 + ', "output_tokens": 7}}\n'
                     '{"total_cost_usd": NaN}\n{"total_cost_usd": 0.25}')
    assert (odd.cost_usd, odd.input_tokens, odd.output_tokens) == (0.25, None, 7)


# ---------------------------------------------------------------------------------------------
# The memory of the run


def ledger_rows(n, seed=0):
    """A fixture ledger: a baseline and n experiments as the random agent and an LLM would describe them."""
    import random

    rng = random.Random(seed)
    names = ["MATRIX_LR", "EMBEDDING_LR", "WEIGHT_DECAY", "DEPTH", "WARMDOWN_RATIO", "TOTAL_BATCH_SIZE"]
    ideas = ["switch the MLP to SwiGLU", "add QK-norm before attention", "tie the embedding and the lm_head",
             "remove the value embeddings", "use a cosine schedule instead of warmdown"]
    def row(i, status, val, description):
        return Row(f"{i:07x}", val, 1.0, status, description, "mlx-cpu", "mlx", "cpu", 3.0, 42,
                   "2026-12-01T00:00:00+0000", 3.0, 10, 0.5, 1000, "-", "noise(k=2)", f"{i:016x}", "b", "1.0")

    rows, best = [row(0, "keep", 2.0, "baseline")], 2.0
    for i in range(1, n + 1):
        if i % 7 == 0:
            description = rng.choice(ideas)
        else:
            name = rng.choice(names)
            description = f"{name} {rng.random():.3f} -> {rng.random():.3f}"
        status = rng.choice(["discard"] * 6 + ["keep", "crash", "invalid"])
        val = best - rng.uniform(0.001, 0.01) if status == "keep" else best + rng.uniform(-0.0005, 0.02)
        if status in ("crash", "invalid"):
            val = 0.0
            description += " [invalid: trained past the budget]" if status == "invalid" else ""
        best = min(best, val) if status == "keep" else best
        rows.append(row(i, status, val, description))
    return rows, names, ideas


def test_a_memory_of_100_experiments_stays_under_its_cap_and_names_every_change():
    rows, names, ideas = ledger_rows(100)
    facts = Facts(tuple(rows), 0.002, results={rows[3].commit: "RESULT crash (exit 1: out of memory); log tail in x"})
    cap = 8000
    text = render(facts, cap)
    assert len(text) <= cap and "100 experiments after the baseline" in text
    tried = {r.description.split(" ")[0] for r in rows[1:] if r.description.split(" ")[0] in names}
    assert tried == set(names) and all(f"- {name}: " in text for name in tried)
    assert all(f"- code: {idea.lower()}" in text for idea in ideas if any(r.description == idea for r in rows))
    assert "Kept path from the baseline" in text and "Noise floor: val_bpb varies by 0.002000" in text
    assert "Near-misses" in text and "Crashes and invalid runs" in text
    # the oldest detail went first: in the groups, the newest experiment keeps its own line, the oldest does not
    def groups(memory):
        return memory.split("grouped by what it changed")[1].split("Near-misses")[0]

    assert f"- {rows[-1].commit} " in groups(text) and f"- {rows[1].commit} " not in groups(text)
    full = render(facts, 10 ** 6)
    assert f"- {rows[1].commit} " in groups(full) and len(full) > cap
    dead = [line for line in full.splitlines() if "a dead end so far" in line]
    assert dead and all("keep" not in line.split(" tries (")[1] for line in dead)
    assert "- code: add qk-norm before attention: 2 tries (2 discard)" in full


# ---------------------------------------------------------------------------------------------
# A hostile agent: what it leaves for the harness, which runs unconfined after it


HOSTILE = '''
import os, sys
from pathlib import Path
home = Path(os.environ["HOME"])
tried = {}
for target in (home / "bin" / "git", home / ".gitconfig", home / ".claude" / "session.json"):
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\\necho planted\\n")
        tried[target.name] = "written"
    except OSError as e:
        tried[target.name] = type(e).__name__
print(tried)
mode = sys.argv[1]
if mode == "nul":
    Path(".autoresearch/notes.md").write_text("a note \\0 with a NUL\\n")
elif mode == "linked":  # the state folder a link to a folder the agent cannot see, whose notes.md it wants
    os.rename(".autoresearch", ".autoresearch-real")
    os.symlink(sys.argv[2], ".autoresearch")
elif mode == "flood":
    chunk = "x" * (1 << 20) + "\\n"
    while True:
        sys.stdout.write(chunk)
elif mode == "deep":
    print("[" * 100000)
    print('{"is_error": true, "result": "quota \\\\ud800 exceeded"}')
train = Path("backends/mlx/train.py")
train.write_text(train.read_text().replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05", 1))
'''


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A project, a HOME with a logged-in CLI's folder (~/.claude), and a hostile command agent's script."""
    root = make_repo(tmp_path / "project", backends=("mlx",))
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    open_repo(root)
    (root / ".autoresearch").mkdir()
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    return root, home, script


def test_an_agent_writes_only_its_clis_state_in_home(hostile):
    """A program on the user's PATH (~/bin/git) or a git config the harness would run next, unconfined: neither can
    be planted; the CLI's own folder stays writable (its credentials, its sessions)."""
    root, home, script = hostile
    if not sandbox.active().confined:
        pytest.skip("needs a sandbox (bubblewrap)")
    reply = make_agent(f"{sys.executable} {script} plain").edit(root, "mlx", "edit", 60)
    assert "{'git': 'OSError', '.gitconfig': 'OSError', 'session.json': 'written'}" in reply.output.replace(
        "PermissionError", "OSError"), reply.output
    assert not (home / "bin").exists() and not (home / ".gitconfig").exists()
    assert (home / ".claude" / "session.json").exists()
    assert "MATRIX_LR = 0.05" in (root / "backends/mlx/train.py").read_text()


def test_what_an_agent_leaves_never_crashes_the_next_prompt_or_the_harness(hostile, tmp_path):
    root, home, script = hostile
    # a NUL in the notes: the next prompt carries it as a replacement character, and an argument can hold it
    make_agent(f"{sys.executable} {script} nul").edit(root, "mlx", "edit", 60)
    assert "\0" in (root / ".autoresearch/notes.md").read_text()
    git.Repo(root).git.checkout("--", ".")
    prompt = build_prompt(root, "mlx", 3.0)
    assert "a note \ufffd with a NUL" in prompt and "\0" not in prompt
    reply = make_agent(f"{sys.executable} {script} plain --prompt={{prompt}}").edit(root, "mlx", prompt, 60)
    assert reply.exit == 0
    # the notes behind a link to a folder out of the agent's sight: not fetched, the old notes kept
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "notes.md").write_text("a file the agent chose\n")
    git.Repo(root).git.checkout("--", ".")
    with pytest.raises(AgentFailed, match="behind a link out of it"):
        make_agent(f"{sys.executable} {script} linked {secret}").edit(root, "mlx", "edit", 60)
    assert "a file the agent chose" not in (root / ".autoresearch/notes.md").read_text()
    # output nested too deep for a JSON parser, and half a surrogate pair in a reported error: read, not raised
    git.Repo(root).git.checkout("--", ".")
    with pytest.raises(AgentFailed, match=r"reporting an error: quota (\ufffd )?exceeded") as failed:
        make_agent(f"{sys.executable} {script} deep").edit(root, "mlx", "edit", 60)
    str(failed.value).encode()  # nothing left that the log or a terminal cannot write


def test_an_agent_flooding_its_output_is_stopped_at_the_file_cap(hostile, monkeypatch):
    root, home, script = hostile
    monkeypatch.setattr(agents, "MAX_AGENT_FILE_BYTES", 8 << 20)
    with pytest.raises(AgentFailed, match="over 8 MiB"):
        make_agent(f"{sys.executable} {script} flood").edit(root, "mlx", "edit", 60)
    assert (root / ".autoresearch/agent.log").stat().st_size <= 8 << 20


def test_records_and_notes_planted_by_an_unconfined_train_py_are_skipped(tmp_path):
    """With --sandbox off, train.py can write into .autoresearch/: a fifo, a deep or ill-typed record, notes that
    link elsewhere. The turn records skip them and the prompt carries no linked file."""
    root = make_repo(tmp_path / "project", backends=("mlx",))
    open_repo(root)
    turns = root / ".autoresearch" / "turns"
    turns.mkdir(parents=True)
    os.mkfifo(turns / "fifo.json")
    (turns / "deep.json").write_text("[" * 100000)
    (turns / "typed.json").write_text(json.dumps({"commit": [1], "changed": "DEPTH", "branch": "main"}))
    (turns / "good.json").write_text(json.dumps({"commit": "abc1234", "changed": ["DEPTH"], "branch": "main"}))
    assert sorted(map(str, (r["commit"] for r in load_turns(root)))) == ["[1]", "abc1234"]
    secret = tmp_path / "secret.txt"
    secret.write_text("a file train.py chose\n")
    (root / ".autoresearch" / "notes.md").symlink_to(secret)
    prompt = build_prompt(root, "mlx", 3.0)
    assert "a file train.py chose" not in prompt and "\0" not in prompt
    assert memory_facts(root, "main").changed == {"abc1234": ["DEPTH"]}


def test_an_agent_sees_no_session_bus(hostile, tmp_path):
    """systemd-run --user (or a desktop's services) through the user's D-Bus would start a process outside the
    sandbox: /run/user and /run/dbus are empty inside it."""
    root, home, _ = hostile
    if not sandbox.active().confined:
        pytest.skip("needs a sandbox (bubblewrap)")
    script = tmp_path / "look.py"
    script.write_text("import os\nfor d in ('/run/user', '/run/dbus'):\n    print(d, os.listdir(d) if os.path.isdir(d) "
                      "else 'absent')\n")
    said = make_agent(f"{sys.executable} {script}").edit(root, "mlx", "edit", 60).output
    assert "/run/user [] " in said.replace("\n", " ") or "/run/user absent" in said, said
