"""Strings from outside the harness (paths, tags, descriptions an agent wrote, a server's reason phrase) as plain
text: for a terminal, for rich, and for a cell of a Markdown table.

A string an agent or a mirror chose may hold terminal escape sequences (a window title, a hidden OSC-8 link, a
cleared line) or rich markup (`[/red]` raises MarkupError, `[link=...]` makes a link): neither may reach the
terminal as anything but the characters it shows.
"""

import re
import unicodedata

from rich.markup import escape as _escape_markup
from rich.text import Text

# ESC- and C1-introduced sequences: CSI (ESC [ or 0x9b), the string commands OSC, DCS, SOS, PM and APC (ended by
# BEL or ST, or running to the end of the text), then any other two-character escape
_SEQUENCE = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
                       r"|(?:\x1b[\]P X^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
                       r"|\x1b[\s\S]?")
_SPACES = re.compile(r"[\t\n\r\v\f]")


def _shown(char):
    """Whether a character left after the sequences are gone is one a terminal shows: not a control (Cc), and not
    a format character that reorders or hides text (bidi overrides and isolates, Cf), and not half of a surrogate
    pair (Cs: no encoding can write one alone)."""
    return unicodedata.category(char) not in ("Cc", "Cf", "Cs") or char == "\u200d"  # ZWJ joins emoji


def plain(text):
    """text with escape sequences and control characters removed, line breaks and tabs as spaces: one line."""
    text = _SPACES.sub(" ", _SEQUENCE.sub("", str(text)))
    return "".join(c for c in text if _shown(c))


def markup(text):
    """plain(text) safe inside a rich markup string: its brackets print as brackets."""
    return _escape_markup(plain(text))


def text(value):
    """plain(value) as a rich Text: for table cells and anything rich would otherwise parse as markup."""
    return Text(plain(value))


# backslash escapes for what opens emphasis, code, links, images, strikethrough and autolinks (`http:`, `www.`); an
# underscore inside a word opens nothing (MATRIX_LR stays as it is)
_MD_SPECIAL = re.compile(r"[\\`*\[\]|~:]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|(?<=www)\.", re.IGNORECASE)


def md_cell(value):
    """value as literal text in a Markdown table cell (or any inline Markdown): plain, no HTML, emphasis, link,
    image or code, and no `|` that breaks the row. `<` and `&` become entities, so no renderer sees a tag."""
    escaped = plain(value).replace("&", "&amp;").replace("<", "&lt;")
    return _MD_SPECIAL.sub(lambda m: "\\" + m[0], escaped)
