"""logfmt values: one place that turns any text into one safe ``key=value`` value.

Owns quoting for every log line of the agent, the controller and the labs. A value is
left bare when it is a plain token, and double-quoted otherwise (spaces, ``=``, quotes,
empty). Inside, ``"`` and ``\\`` are escaped, and every character that could change how
a line reads is spelled out: newlines and other control characters (C0, DEL, C1) and
Unicode format characters such as the bidirectional overrides (U+202E) become ``\\n``,
``\\t``, ``\\x1b``, ``\\u202e``. So a hostile name (a host, a VM, a status message) can
neither forge a second log line nor rewrite the terminal it is shown on.

Hand-written because the logging libraries on offer either do not escape control
characters (python-logfmter) or escape every non-ASCII letter (``json.dumps``), which
makes legitimate names unreadable. Pure: no imports from the rest of the project.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Categories spelled out as escapes: control (Cc), format (Cf: bidi overrides, zero-width
# joiners...), line and paragraph separators (Zl, Zp), unassigned and surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cn", "Cs"})


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if unicodedata.category(char) in _UNSAFE_CATEGORIES:
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return char


def escape(text: str) -> str:
    """``text`` with quotes, backslashes and unsafe characters escaped (no quotes added)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case, without a per-character walk
    return "".join(_escape_char(char) for char in text)


def quote(value: object) -> str:
    """``value`` as one logfmt value: bare when it is a plain token, else quoted and escaped.

    >>> quote("hnvt1a2b"), quote("no such device"), quote('a"b\\nlevel=error')
    ('hnvt1a2b', '"no such device"', '"a\\\\"b\\\\nlevel=error"')
    """
    text = str(value)
    escaped = escape(text)
    if text and escaped == text and not any(c in text for c in " ="):
        return text
    return f'"{escaped}"'
