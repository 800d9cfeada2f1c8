"""Intake: which documents the agent holds, and the state file on disk."""

from __future__ import annotations

import json
import os

import pytest

from agent.intake import StateFileError, StateStore, Verdict, decide
from agent.state import parse_host_state
from tests.lib.sample_states import host_state, with_bad_record_ca


def held(generation: int = 5):
    return parse_host_state(host_state("h1", generation))


def test_first_valid_document_is_accepted():
    decision = decide(host_state("h1", 1), host="h1", held=None)
    assert decision.verdict is Verdict.accepted
    assert decision.state.generation == 1


def test_newer_generation_is_accepted():
    decision = decide(host_state("h1", 6, ca="192.168.0.20"), host="h1", held=held(5))
    assert decision.verdict is Verdict.accepted


def test_older_generation_is_stale_even_when_valid():
    decision = decide(host_state("h1", 4), host="h1", held=held(5))
    assert decision.verdict is Verdict.stale
    assert decision.state is None


def test_older_invalid_generation_is_stale_not_an_error():
    decision = decide(with_bad_record_ca(host_state("h1", 1), 3), host="h1", held=held(5))
    assert decision.verdict is Verdict.stale


def test_same_generation_same_content_is_unchanged():
    assert decide(host_state("h1", 5), host="h1", held=held(5)).verdict is Verdict.unchanged


def test_same_generation_other_content_is_refused_naming_generation():
    decision = decide(host_state("h1", 5, ca="192.168.0.77"), host="h1", held=held(5))
    assert decision.verdict is Verdict.refused
    assert decision.problems[0].startswith("generation: generation 5 is already held")


def test_invalid_document_is_refused_with_field_and_reason():
    decision = decide(with_bad_record_ca(host_state("h1", 5), 6), host="h1", held=held(5))
    assert decision.verdict is Verdict.refused
    assert decision.generation == 6
    assert decision.problems == [
        "records[0].ca: lookup record 172.16.0.9 in VSID 3535905 is outside the prefix 192.168.0.0/24"
    ]


def test_document_for_another_host_is_refused():
    decision = decide(host_state("h2", 9), host="h1", held=held(5))
    assert decision.verdict is Verdict.refused
    assert decision.problems == ["host: the document is for host h2, this agent is h1"]


@pytest.mark.parametrize("document", [None, {}, "", b"", "not json", [], {"generation": 7}])
def test_empty_or_garbage_is_refused_never_accepted(document):
    decision = decide(document, host="h1", held=held(5))
    assert decision.verdict is Verdict.refused
    assert decision.problems


def test_store_round_trip_and_no_temporary_left(tmp_path):
    store = StateStore(tmp_path / "state")
    assert store.load(host="h1") is None
    store.save(held(3))
    assert store.load(host="h1") == held(3)
    store.save(held(4))
    assert store.load(host="h1").generation == 4
    assert os.listdir(store.directory) == ["state.json"]
    assert oct(store.path.stat().st_mode & 0o777) == oct(0o600)


def test_store_refuses_a_corrupt_file_naming_it(tmp_path):
    store = StateStore(tmp_path)
    store.path.write_text('{"host": "h1", "generation": ')
    with pytest.raises(StateFileError, match=str(store.path)):
        store.load(host="h1")


def test_store_refuses_another_hosts_file(tmp_path):
    store = StateStore(tmp_path)
    store.path.write_text(json.dumps(host_state("h2", 1)))
    with pytest.raises(StateFileError, match="holds the state of host h2, not h1"):
        store.load(host="h1")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.save(held(3))

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        store.save(held(4))
    monkeypatch.undo()
    assert store.load(host="h1").generation == 3
    assert os.listdir(tmp_path) == ["state.json"]


def in_fabric(document: dict, fabric: str | None) -> dict:
    return {**document, "fabric": fabric}


def held_in(fabric: str | None, generation: int = 5):
    return parse_host_state(in_fabric(host_state("h1", generation), fabric))


def test_an_older_generation_of_another_fabric_is_accepted():
    """A controller rebuilt on a new store starts again at generation 1."""
    decision = decide(in_fabric(host_state("h1", 1, ca="192.168.0.20"), "b" * 32), host="h1", held=held_in("a" * 32, 9))
    assert decision.verdict is Verdict.accepted
    assert (decision.state.generation, decision.state.fabric) == (1, "b" * 32)


def test_an_older_generation_of_the_same_fabric_is_still_stale():
    decision = decide(in_fabric(host_state("h1", 1), "a" * 32), host="h1", held=held_in("a" * 32, 9))
    assert decision.verdict is Verdict.stale


def test_the_same_generation_of_another_fabric_with_other_content_is_accepted():
    decision = decide(in_fabric(host_state("h1", 5, ca="192.168.0.77"), "b" * 32), host="h1", held=held_in("a" * 32))
    assert decision.verdict is Verdict.accepted


def test_a_state_held_without_a_fabric_id_takes_one_from_the_same_state():
    """Held from before fabric ids: the same generation and content, now naming its fabric,
    is taken once (so the id is kept on disk), then it is unchanged."""
    document = in_fabric(host_state("h1", 5), "a" * 32)
    assert decide(document, host="h1", held=held_in(None)).verdict is Verdict.accepted
    assert decide(document, host="h1", held=held_in("a" * 32)).verdict is Verdict.unchanged
    # ... and older generations stay stale: a state without an id matches any fabric.
    assert decide(in_fabric(host_state("h1", 4), "a" * 32), host="h1", held=held_in(None)).verdict is Verdict.stale


def test_a_malformed_fabric_id_is_refused_naming_the_field():
    decision = decide(in_fabric(host_state("h1", 6), "a b\x1b[2J"), host="h1", held=held_in("a" * 32))
    assert decision.verdict is Verdict.refused
    assert decision.problems[0].startswith("fabric: ")
