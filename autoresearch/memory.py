"""The run's memory in every prompt: the kept path from the baseline, every experiment grouped by what it changed
(a dead end tried three times shows as one), the near-misses inside the noise floor and the crashes with their
reasons. Bounded: past the cap, the oldest experiments are told more briefly, then only counted."""

import math
import re
from dataclasses import dataclass, field

MEMORY_CHARS = 12_000  # the memory's share of a prompt; program.md and the agent's notes come on top
MAX_LISTED = 10  # near-misses and crashes listed (the latest); the groups count every one
MAX_KEPT = 25  # keeps listed one a line (the latest); earlier ones summed up in one line
SHORT = 120  # characters of a description in the lists
CHANGE = re.compile(r"\b([A-Z][A-Z0-9_]{2,})\s+(\S+)\s*->\s*([^,\s]+)")  # "NAME old -> new", as the harness says
SET = re.compile(r"\b([A-Z][A-Z0-9_]{2,})\s*(?:=|\bto\b)\s*[-+(\d.]")  # "NAME = new", "MATRIX_LR to 0.05", as an agent may
MARKS = re.compile(r"\s*\[slowed by the machine:[^\]]*\]")  # the ledger's long note on a slowed run


@dataclass(frozen=True)
class Facts:
    """What the memory is made of."""
    rows: tuple  # the run branch's experiment rows in order, its baseline first (no verify rows)
    sigma: float | None = None  # the noise floor: the run-to-run spread of the baseline's seeds
    changed: dict = field(default_factory=dict)  # commit -> names of the constants its edit changed (turn records)
    results: dict = field(default_factory=dict)  # commit -> the harness's closing line for it (turn records)


@dataclass(frozen=True)
class _Try:
    row: object
    group: str
    gain: float | None  # over the best kept before it; positive is better
    age: int  # 0: the oldest


def _clean(text, limit=SHORT):
    text = MARKS.sub(" [slowed]", text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _group(row, changed):
    """What a try changed: the constants its edit changed (the harness's diff), else those its description names,
    else its description itself (a change outside the constant block)."""
    said = MARKS.sub("", row.description.split(" [invalid:")[0])
    names = changed.get(row.commit) or [n for n, _, _ in CHANGE.findall(said)] + SET.findall(said)
    if names:
        return ", ".join(sorted(set(names)))
    return "code: " + _clean(row.description.split(" [invalid:")[0].strip().lower(), 60)


def _tries(facts):
    """Every experiment after the baseline, with its group and its gain over the best kept before it."""
    rows = [r for r in facts.rows if r.status != "verify"]
    best = rows[0].val_bpb if rows and math.isfinite(rows[0].val_bpb) else None
    out = []
    for i, r in enumerate(rows[1:]):
        scored = r.status in ("keep", "discard") and math.isfinite(r.val_bpb)
        out.append(_Try(r, _group(r, facts.changed), best - r.val_bpb if scored and best is not None else None, i))
        if r.status == "keep" and scored:
            best = r.val_bpb if best is None else min(best, r.val_bpb)
    return out


def _outcome(t, facts):
    r = t.row
    if r.status in ("keep", "discard") and math.isfinite(r.val_bpb):
        return f"{r.status} {r.val_bpb:.6f}" + (f" ({-t.gain:+.6f} vs best then)" if t.gain is not None else "")
    why = facts.results.get(r.commit, "")
    reason = re.search(r"RESULT \w+ \((.*?)\); log tail", why)
    return r.status + (f" ({_clean(reason[1], 160)})" if reason and r.status == "crash" else "")


def _brief(t):
    """A try in a few words: the values it set (else its description cut short, unless its group is named by
    it), and how it ended."""
    values = [f"{n}={v}" for n, _, v in CHANGE.findall(t.row.description)]
    what = ", ".join(values) if values else "" if t.group.startswith("code: ") else _clean(t.row.description, 40)
    return " ".join(filter(None, [what, t.row.status, f"{-t.gain:+.4f}" if t.gain is not None else ""]))


def _kept_path(rows):
    kept = [r for r in rows if r.status == "keep" and math.isfinite(r.val_bpb)]
    if not kept:
        return []
    lines = ["Kept path from the baseline (each keep and its gain over the keep before):",
             f"- {kept[0].commit} baseline val_bpb {kept[0].val_bpb:.6f}"]
    shown = kept[1:][-MAX_KEPT:]
    earlier = kept[1: len(kept) - len(shown)]
    if earlier:
        lines.append(f"- {len(earlier)} earlier keeps, {kept[0].val_bpb - earlier[-1].val_bpb:+.6f} in all "
                     f"(to {earlier[-1].val_bpb:.6f})")
    before = earlier[-1] if earlier else kept[0]
    for r in shown:
        lines.append(f"- {r.commit} val_bpb {r.val_bpb:.6f} (gain {before.val_bpb - r.val_bpb:+.6f}): "
                     f"{_clean(r.description)}")
        before = r
    return lines


def _groups(tries, facts, shown):
    """The groups section; shown(t) is 2 (a line of its own), 1 (a few words) or 0 (only counted)."""
    groups = {}
    for t in tries:
        groups.setdefault(t.group, []).append(t)
    lines = ["Every experiment, grouped by what it changed (most tried first; outcomes oldest first):"]
    for name, members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[1][0].age)):
        counts = {s: sum(t.row.status == s for t in members) for s in ("keep", "discard", "crash", "invalid")}
        said = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        dead = " - a dead end so far" if len(members) >= 3 and not counts["keep"] else ""
        lines.append(f"- {name}: {len(members)} {'try' if len(members) == 1 else 'tries'} ({said}){dead}")
        brief = [_brief(t) for t in members if shown(t) == 1]
        uncounted = sum(shown(t) == 0 for t in members)
        if uncounted:
            lines.append(f"  - {uncounted} older {'try' if uncounted == 1 else 'tries'} not listed")
        if brief:
            lines.append("  - " + "; ".join(brief))
        lines += [f"  - {t.row.commit} {_outcome(t, facts)}: {_clean(t.row.description)}"
                  for t in members if shown(t) == 2]
    return lines


def _listed(title, tries, facts, line):
    if not tries:
        return []
    shown = tries[-MAX_LISTED:]
    more = f" ({len(tries) - len(shown)} earlier not listed)" if len(tries) > len(shown) else ""
    return ["", f"{title}{more}:"] + [line(t) for t in shown]


def render(facts, cap=MEMORY_CHARS):
    """The memory as prompt text of at most cap characters."""
    tries = _tries(facts)
    head = [f"## The run so far: {len(tries)} experiment{'' if len(tries) == 1 else 's'} after the baseline", ""]
    if facts.sigma is not None:
        head.append(f"Noise floor: val_bpb varies by {facts.sigma:.6f} (one standard deviation) between seeds of "
                    "one program; a gain inside it is luck as often as not.")
    head += [""] + _kept_path(facts.rows)
    near = [t for t in tries if t.row.status == "discard" and t.gain is not None and facts.sigma is not None
            and t.gain > -facts.sigma]
    tail = _listed("Near-misses, within the noise floor of the best then (worth combining or retrying bigger)", near,
                   facts, lambda t: f"- {t.row.commit} {_outcome(t, facts)}: {_clean(t.row.description)}")
    broken = [t for t in tries if t.row.status in ("crash", "invalid", "lost")]
    tail += _listed("Crashes and invalid runs", broken, facts,
                    lambda t: f"- {t.row.commit} {_outcome(t, facts)}: {_clean(t.row.description, 200)}")

    def text(demoted):
        def shown(t):
            return 2 - (t.age < demoted) - (t.age < demoted - len(tries))
        return "\n".join(head + [""] + (_groups(tries, facts, shown) if tries else []) + tail)

    low, high = 0, 2 * len(tries)  # the fewest oldest tries told briefly (then only counted) that fit
    if len(text(0)) > cap:
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if len(text(mid)) <= cap else (mid + 1, high)
    out = text(low)
    return out if len(out) <= cap else out[: cap - 40].rstrip() + "\n[memory cut at its cap]"
