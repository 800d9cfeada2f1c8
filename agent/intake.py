"""Intake: decide whether a state document from the controller is held, and keep it on disk.

This module owns two things:

- the *decision* (pure): given the document just received and the state the agent holds,
  accept it, refuse it (with one "field: reason" line per problem), or ignore it as stale
  or already held. Rules: the document must validate (``agent.state.parse_host_state``),
  must be addressed to this host, and must not be older than what is held; the same
  generation with different content is refused, because generations only grow when the
  content changes and a controller that says otherwise is not to be trusted blindly.
  Generations are compared only within one fabric: a document whose ``fabric`` id differs
  from the held state's (a controller rebuilt or restored onto a new store) is taken
  whatever its generation, once it validates.
- the *last accepted state on disk*, written atomically (temporary file, fsync, rename,
  fsync of the directory) so that a crash at any instant leaves either the previous or
  the new document, never a torn one. A restart with the controller down reads it back.

It never touches the kernel and never talks to the controller. An empty, undecodable or
refused document changes nothing: intake has no way to say "delete everything" except
a valid, newer, explicitly empty HostState.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.state import HostState, StateError, parse_host_state

log = logging.getLogger(__name__)

STATE_FILE_NAME = "state.json"


class Verdict(StrEnum):
    accepted = "accepted"  # newer and valid: persist, then apply
    unchanged = "unchanged"  # the generation already held, same content: nothing to do
    stale = "stale"  # older than what is held: never applied
    refused = "refused"  # invalid, for another host, or a generation reused with new content


@dataclass(frozen=True)
class IntakeDecision:
    verdict: Verdict
    generation: int | None  # the document's generation, when it could be read at all
    state: HostState | None = None  # set when accepted
    problems: list[str] = field(default_factory=list)  # "field: reason", when refused

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


def _claimed(document: Any) -> tuple[int | None, str | None]:
    """The generation and fabric id a document claims, even if the rest of it is invalid."""
    if isinstance(document, (bytes, str)):
        try:
            document = json.loads(document)
        except ValueError:
            return None, None
    if not isinstance(document, dict):
        return None, None
    generation, fabric = document.get("generation"), document.get("fabric")
    return (generation if isinstance(generation, int) and not isinstance(generation, bool) else None,
            fabric if isinstance(fabric, str) else None)


def from_another_fabric(fabric: str | None, held: HostState | None) -> bool:
    """Does a document of ``fabric`` come from another fabric than the state held?

    Generations count within one fabric (agent.state's docstring): a controller rebuilt
    on a new store starts again at 1, and an agent comparing generations alone would
    ignore it for ever. A state held without a fabric id (written before ids existed)
    matches any."""
    return held is not None and held.fabric is not None and fabric is not None and fabric != held.fabric


def decide(document: Any, *, host: str, held: HostState | None) -> IntakeDecision:
    """Accept, refuse or ignore one document against the state held (pure)."""
    claimed, fabric = _claimed(document)
    new_fabric = from_another_fabric(fabric, held)
    # A stale document is ignored before it is validated: an old generation is never
    # applied, whether or not it was valid, and refusing it would report a false error.
    if held is not None and not new_fabric and claimed is not None and claimed < held.generation:
        return IntakeDecision(Verdict.stale, claimed)
    if document is None or document == {} or document in (b"", ""):
        return IntakeDecision(Verdict.refused, claimed, problems=["state: the document is empty"])
    try:
        state = parse_host_state(document)
    except StateError as exc:
        return IntakeDecision(Verdict.refused, claimed, problems=list(exc.problems))
    if state.host != host:
        return IntakeDecision(
            Verdict.refused,
            state.generation,
            problems=[f"host: the document is for host {state.host}, this agent is {host}"],
        )
    if held is not None and not new_fabric and state.generation == held.generation:
        if state.content_digest() != held.content_digest():
            return IntakeDecision(
                Verdict.refused,
                state.generation,
                problems=[
                    f"generation: generation {state.generation} is already held with "
                    "different content; a changed state needs a new generation"
                ],
            )
        if state.fabric == held.fabric:
            return IntakeDecision(Verdict.unchanged, state.generation)
        # The same state, now naming its fabric (held from before fabric ids): taken, so
        # that the id is on disk from now on.
    return IntakeDecision(Verdict.accepted, state.generation, state=state)


class StateFileError(Exception):
    """The state file exists but cannot be used; the message names the file and why."""


class StateStore:
    """The last accepted HostState of one host, in ``<state_dir>/state.json``."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.directory = Path(state_dir)
        self.path = self.directory / STATE_FILE_NAME

    def load(self, *, host: str) -> HostState | None:
        """The state on disk, None if there is none; StateFileError if it is unusable."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            state = parse_host_state(text)
        except StateError as exc:
            raise StateFileError(f"{self.path}: {exc}") from None
        if state.host != host:
            raise StateFileError(f"{self.path}: holds the state of host {state.host}, not {host}")
        return state

    def save(self, state: HostState) -> None:
        """Write atomically: the file is the old document or the new one, never a mix.

        Why this order: the data must be on disk (fsync of the temporary file) before the
        rename makes it the state file, otherwise a power cut after the rename can leave
        an empty file under the real name; the rename itself is durable only once the
        directory is fsynced.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = json.dumps(state.model_dump(mode="json"), indent=1, sort_keys=True).encode()
        tmp = self.path.with_name(f".{STATE_FILE_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
