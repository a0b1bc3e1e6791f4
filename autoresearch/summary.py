"""The output contract of every train.py: a progress line per optimizer step, and the summary block it prints at
the end, beside the checkpoint it saves. No val_bpb: the harness scores the checkpoint itself
(autoresearch/evaluate.py); a block that still has one parses."""

import math
import re

NUMERIC = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "tokens_per_sec",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "seed", "budget_seconds",
    "compile_seconds", "recompiles", "graph_breaks",  # cuda/train.py where it compiles
)
INTEGER = ("num_steps", "depth", "seed", "recompiles", "graph_breaks")
# A number train.py printed that is not one, and in the ledger any number the harness did not get (its
# MISSING_NUMBER): NaN, written "nan". One object, so that rows read twice compare equal (NaN equals only itself).
MISSING = math.nan
REQUIRED = ("training_seconds", "total_seconds", "peak_vram_mb", "total_tokens_M",
            "num_steps", "num_params_M", "depth", "backend", "device", "eval_profile")

# `step 00042 (14.0%) | loss: 3.2 | lrm: 1.00 | dt: 120ms | tok/sec: 8,192 | ... | remaining: 42s`
STEP_LINE = re.compile(r"^step (?P<step>\d+)(?: \((?P<percent>[\d.]+)%\))?")
STEP_FIELDS = {"loss": "loss", "tok/sec": "tokens_per_sec", "remaining": "remaining_seconds"}


def parse_step(line):
    """A progress line's numbers ({step, percent, loss, tokens_per_sec, remaining_seconds}, those it has), or
    None for any other line. Agent-written: a field that does not parse is left out, never raised on."""
    match = STEP_LINE.match(line)
    if not match:
        return None
    fields = {"step": int(match["step"])}
    if match["percent"]:
        fields["percent"] = float(match["percent"])
    for part in line.split("|")[1:]:
        key, _, value = part.partition(":")
        name = STEP_FIELDS.get(key.strip())
        try:
            number = float(value.strip().rstrip("s").replace(",", ""))
        except ValueError:
            continue
        if name and math.isfinite(number):
            fields[name] = number
    return fields


def number(text):
    """A summary field's number, or MISSING (NaN) where it is not a finite number: "nan", "inf", "fast" or "1e999"
    from an agent's train.py says nothing the ledger can hold, and must not stop the row being written."""
    try:
        value = float(text)
    except ValueError:
        return MISSING
    return value if math.isfinite(value) else MISSING


def parse_summary(text):
    """Fields of the last `---` block in a run's output; None when there is no complete block (a required key
    absent). A numeric field that is not a finite number is there but MISSING: the harness scores the checkpoint
    and times the run itself, so the summary's numbers are a record, and a bad one is recorded as missing."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return None
    fields = {}
    for line in lines[starts[-1] + 1 :]:
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or " " in key.strip():
            continue
        key, value = key.strip(), value.strip()
        if key in NUMERIC:
            value = number(value)
            if key in INTEGER and value is not MISSING:
                value = int(value)
        fields[key] = value
    if any(k not in fields for k in REQUIRED):
        return None
    return fields

