"""The summary block every train.py prints at the end, beside the checkpoint it saves. No val_bpb: the harness
scores the checkpoint itself (autoresearch/evaluate.py); a block that still has one parses."""

import math

NUMERIC = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "tokens_per_sec",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "seed", "budget_seconds",
)
REQUIRED = ("training_seconds", "total_seconds", "peak_vram_mb", "total_tokens_M",
            "num_steps", "num_params_M", "depth", "backend", "device", "eval_profile")


def parse_summary(text):
    """Fields of the last `---` block in a run's output; None when there is no complete block."""
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
            try:
                value = float(value)
            except ValueError:
                return None
            if key in ("num_steps", "depth", "seed") and math.isfinite(value):
                value = int(value)
        fields[key] = value
    if any(k not in fields for k in REQUIRED):
        return None
    return fields

