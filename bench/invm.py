"""A bench section's measurement run inside the lab VM, for kernels that lack the lab's features.

Owns the round trip: ``python -m <module> --in-vm ARGS`` booted with ``netns_lab.vm``,
the figures the module writes as JSON into the VM's shared directory
(`write_figures`), and the module's progress lines handed to the caller's log. Measures
nothing itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def figures_from_vm(module: str, args: list[str], result_file: str, section: str, log,
                    timeout: float, memory: str = "2G") -> tuple[dict[str, Any], bool]:
    """The figures `module` measured in the VM (of `memory`), and whether the VM had
    KVM. Lines the module printed starting with "<section>:" are passed to `log`."""
    from netns_lab import vm

    result = vm.run_in_vm([sys.executable, "-m", module, "--in-vm", *args], capture=True, timeout=timeout,
                          memory=memory)
    path = result.rwdir / result_file
    if not result.completed or result.returncode != 0 or not path.exists():
        tail = (result.output or "")[-1500:]
        shutil.rmtree(result.rwdir, ignore_errors=True)
        raise RuntimeError(f"{section} VM run failed (exit {result.returncode}): {tail}")
    figures = json.loads(path.read_text())
    for line in (result.output or "").splitlines():
        if line.startswith(f"{section}:"):
            log(line)
    shutil.rmtree(result.rwdir, ignore_errors=True)
    return figures, result.kvm


def write_figures(result_file: str, figures: dict[str, Any]) -> None:
    """Inside the VM: leave `figures` in the shared directory for figures_from_vm."""
    from netns_lab.vm import RWDIR_ENV

    Path(os.environ[RWDIR_ENV], result_file).write_text(json.dumps(figures))
