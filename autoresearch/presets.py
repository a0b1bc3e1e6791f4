"""The agent CLIs `--agent NAME` knows: for each, the non-interactive command line that lets it read and edit files
in its scratch clone without asking, and nothing more (the harness, not the agent, runs training)."""

import importlib.util
import shlex
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    argv: tuple  # the command line; "{prompt}" in it is replaced by the prompt, else the prompt goes on stdin
    package: str  # the npm package that installs the binary
    reports: str  # what the CLI says about its turn that the harness reads (cost, tokens)
    why: str  # what its flags do, one line

    @property
    def binary(self):
        return self.argv[0]

    @property
    def command(self):
        return shlex.join(self.argv)

    @property
    def prompt_via(self):
        return "argument" if any("{prompt}" in a for a in self.argv) else "stdin"

    def install(self):
        return f"npm install -g {self.package}"


PRESETS = {p.name: p for p in (
    Preset("claude", ("claude", "-p", "--permission-mode", "acceptEdits", "--allowedTools",
                      "Read,Edit,Write,Glob,Grep", "--output-format", "json"),
           "@anthropic-ai/claude-code", "cost (total_cost_usd) and tokens (usage), in its JSON result",
           "print mode; edits accepted without asking; only the read and edit tools, no shell"),
    Preset("codex", ("codex", "exec", "--full-auto", "--sandbox", "workspace-write", "--json", "-"),
           "@openai/codex", "tokens (usage of turn.completed), in its JSON events; no cost",
           "exec mode; its own sandbox writes only the scratch clone; no approval prompts; prompt from stdin (-)"),
    Preset("gemini", ("gemini", "--approval-mode", "auto_edit", "--output-format", "json"),
           "@google/gemini-cli", "tokens (stats.models.*.tokens), in its JSON result; no cost",
           "non-interactive (prompt on stdin); edits approved, other tools not"),
    Preset("opencode", ("opencode", "run", "{prompt}"),
           "opencode-ai", "nothing the harness reads",
           "run mode, the prompt as its message; edits allowed by its default permissions"),
)}


# What the presets' CLIs write in HOME (credentials, sessions, settings): the only parts of HOME an agent's turn
# may write, where they exist (a CLI run once by hand, logged in, has made them). The rest of HOME is read-only.
HOME_STATE = (".claude", ".claude.json", ".codex", ".gemini", ".config/opencode", ".local/share/opencode",
              ".local/state/opencode", ".cache/opencode")


def expand(spec):
    """The command line an --agent value runs: a preset's, or the value itself."""
    preset = PRESETS.get(spec)
    return preset.command if preset else spec


def missing_binary(spec):
    """One line where the program an --agent command starts is not on PATH (with how to install a preset's),
    else None: said before any experiment, not once per turn."""
    if spec == "random":
        return None
    if spec == "tpe":
        return None if importlib.util.find_spec("optuna") else "--agent tpe needs Optuna: pip install -e '.[tpe]'"
    try:
        args = shlex.split(expand(spec))
    except ValueError as e:
        return f"--agent {spec!r} is not a command line: {e}"
    if not args:
        return "--agent is empty: give random, a preset (" + ", ".join(PRESETS) + ") or a command"
    if shutil.which(args[0]):
        return None
    preset = PRESETS.get(spec)
    if preset:
        return f"--agent {spec}: {preset.binary} is not on PATH; install it with `{preset.install()}`"
    return f"--agent {spec!r}: {args[0]} is not on PATH (presets: {', '.join(PRESETS)}; `autoresearch agents` lists them)"
