"""Text for people: untrusted strings made safe to print, tables, validation problems.

One helper each for what the agent, the controller, hnvctl, the lab and the benchmarks
all print:

- `printable(text)`: text that came from elsewhere (a host's status, a kernel link
  name, a fabric object's description) with every control character, escape sequence
  start, bidirectional override and line separator shown escaped (`\\x1b`, `\\u202e`),
  so it can never move the cursor, retitle the window, hide output or reorder a line;
- `format_table(headers, rows)`: aligned columns under a header and a dashes line, the
  PowerShell Format-Table look; every cell goes through `printable`;
- `validation_problems(errors)` / `describe_validation_error(exc)`: pydantic's errors as
  `(field path, reason)` pairs and 'field.path: reason' lines a person can act on.

It imports nothing from the rest of the project (the agent must not import the
controller; both import this), and it prints nothing itself.
"""

from __future__ import annotations

import re
import reprlib
import unicodedata
from typing import Any, Callable, Iterable, Sequence

from pydantic import ValidationError

# --- escaping ------------------------------------------------------------------------------

# Cc: C0/C1 controls and DEL (ESC starts every terminal escape sequence, CSI/OSC are
# C1); Cf: format characters, among them the bidirectional overrides and isolates
# (U+202A..U+202E, U+2066..U+2069) and zero-width characters; Zl/Zp: line and paragraph
# separators; Cs: lone surrogates (undecodable bytes).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: object) -> str:
    """`text` with every character a terminal would act on shown escaped, the rest as is.

    'CON-HyperV6\\x1b[2K\\rInSync' prints as the 25 characters `CON-HyperV6\\x1b[2K\\rInSync`,
    U+202E as `\\u202e`. Ordinary letters of any script stay readable.
    """
    text = str(text)
    if text.isprintable():  # the common case, in C
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)


# --- tables ------------------------------------------------------------------------------------


def format_table(
    headers: Sequence[str] | None,
    rows: Iterable[Sequence[Any]],
    *,
    gap: str = " ",
    rule_gap: str | None = None,
    rule_under_header_only: bool = True,
    indent: str = "",
    cell: Callable[[Any], str] = str,
    empty: str | None = None,
) -> str:
    """Rows as aligned text columns: header, a dashes line, one line per row.

    `cell` turns a value into text (then `printable` makes it safe); trailing spaces are
    cut. The dashes are as long as each header (Format-Table) or, with
    `rule_under_header_only=False`, as wide as each column, joined with `rule_gap`
    (`" | "` columns ruled with `"-+-"`). Without `headers` there is no header nor rule.
    `empty`, if given, is the whole table when there are no rows.
    """
    cells = [[printable(cell(value)) for value in row] for row in rows]
    if not cells and empty is not None:
        return empty
    heads = [printable(h) for h in headers] if headers is not None else []
    columns = max([len(heads)] + [len(line) for line in cells])
    widths = [max([len(heads[i]) if i < len(heads) else 0] + [len(line[i]) for line in cells if i < len(line)])
              for i in range(columns)]

    def line(values: list[str], joiner: str) -> str:
        return (indent + joiner.join(v.ljust(w) for v, w in zip(values, widths))).rstrip()

    out = []
    if headers is not None:
        out.append(line(heads, gap))
        rule = ["-" * (len(h) if rule_under_header_only else w) for h, w in zip(heads, widths)]
        out.append(line(rule, rule_gap if rule_gap is not None else gap))
    out += [line(values, gap) for values in cells]
    return "\n".join(out)


# --- validation problems ---------------------------------------------------------------------

# A model-level check names its own field at the start of its message
# ('nics: a NIC is listed twice', 'virtualSwitch.nics[0]: ...'); that name is nested
# into the error's location.
_LEADING_FIELD = re.compile(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*): ")
# Where a request error was found, not which field: not part of the field path.
_REQUEST_PARTS = frozenset({"body", "query", "path", "header", "cookie"})
_RANGE_ERRORS = frozenset({"less_than_equal", "greater_than_equal", "less_than", "greater_than"})
_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 60  # a hostile 10 MB value is not echoed back


def snake_to_camel(path: str) -> str:
    """'subnet_vlans[0].vlan_id' -> 'subnetVlans[0].vlanId' (a document's keys)."""
    return re.sub(r"[a-z0-9]+(?:_[a-z0-9]+)+", lambda m: re.sub(r"_([a-z0-9])", lambda c: c.group(1).upper(),
                                                               m.group(0)), path)


def validation_problems(
    errors: ValidationError | Iterable[dict[str, Any]], prefix: str = "", camel: bool = False
) -> list[tuple[str | None, str]]:
    """(field path, reason) for each of pydantic's errors.

    The path is `prefix` plus the error's location ('vmNetworks[2].subnets[0].prefix'
    with `camel`, for a document in camelCase); a request's 'body'/'query' parts are
    dropped. The reason is what a person acts on: 'unknown field', 'is required',
    '5000 is out of range: input should be less than or equal to 4094',
    "'gre': Input should be 'nvgre' or 'vxlan'" (the value given, bounded in length).
    """
    if isinstance(errors, ValidationError):
        errors = errors.errors(include_url=False)
    problems: list[tuple[str | None, str]] = []
    for error in errors:
        field = prefix
        for part in error.get("loc", ()):
            if not field and part in _REQUEST_PARTS:
                continue
            field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
        reason = str(error.get("msg", "invalid"))
        for known in ("Value error, ", "Assertion failed, "):
            reason = reason.removeprefix(known)
        kind, given = error.get("type", ""), error.get("input")
        if kind == "extra_forbidden":
            reason = "unknown field"
        elif kind == "missing":
            reason = "is required"
        elif kind in _RANGE_ERRORS:
            value = _shown.repr(given)[1:-1] if isinstance(given, str) else _shown.repr(given)
            reason = f"{value} is out of range: {reason[:1].lower()}{reason[1:]}"
        elif kind not in ("value_error", "assertion_error") and given is not None and not isinstance(given, (dict, list)):
            reason = f"{_shown.repr(given)}: {reason}"
        match = _LEADING_FIELD.match(reason)
        if match:
            inner, reason = match.group(1), reason[match.end():]
            field = f"{field}.{inner}" if field else inner
        if camel and field:
            field = snake_to_camel(field)
        problems.append((field or None, reason))
    return problems


def describe_validation_error(exc: ValidationError, prefix: str = "", camel: bool = False) -> list[str]:
    """pydantic's errors as 'field.path: reason' lines (see `validation_problems`)."""
    return [f"{field}: {reason}" if field else reason for field, reason in validation_problems(exc, prefix, camel)]
