"""Every `autoresearch ...` command README.md and program.md show parses against the real CLI, so an agent that
types what program.md says is never answered "No such option"."""

import re
import shlex

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from autoresearch.cli import app

# placeholders as the docs write them -> a value the parser accepts
PLACEHOLDERS = {"B": "mlx", "<backend>": "mlx", "<cuda|mps|mlx>": "mlx", "T": "demo", "<date>": "dec1", "N": "2",
                "PATH": "data", "CMD": "random", "BRANCH": "autoresearch/x", "PNG": "p.png", "DIR": "out",
                "SOURCE...": "results.tsv", "...": None}


def documented_commands():
    """(file, command) for every inline-code span or indented line that runs autoresearch."""
    found = []
    for name in ("README.md", "program.md"):
        text = (ROOT / name).read_text()
        spans = re.findall(r"`(autoresearch [^`]+)`", text)
        spans += [m.strip() for m in re.findall(r"^    (?:.*?&& )?(?:\S+=\S+ )*(?:\S+/)?(autoresearch .+)$", text, re.M)]
        for span in spans:
            for part in span.split(" && "):
                part = re.sub(r"^(\S+=\S+ )+", "", part.strip())  # VAR=value prefixes
                part = re.sub(r"^\S*/autoresearch ", "autoresearch ", part)
                if part.startswith("autoresearch "):
                    found.append((name, part.split("  #")[0].strip()))
    return found


def to_args(command):
    command = command.replace("\\|", "|")
    command = re.sub(r"\[([^\]]+)\]", r"\1", command)  # optional parts: shown, so they must parse
    args = []
    for word in shlex.split(command)[1:]:
        if word in PLACEHOLDERS:
            if PLACEHOLDERS[word] is not None:
                args.append(PLACEHOLDERS[word])
            continue
        args.append(word.split("|")[0] if word.startswith("--") or "|" in word else word)
    return args


def parse(args):
    """Exit code and output of the real CLI parsing args: with --help last, click parses every option (an unknown
    one is an error) and prints help instead of running the command."""
    result = CliRunner().invoke(app, [*args, "--help"])
    return result.exit_code, result.output


COMMANDS = documented_commands()


def test_the_docs_show_the_commands_an_agent_types():
    shown = {c.split()[1] for _, c in COMMANDS if len(c.split()) > 1}
    assert {"prepare", "setup", "run", "loop", "verify", "results", "transfer", "ledger", "calibrate"} <= shown
    assert any(f == "program.md" and " run --backend " in c for f, c in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{f}:{c[:50]}" for f, c in COMMANDS])
def test_documented_command_parses(where, command):
    code, output = parse(to_args(command))
    assert code == 0, f"{where}: `{command}` does not parse:\n{output}"


def test_an_unknown_option_is_caught():
    assert parse(["run", "--no-such-option", "-m", "x"])[0] == 2
