"""Make-before-break migration: the stages after the first, advanced by the controller.

A migration of a VM on a network-virtualised VM network is published in three stages,
each one committed fabric transaction:

1. `destination` (the migrate request itself, `controller.fabric.tenants`): the VM's new
   host gets its port and the current records; the source keeps its port (the VM has a
   NIC on both hosts now: a real hypervisor's VM resumes on the destination while the
   source still holds its switch port) and, like every other host of the VM network and
   the gateway hosts serving it, the previous view of the records (the VM on the
   source's PA), so peers still reach the VM through the source. Every host of the VM
   network gets the PAs of both ends as `transit` (agent.state.RoutingDomain): it
   receives from both, so the VM may answer by either NIC.
2. `peers`: once every host of the VM network and every gateway host serving it reports
   InSync (each applied its desired generation, without errors; the destination built
   the port, every peer receives from the destination), or `migration_bound` seconds
   after stage 1 was committed: every peer and gateway host gets the current records
   (the VM on the destination's PA); the source loses the port (the VM's NIC there goes)
   and its record for the VM names the destination's PA, so it forwards to the new
   location whatever peers still send it.
3. done (`Vm.migration` cleared): once every host of the VM network (the source too:
   its NIC of the VM is gone) reports InSync, or the bound passes again: `transit` goes
   and the source lets the VM network go unless it holds it for another VM (or another
   migration).

Why this order: a step may only depend on what a previous stage made and every host
reported applied. The destination's NIC exists before anyone sends to it; every host
receives from the destination before the VM can send by it; the source forwards from
the moment its NIC goes; nobody stops receiving from the source before its NIC is gone.

Why committed stages rather than holding states back in memory: with replicas on one
PostgreSQL, a host's generation and document must be the same whichever replica serves
it. A stage is an ordinary fabric write (under the store's write serialisation, after
catching up with the other replicas), so it lands in the revision log and every replica
serves it with the same generations; the condition is checked again inside the write,
so two replicas racing to advance one stage advance it once (the second finds it done
and commits nothing). The bound is measured from `VmMigration.since`, the Unix time the
stage was committed with, so every replica agrees when it passes, and a controller that
restarts mid-migration carries on from the stored stage.

Each controller runs a stepper thread (`_step_migrations`): it looks every
`STEP_INTERVAL_S` seconds, at once when an agent reports a status here or a migration is
committed here, and again right after a stage it advanced; with no migration in progress
a look costs a dictionary check under the write lock.

A rule mixin of `Fabric`; its writes go through the engine (`_run`), never the store.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from controller.fabric.common import Builders, _quoted, _Scope, log
from controller.gateways import gateway_hosts_of_network
from controller.inventory import Tx
from controller.models import MIGRATION_BOUND_S, FabricError, Kind, MigrationStage

__all__ = ["MIGRATION_BOUND_S", "STEP_INTERVAL_S", "MigrationStages"]

STEP_INTERVAL_S = 0.25  # how often the stepper looks, besides when a status arrives


class _NotDue(Exception):
    """Raised inside a stage's write when, caught up, the stage is no longer due (another
    replica advanced it, a second move or a delete replaced it): the write is undone."""


class MigrationStages(Builders):
    """Advances staged migrations; `Fabric` provides the engine, entries and statuses."""

    migration_bound: float
    _lock: threading.RLock
    _stop: threading.Event

    def _start_migration_stepper(self, bound: float, interval: float) -> None:
        self.migration_bound = bound
        self._migration_wake = threading.Event()
        self._stepper = threading.Thread(target=self._step_migrations, args=(interval,),
                                         name="migration-stepper", daemon=True)
        self._stepper.start()

    def report_status(self, host: str, generation: int, errors: list[dict], agent: str) -> Any:
        """An agent's status (`SyncStatus.report_status`), then a wake-up for the stepper:
        the destination reporting InSync is what stage 2 waits for."""
        view = super().report_status(host, generation, errors, agent)  # type: ignore[misc]
        self.wake_migration_stepper()
        return view

    def advance_migrations(self, now: float | None = None) -> list[str]:
        """Advance every migration whose next stage is due; the VMs advanced."""
        now = time.time() if now is None else now
        with self._lock:
            due = [(vm.name, vm.migration) for network in list(self.inventory.migrating)
                   for vm in self.inventory.migrations_of_network(network) if self._stage_due(vm, now)]
        advanced = []
        for name, migration in due:
            try:
                vm = self._run(lambda tx, name=name, migration=migration: self._advance_migration(tx, name, migration,
                                                                                                  now),
                               f"advance migration of vms {name} past stage {migration.stage}")  # type: ignore[attr-defined]
            except _NotDue:
                continue
            log.info("event=migration_stage vm=%s source=%s destination=%s stage=%s waited_s=%.2f", _quoted(name),
                     _quoted(migration.source), _quoted(vm.host), vm.migration.stage if vm.migration else "done",
                     now - migration.since)
            advanced.append(name)
        return advanced

    def _stage_due(self, vm: Any, now: float) -> bool:
        """Has the stage published for this VM's migration done its job (or run out of time)?"""
        migration = vm.migration
        if now - migration.since >= self.migration_bound:
            return True
        # Every host of the VM network (the source and the destination among them) and
        # every gateway host serving it: each stage changes what they all receive from.
        waiting = (self.inventory.hosts_of_network(vm.vm_network)
                   | gateway_hosts_of_network(self.inventory, vm.vm_network))
        return all(self._in_sync(host) for host in waiting)

    def _in_sync(self, host: str) -> bool:
        try:
            return self.sync_of(host).sync == "InSync"  # type: ignore[attr-defined]
        except FabricError:
            return False  # no state published for it: nothing it could have applied

    def _advance_migration(self, tx: Tx, name: str, expected: Any, now: float) -> tuple[Any, _Scope]:
        """The write of the next stage. Checked again here, after catching up with the
        other replicas: the same stage still in place and still due, or nothing at all."""
        vm = self.inventory.get(Kind.vm, name)
        if vm is None or vm.migration != expected or not self._stage_due(vm, now):
            raise _NotDue
        source = vm.migration.source
        if vm.migration.stage is MigrationStage.destination:
            advanced = vm.model_copy(update={"migration": vm.migration.model_copy(
                update={"stage": MigrationStage.peers, "since": now})})
        else:
            self._end_migration_hold(tx, vm)  # type: ignore[attr-defined]
            advanced = vm.model_copy(update={"migration": None})
        tx.put(Kind.vm, name, advanced)
        return advanced, _Scope(networks={vm.vm_network}, hosts={vm.host, source})

    def wake_migration_stepper(self) -> None:
        """Look for due stages now (a status arrived, a migration was committed)."""
        self._migration_wake.set()

    def _step_migrations(self, interval: float) -> None:
        """The stepper: advance what is due, wait for a status or `interval`; never dies.
        A stage advanced may make the next one due at once (a bound of 0): look again."""
        failing = False
        while not self._stop.is_set():
            try:
                if self.advance_migrations():
                    failing = False
                    continue
                failing = False
            except Exception as exc:  # noqa: BLE001 - the stepper must outlive any one failure
                if not failing:
                    log.warning("event=migration_stepper_error reason=%s", _quoted(f"{type(exc).__name__}: {exc}"))
                failing = True
            self._migration_wake.wait(interval)
            self._migration_wake.clear()
