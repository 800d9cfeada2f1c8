"""The lab topology: which hosts, clusters, NICs and switch VLANs the lab builds.

Owns the YAML model of a lab (pydantic, every refusal names the field and the reason),
the derived names the builder and the other lab commands share (namespaces, switch
ports, the controller's URL), and loading the default topology: the seed walkthrough's
fabric, shipped as ``netns_lab/topologies/seed.yaml``. It is plain data: this module
never touches the kernel and never starts a process (mininet's and containerlab's
habit: the topology is separate from the code that builds it).

    topology = load_topology()                 # the seed fabric
    topology = load_topology(Path("my.yaml"))  # raises TopologyError("field: reason", ...)
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Iterator, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyInterface,
    IPvAnyNetwork,
    ValidationError,
    model_validator,
)

from agent.state import IfName, VlanId, describe_validation_error

SEED_TOPOLOGY = "seed.yaml"

# Network namespace names live as files in /run/netns: no '/', not '.', not '..'.
_NAMESPACE_FORBIDDEN = set("/ \t\n")


def _check_namespace_name(value: str) -> str:
    if not value or value in (".", "..") or any(c in _NAMESPACE_FORBIDDEN for c in value):
        raise ValueError(f"{value!r} cannot name a network namespace (no '/', white space, '.' or '..')")
    if len(value) > 64:
        raise ValueError(f"{value!r} is longer than 64 characters")
    return value


NodeName = Annotated[str, AfterValidator(_check_namespace_name)]


class ClusterRole(StrEnum):
    """What a cluster is for in the walkthrough (the seed's three clusters)."""

    management = "management"  # runs the controller (the VMM server)
    vlan = "vlan"  # tenants isolated by VLAN (part I's HOSTCLUSTER)
    virtualization = "virtualization"  # tenants isolated by network virtualisation
    gateway = "gateway"  # dedicated HNV gateway hosts (the gateway cluster): no VM is placed there


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SwitchSpec(_Model):
    """The physical switch: one VLAN-filtering bridge in a namespace of its own.

    Every host NIC is a trunk port: ``native_vlan`` untagged (the management network),
    ``trunk_vlans`` tagged.
    """

    namespace: NodeName = "lab-switch"
    bridge: IfName = "br0"
    native_vlan: VlanId = 1
    trunk_vlans: tuple[VlanId, ...] = (802, 100, 101)

    @model_validator(mode="after")
    def _vlans_distinct(self) -> SwitchSpec:
        if self.native_vlan in self.trunk_vlans:
            raise ValueError(
                f"trunk_vlans: VLAN {self.native_vlan} is the native VLAN; "
                "a port carries it untagged, not tagged as well"
            )
        twice = [vlan for vlan, count in Counter(self.trunk_vlans).items() if count > 1]
        if twice:
            raise ValueError(f"trunk_vlans: VLAN {twice[0]} is listed twice")
        return self


class HostSpec(_Model):
    """One Hyper-V host: a namespace with NICs cabled to the switch."""

    name: NodeName
    address: IPvAnyAddress  # management address, first on nics[0] as on a fresh host
    nics: tuple[IfName, ...] = ("eth0", "eth1")
    # Switch-side port names are "<port_prefix>-<nic>" (IFNAMSIZ allows 15 bytes, too
    # few for "CON-HyperV6-eth0"); default "h<position of the host in the file>".
    port_prefix: str | None = Field(default=None, min_length=1, max_length=10)

    @model_validator(mode="after")
    def _nics_distinct(self) -> HostSpec:
        if not self.nics:
            raise ValueError("nics: a host needs at least one NIC")
        twice = [nic for nic, count in Counter(self.nics).items() if count > 1]
        if twice:
            raise ValueError(f"nics: NIC {twice[0]} is listed twice")
        return self


class ClusterSpec(_Model):
    name: str = Field(min_length=1, max_length=64)
    host_group: str = Field(min_length=1, max_length=64)
    role: ClusterRole
    hosts: tuple[HostSpec, ...]

    @model_validator(mode="after")
    def _has_hosts(self) -> ClusterSpec:
        if not self.hosts:
            raise ValueError(f"hosts: cluster {self.name} has no host")
        return self


class ManagementSpec(_Model):
    """The management network: untagged on the switch's native VLAN."""

    subnet: IPvAnyNetwork = ipaddress.ip_network("10.0.0.0/24")


class ExternalSpec(_Model):
    """The network outside the fabric that the HNV gateway's front-end reaches: one
    namespace on an access port of the switch in ``vlan`` (untagged there), holding
    ``address`` (the front-end's upstream router, and the "Internet" the tenants reach)
    and a small web server on ``web_port`` that answers with the caller's address
    (netns_lab.webserver), so a tenant sees which NAT address it left through."""

    namespace: NodeName = "lab-external"
    vlan: VlanId = 30
    address: IPvAnyInterface = ipaddress.ip_interface("203.0.113.1/24")
    web_port: int = Field(default=80, ge=1, le=65535)
    port: IfName = "ext-eth0"  # its switch port

    @model_validator(mode="after")
    def _host_address(self) -> ExternalSpec:
        net = self.address.network
        if net.num_addresses > 2 and self.address.ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"address: {self.address.ip} is not a host address of {net}")
        return self


class StoreKind(StrEnum):
    """The controller's store: its embedded SQLite file, or PostgreSQL shared by replicas."""

    sqlite = "sqlite"
    postgresql = "postgresql"


class ControllerSpec(_Model):
    """Where the controller (the VMM server) runs: a host of the management cluster.

    ``replicas`` > 1 (``hnv-lab up --controllers N``) runs that many controller replicas
    on one PostgreSQL database (``store: postgresql``): replica i listens on the
    management cluster's hosts in turn, starting with ``host``, at ``port + i``, and
    PostgreSQL listens on ``host``'s address at ``postgresql_port``.
    """

    host: NodeName
    port: int = Field(default=8080, ge=1, le=65535)
    replicas: int = Field(default=1, ge=1, le=9)
    store: StoreKind = StoreKind.sqlite
    postgresql_port: int = Field(default=5432, ge=1, le=65535)
    # hnv-controller run --gateway-failover-after: the lab moves a gateway service's
    # active role sooner than the product's default 10 s, so that new connections leave
    # through the standby within 10 s of the active host's loss.
    gateway_failover_after: float = Field(default=10.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _replicas_share_a_database(self) -> ControllerSpec:
        if self.replicas > 1 and self.store is not StoreKind.postgresql:
            raise ValueError(f"store: {self.replicas} replicas share one database: store must be "
                             "postgresql, not sqlite (one controller per SQLite file)")
        if self.port + self.replicas - 1 > 65535:
            raise ValueError(f"port: replicas listen at port .. port+{self.replicas - 1}, past 65535")
        return self


class AgentSpec(_Model):
    metrics_port: int = Field(default=9477, ge=1, le=65535)
    # The VMs of IPv4 VM subnets get their address by DHCP from their host, as a Hyper-V
    # VM does (hnv-agent run --vm-dhcp), instead of the agent setting it.
    vm_dhcp: bool = False


class PrometheusSpec(_Model):
    """Debian's prometheus server scraping the lab (netns_lab.prometheus); off unless
    ``enabled`` or ``hnv-lab up --prometheus``. It runs in a host of the management
    cluster (default: the controller's) and listens on its management address."""

    enabled: bool = False
    host: NodeName | None = None
    port: int = Field(default=9090, ge=1, le=65535)


class Topology(_Model):
    name: str = Field(default="seed", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")
    switch: SwitchSpec = SwitchSpec()
    management: ManagementSpec = ManagementSpec()
    controller: ControllerSpec
    agent: AgentSpec = AgentSpec()
    prometheus: PrometheusSpec = PrometheusSpec()
    external: ExternalSpec | None = None
    clusters: tuple[ClusterSpec, ...]

    @model_validator(mode="after")
    def _cross_checks(self) -> Topology:
        if not self.clusters:
            raise ValueError("clusters: a lab needs at least one cluster")
        names: dict[str, str] = {self.switch.namespace: "switch.namespace"}
        addresses: dict[object, str] = {}
        prefixes: dict[str, str] = {}
        for path, host in self._host_paths():
            if host.name in names:
                raise ValueError(f"{path}.name: {host.name} is already used by {names[host.name]}")
            names[host.name] = f"{path}.name"
            if host.address not in self.management.subnet:
                raise ValueError(
                    f"{path}.address: {host.address} is outside the management subnet "
                    f"{self.management.subnet}"
                )
            net = self.management.subnet
            if host.address in (net.network_address, net.broadcast_address):
                raise ValueError(f"{path}.address: {host.address} is not a host address of {net}")
            if host.address in addresses:
                raise ValueError(f"{path}.address: {host.address} is already {addresses[host.address]}'s")
            addresses[host.address] = host.name
            prefix = self.port_prefix(host)
            if prefix in prefixes:
                raise ValueError(f"{path}.port_prefix: {prefix} is already {prefixes[prefix]}'s")
            prefixes[prefix] = host.name
            for j, nic in enumerate(host.nics):
                port = f"{prefix}-{nic}"
                if len(port.encode()) > 15:
                    raise ValueError(
                        f"{path}.nics[{j}]: switch port name {port} is over the kernel's 15 bytes; "
                        "shorten the NIC name or set port_prefix"
                    )
        if self.external is not None:
            self._check_external(names)
        self._check_management_host("controller.host", self.controller.host)
        if self.prometheus.host is not None:
            self._check_management_host("prometheus.host", self.prometheus.host)
        prometheus_on = self.prometheus.host or self.controller.host
        taken = {self.agent.metrics_port: "agent.metrics_port"}
        if prometheus_on == self.controller.host:
            taken[self.controller.port] = "controller.port"
        replica_ports = {replica.port: f"controller.port (replica {i + 1})"
                         for i, replica in enumerate(self.controller_replicas)}
        for port, what in [(self.agent.metrics_port, "agent.metrics_port"),
                           *([(self.controller.postgresql_port, "controller.postgresql_port")]
                             if self.controller.store is StoreKind.postgresql else [])]:
            if port in replica_ports:
                raise ValueError(f"controller.port: a replica's port {port} is already {what}")
        if self.prometheus.port in taken:
            raise ValueError(
                f"prometheus.port: {self.prometheus.port} is already {taken[self.prometheus.port]} "
                f"on {prometheus_on}"
            )
        return self

    def _check_external(self, names: dict[str, str]) -> None:
        external = self.external
        assert external is not None
        if external.namespace in names:
            raise ValueError(f"external.namespace: {external.namespace} is already used by "
                             f"{names[external.namespace]}")
        if external.vlan == self.switch.native_vlan:
            raise ValueError(f"external.vlan: VLAN {external.vlan} is the switch's native VLAN (the "
                             "management network); the external network needs a VLAN of its own")
        if external.vlan not in self.switch.trunk_vlans:
            raise ValueError(f"external.vlan: VLAN {external.vlan} is not in switch.trunk_vlans, so no "
                             "host's trunk carries it and no gateway host could reach it")
        if external.address.ip in self.management.subnet:
            raise ValueError(f"external.address: {external.address.ip} is inside the management subnet "
                             f"{self.management.subnet}")
        ports = {self.switch_port(h, nic) for h in self.hosts for nic in h.nics}
        if external.port in ports or external.port == self.switch.bridge:
            raise ValueError(f"external.port: {external.port} is already a switch port or the bridge")

    def _check_management_host(self, field: str, name: str) -> None:
        """``field`` names a host of a cluster with role management (the VMM server's)."""
        host = self.host(name)
        if host is None:
            raise ValueError(f"{field}: {name} is not a host of any cluster")
        if self.cluster_of(host.name).role is not ClusterRole.management:
            raise ValueError(f"{field}: {name} is not in a cluster with role management")

    # --- derived names, shared by build, processes, demo, capture and graph ---------------

    def _host_paths(self) -> Iterator[tuple[str, HostSpec]]:
        for i, cluster in enumerate(self.clusters):
            for j, host in enumerate(cluster.hosts):
                yield f"clusters[{i}].hosts[{j}]", host

    @property
    def hosts(self) -> tuple[HostSpec, ...]:
        return tuple(host for cluster in self.clusters for host in cluster.hosts)

    def host(self, name: str) -> HostSpec | None:
        return next((h for h in self.hosts if h.name == name), None)

    def cluster_of(self, host_name: str) -> ClusterSpec:
        return next(c for c in self.clusters if any(h.name == host_name for h in c.hosts))

    def clusters_with_role(self, role: ClusterRole) -> tuple[ClusterSpec, ...]:
        return tuple(c for c in self.clusters if c.role is role)

    def port_prefix(self, host: HostSpec) -> str:
        if host.port_prefix:
            return host.port_prefix
        return f"h{[h.name for h in self.hosts].index(host.name) + 1}"

    def switch_port(self, host: HostSpec, nic: str) -> str:
        """The switch-side end of ``host``'s ``nic`` (``h6-eth0`` for CON-HyperV6 eth0)."""
        return f"{self.port_prefix(host)}-{nic}"

    def management_interface(self, host: HostSpec) -> str:
        return f"{host.address}/{self.management.subnet.prefixlen}"

    @property
    def controller_address(self) -> str:
        host = self.host(self.controller.host)
        assert host is not None  # validated
        return str(host.address)

    @property
    def controller_url(self) -> str:
        # The certificate names this address.
        return f"https://{_url_host(self.controller_address)}:{self.controller.port}"

    def with_controllers(self, replicas: int | None = None, store: str | None = None,
                         source: str = "--controllers/--store") -> Topology:
        """This topology with ``controller.replicas``/``controller.store`` overridden (the
        command line's ``--controllers N --store postgresql``), validated again."""
        controller = self.controller.model_dump()
        if replicas is not None:
            controller["replicas"] = replicas
        if store is not None:
            controller["store"] = store
        try:
            return Topology.model_validate({**self.model_dump(mode="json"), "controller": controller})
        except ValidationError as exc:
            raise TopologyError(source, describe_validation_error(exc)) from None

    @property
    def controller_replicas(self) -> tuple[ControllerReplica, ...]:
        """Where each controller replica listens: the management cluster's hosts in turn,
        starting with ``controller.host``, at ``controller.port + i`` (so that two
        replicas sharing a host never share a port). One replica: the controller."""
        first = self.host(self.controller.host)
        if first is None:  # refused by validation; the property is also used while validating
            return ()
        cluster = self.cluster_of(first.name)
        ordered = [first, *(h for h in cluster.hosts if h.name != first.name)]
        return tuple(ControllerReplica(ordered[i % len(ordered)], self.controller.port + i)
                     for i in range(self.controller.replicas))

    @property
    def controller_urls(self) -> tuple[str, ...]:
        """Every replica's URL, the first being ``controller_url``."""
        return tuple(replica.url for replica in self.controller_replicas)

    @property
    def postgresql_url(self) -> str:
        """The lab's PostgreSQL database (``store: postgresql``), on the controller's host."""
        return f"postgresql://postgres@{_url_host(self.controller_address)}:{self.controller.postgresql_port}/hnv"

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace the lab builds itself (agents add the VMs' on top)."""
        external = (self.external.namespace,) if self.external is not None else ()
        return (self.switch.namespace, *(h.name for h in self.hosts), *external)


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class ControllerReplica(NamedTuple):
    host: HostSpec
    port: int

    @property
    def address(self) -> str:
        return str(self.host.address)

    @property
    def url(self) -> str:
        return f"https://{_url_host(self.address)}:{self.port}"


class TopologyError(ValueError):
    """A topology file was refused; ``problems`` holds one 'field: reason' line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    """Validate YAML text; raise TopologyError naming each bad field and why."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(document, dict):
        raise TopologyError(source, ["the top level must be a mapping (name, switch, clusters, ...)"])
    try:
        return Topology.model_validate(document)
    except ValidationError as exc:
        raise TopologyError(source, describe_validation_error(exc)) from None


def seed_topology_text() -> str:
    return resources.files("netns_lab.topologies").joinpath(SEED_TOPOLOGY).read_text()


def load_topology(path: Path | None = None) -> Topology:
    """The topology in ``path``, or the seed's fabric when ``path`` is None."""
    if path is None:
        return parse_topology(seed_topology_text(), f"netns_lab/topologies/{SEED_TOPOLOGY}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    return parse_topology(text, str(path))
