"""Log values (agent.logfmt): a hostile name stays one value on one line."""

from __future__ import annotations

import logging

import pytest

from agent.daemon import _LogfmtFormatter
from agent.logfmt import quote


@pytest.mark.parametrize(("value", "shown"), [
    ("hnvt1a2b3c", "hnvt1a2b3c"),
    ("TenantVM01", "TenantVM01"),
    ("Ünïcødé", "Ünïcødé"),
    ("no such device", '"no such device"'),
    ("", '""'),
    ("a=b", '"a=b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("C:\\path", '"C:\\\\path"'),
    ("tab\there", '"tab\\there"'),
    ("\x1b]0;owned\x07", '"\\x1b]0;owned\\x07"'),
    ("evil\u202eexe.txt", '"evil\\u202eexe.txt"'),
    ("del\x7f c1\x9b", '"del\\x7f c1\\x9b"'),
])
def test_values_are_bare_or_quoted_and_escaped(value, shown):
    assert quote(value) == shown


def test_a_hostile_name_cannot_forge_a_log_line():
    hostile = 'vm1" level=error msg="forged\nts=2030-01-01T00:00:00Z level=info event=all_good'
    record = logging.LogRecord("agent.daemon", logging.WARNING, __file__, 1,
                               "event=object_error object=%s", (quote(hostile),), None)
    line = _LogfmtFormatter().format(record)
    assert "\n" not in line
    # One object= value, ending where the line ends: the quote inside is escaped.
    value = line.split(" object=", 1)[1]
    assert value.startswith('"') and value.endswith('"')
    assert '"' not in value[1:-1].replace('\\"', "")
