"""`hnvctl apply -f fabric.yaml [-f more.yaml] [--dry-run] [--prune]`: the apply client.

The controller applies a fabric document as one transaction (`POST /v1/fabric/apply`);
this side does only what a client must: read the files ('-' is stdin), parse the YAML
(a key given twice refused, errors with file, line and column), join several files
into one document (their sections' lists, in file order) and send it in ONE request.
The controller validates it, plans it against the fabric and runs it all or nothing.

Its answer names document locations of the joined document (`vms[5]`); they are
turned back into the file that stated them (`seed-tenants.yaml: vms[1]`) before
anything is printed. `apply_fabric(client, read_documents([...]))` is the same,
in-process, for the lab and the tests.

Owns files and YAML; the rules and the plan are the controller's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from controller.client import ApiRefused, ControllerClient
from controller.fabric_document import SECTIONS, YamlError, is_extension, load_yaml
from controller.hnvctl.flags import EXIT_OK, UsageError

_LOCATION = re.compile(r"\b(" + "|".join(SECTIONS) + r")\[(\d+)\]")


@dataclass
class Documents:
    """Fabric files joined into the one document the controller takes."""

    sources: list[str] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)
    # For each section, the (file, index in that file) of each item of the joined list.
    origins: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def add(self, source: str, raw: Any) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UsageError(f"{source}: the document must be a mapping of sections ({', '.join(SECTIONS)})")
        self.sources.append(source)
        for section, items in raw.items():
            if is_extension(section):
                continue  # YAML anchors' home: already expanded where they are used
            if items is None:
                continue
            if not isinstance(items, list):
                if len(self.sources) == 1 and section not in self.body:
                    self.body[section] = items  # one file: the controller names the problem
                    continue
                raise UsageError(f"{source}: {section}: must be a list, got {type(items).__name__}")
            joined = self.body.setdefault(section, [])
            if not isinstance(joined, list):
                raise UsageError(f"{self.sources[0]}: {section}: must be a list, got {type(joined).__name__}")
            self.origins.setdefault(section, []).extend((source, i) for i in range(len(items)))
            joined.extend(items)

    @property
    def label(self) -> str:
        return ", ".join(self.sources)

    def locate(self, text: str, files: bool = True) -> str:
        """Document locations of the joined document, back in their files:
        'vms[5] (TenantVM02): ...' -> 'seed-tenants.yaml: vms[1] (TenantVM02): ...'.
        A message that starts with no location is prefixed with the files. Without
        `files`, only the indexes are turned back (a field path: 'vms[1].host')."""

        def back(match: re.Match[str]) -> str:
            section, index = match.group(1), int(match.group(2))
            origins = self.origins.get(section, [])
            if index >= len(origins):
                return match.group(0)
            source, own = origins[index]
            return f"{source}: {section}[{own}]" if files else f"{section}[{own}]"

        if _LOCATION.match(text) or not files:
            return _LOCATION.sub(back, text)
        return f"{self.label}: {_LOCATION.sub(back, text)}"


def read_documents(paths: list[str], stdin: TextIO | None = None) -> Documents:
    """Read and parse every file ('-' is stdin) into one document."""
    documents = Documents()
    for path in paths:
        source = "stdin" if path == "-" else path
        try:
            text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        try:
            documents.add(source, load_yaml(text))
        except YamlError as exc:
            raise UsageError(f"{source}: {exc}") from None
    return documents


def apply_fabric(client: ControllerClient, documents: Documents, *, dry_run: bool = False,
                 prune: bool = False) -> list[dict[str, Any]]:
    """Make the controller hold the documents, in one request; the changes (to be) made.

    Each change is the controller's `{op, kind, key, path, fields, summary}` (path back
    in its file: `seed-tenants.yaml: vms[1]`). A refusal raises ApiRefused with its
    locations in the files; nothing changed.
    """
    body = json.loads(json.dumps(documents.body, default=str))  # YAML dates, sets... as text
    try:
        answer = client.apply_fabric(body, dry_run=dry_run, prune=prune)
    except ApiRefused as exc:
        raise ApiRefused(exc.status, documents.locate(exc.error),
                         documents.locate(exc.field, files=False) if exc.field else exc.field, exc.reason) from None
    changes = answer.get("changes", []) if isinstance(answer, dict) else []
    for change in changes:
        if change.get("path"):
            change["path"] = documents.locate(change["path"])
    return changes


def cmd_apply(ctx, args: argparse.Namespace) -> int:
    documents = read_documents(args.file)
    changes = apply_fabric(ctx.client, documents, dry_run=args.dry_run, prune=args.prune)
    if ctx.out.fmt == "json":
        ctx.out.json({"dry_run": args.dry_run, "prune": args.prune, "applied": not args.dry_run, "changes": changes})
        return EXIT_OK
    for change in changes:
        ctx.out.say(change["summary"])
    if not changes:
        ctx.out.say(f"no changes: the fabric already matches {documents.label}")
    elif args.dry_run:
        count = {op: sum(change["op"] == op for change in changes) for op in ("create", "update", "delete")}
        ctx.out.say(f"dry run: {count['create']} to create, {count['update']} to update, "
                    f"{count['delete']} to delete; nothing changed")
    else:
        ctx.out.say(f"applied {len(changes)} changes from {documents.label}")
    return EXIT_OK
