"""Any text as one line for a person: whitespace collapsed, and a long one cut in the middle.

The middle, because what failed comes first and the cause and what to do come last (a
solver's explanation ends with the conflict, a refusal with its advice).
"""

from __future__ import annotations

_CUT = " [...] "


def one_line(value: object, max_chars: int) -> str:
    """``value``'s text on one line, at most ``max_chars`` long: its first half and its end."""
    text = " ".join(str(value).split())
    if len(text) <= max_chars:
        return text
    head = (max_chars - len(_CUT)) // 2
    tail = max_chars - len(_CUT) - head
    return text[:head] + _CUT + text[-tail:]
