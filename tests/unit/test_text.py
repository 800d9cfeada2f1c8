"""agent.text: escaping untrusted text, the one table printer, validation problems."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.text import describe_validation_error, format_table, printable, validation_problems


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("CON-HyperV6", "CON-HyperV6"),
        ("Größe 東京", "Größe 東京"),  # letters of any script stay readable
        ("\x1b[2K\rInSync", "\\x1b[2K\\rInSync"),  # erase the line, rewrite it
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # OSC: retitle the window
        ("a\u202eb\u2066c", "a\\u202eb\\u2066c"),  # bidi override and isolate
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("line\nnext\u2028sep", "line\\nnext\\u2028sep"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(raw, shown):
    assert printable(raw) == shown
    assert printable(raw).isprintable()


def test_tables_align_escaped_cells():
    text = format_table(["Name", "Reason"], [["a\x1b[2J", "ok"], ["longer", "\u202eevil"]])
    assert text.splitlines() == [
        "Name     Reason",
        "----     ------",
        "a\\x1b[2J ok",
        "longer   \\u202eevil",
    ]
    assert format_table(["A"], [], empty="(none)") == "(none)"
    ruled = format_table(["a", "bb"], [["xxx", "y"]], gap=" | ", rule_gap="-+-", rule_under_header_only=False)
    assert ruled.splitlines() == ["a   | bb", "----+---", "xxx | y"]


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vlan_id: int = Field(ge=1, le=4094)


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subnet_vlans: list[_Inner]
    name: str


def test_validation_problems_name_the_field_and_the_reason():
    with pytest.raises(ValidationError) as caught:
        _Outer.model_validate({"subnet_vlans": [{"vlan_id": 5000}], "colour": "x" * 10_000})
    assert validation_problems(caught.value) == [
        ("subnet_vlans[0].vlan_id", "5000 is out of range: input should be less than or equal to 4094"),
        ("name", "is required"),
        ("colour", "unknown field"),
    ]
    assert describe_validation_error(caught.value, "sites[1]", camel=True)[0] == (
        "sites[1].subnetVlans[0].vlanId: 5000 is out of range: input should be less than or equal to 4094")


def test_a_request_error_drops_where_it_was_found_and_bounds_the_value():
    error = {"loc": ("body", "items", 0, "mtu"), "msg": "Input should be a valid integer",
             "type": "int_parsing", "input": "9" * 100_000}
    ((field, reason),) = validation_problems([error])
    assert field == "items[0].mtu"
    assert reason.endswith(": Input should be a valid integer") and len(reason) < 120
