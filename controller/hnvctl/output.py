"""hnvctl's output: tables (Format-Table), lists (Format-List), JSON, messages.

Everything hnvctl prints goes through `Output` (stdout) or `Output.error` (stderr), and
everything it prints that came from the controller is escaped on the way: a host's
status text, a name or a description holding `\\x1b[2K\\r`, an OSC title sequence or
U+202E reaches the terminal as the visible text `\\x1b[2K\\r`, never as bytes the
terminal acts on (`agent.text.printable`). JSON is escaped by `json.dumps` itself
(`ensure_ascii`: every control and non-ASCII character as `\\uXXXX`).

Owns the columns per kind and the look of values; no HTTP, no flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TextIO

from pydantic.alias_generators import to_pascal

from agent.text import format_table as text_table
from agent.text import printable
from controller.models import Kind


def format_value(value: Any, nested: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dict):
        if set(value) == {"subnet", "vlan"}:
            return f"{value['subnet']}:{value['vlan']}"
        text = ", ".join(f"{to_pascal(k)}={format_value(v, True)}" for k, v in value.items() if v not in (None, ""))
        return "{" + text + "}" if nested else text
    if isinstance(value, (list, tuple)):
        text = ", ".join(format_value(v, True) for v in value)
        return "[" + text + "]" if nested else text
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Aligned columns under a header and a dashes line, as PowerShell's Format-Table."""
    return text_table([header for _, header in columns],
                      [[_field(row, path) for path, _ in columns] for row in rows], cell=format_value)


def _field(row: dict[str, Any], path: str) -> Any:
    """row['virtual_switch']['logical_switch'] for 'virtual_switch.logical_switch'."""
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_list(obj: dict[str, Any]) -> str:
    """Name : value lines, as PowerShell's Format-List."""
    width = max((len(to_pascal(k)) for k in obj), default=0)
    return "\n".join(f"{printable(to_pascal(k)).ljust(width)} : {printable(format_value(v))}" for k, v in obj.items())


# Table columns per kind: (JSON field, header).
COLUMNS: dict[Kind, list[tuple[str, str]]] = {
    Kind.host_group: [("name", "Name"), ("parent", "ParentHostGroup"), ("description", "Description")],
    Kind.cluster: [("name", "Name"), ("host_group", "HostGroup")],
    Kind.host: [
        ("name", "Name"),
        ("cluster", "Cluster"),
        ("host_group", "HostGroup"),
        ("management_address", "ManagementAddress"),
        ("nics", "NICs"),
        ("virtual_switch.logical_switch", "LogicalSwitch"),
    ],
    Kind.logical_network: [
        ("name", "Name"),
        ("network_virtualization", "NetworkVirtualization"),
        ("encapsulation", "Encapsulation"),
        ("mtu", "MTU"),
    ],
    Kind.network_site: [
        ("name", "Name"),
        ("logical_network", "LogicalNetwork"),
        ("host_groups", "HostGroups"),
        ("subnet_vlans", "SubnetVLans"),
    ],
    Kind.ip_pool: [
        ("key", "Pool"),
        ("subnet", "Subnet"),
        ("range_start", "IPAddressRangeStart"),
        ("range_end", "IPAddressRangeEnd"),
        ("gateway", "Gateway"),
    ],
    Kind.uplink_port_profile: [
        ("name", "Name"),
        ("network_sites", "NetworkSites"),
        ("network_virtualization", "NetworkVirtualization"),
        ("team_mode", "TeamMode"),
        ("load_balancing", "LoadBalancing"),
    ],
    Kind.logical_switch: [("name", "Name"), ("uplink_mode", "UplinkMode"), ("uplink_port_profiles", "UplinkPortProfiles")],
    Kind.vm_network: [
        ("name", "Name"),
        ("logical_network", "LogicalNetwork"),
        ("isolation", "IsolationType"),
        ("ca_family", "CAFamily"),
    ],
    Kind.vm_subnet: [
        ("key", "VMSubnet"),
        ("prefix", "Subnet"),
        ("vsid", "VSID"),
        ("vlan", "VLan"),
        ("gateway_mac", "GatewayMAC"),
    ],
    Kind.vm: [
        ("name", "Name"),
        ("vm_network", "VMNetwork"),
        ("vm_subnet", "VMSubnet"),
        ("host", "VMHost"),
        ("tap_device", "TapDevice"),  # a tap NIC's device on its host (Vm.tap_device); empty for a namespace NIC
        ("ca", "IPv4Address"),
        ("mac", "MACAddress"),
    ],
    Kind.gateway_service: [
        ("name", "Name"),
        ("front_end_site", "FrontEndSite"),
        ("external_ip_pool", "ExternalIPPool"),
        ("back_end_logical_network", "BackEndLogicalNetwork"),
        ("hosts", "GatewayHosts"),
        ("active", "Active"),
        ("active_since", "ActiveSince"),
        ("active_reason", "LastMove"),
    ],
    Kind.gateway: [
        ("name", "Name"),
        ("vm_network", "VMNetwork"),
        ("gateway_service", "NetworkService"),
        ("connectivity", "Connectivity"),
        ("back_end_ca", "BackEndAddress"),
        ("forwarding_address", "ForwardingAddress"),
        ("active_host", "ActiveHost"),  # the service's (commands.with_active_host)
    ],
    Kind.nat_connection: [
        ("name", "Name"),
        ("gateway", "VMNetworkGateway"),
        ("vm_network", "VMNetwork"),
        ("external_ip_pool", "ExternalIPPool"),
        ("external_address", "ExternalIPAddress"),
    ],
    Kind.nat_rule: [
        ("name", "Name"),
        ("nat_connection", "NATConnection"),
        ("protocol", "Protocol"),
        ("external_port", "ExternalPort"),
        ("vm", "VM"),
        ("ca", "InternalIPAddress"),
        ("internal_port", "InternalPort"),
    ],
    Kind.customer_route: [
        ("key", "CustomerRoute"),
        ("prefix", "DestinationPrefix"),
        ("next_hop", "NextHop"),
    ],
}
IP_COLUMNS = [
    ("address", "Address"),
    ("pool", "Pool"),
    ("kind", "Kind"),
    ("holder", "HeldBy"),
    ("description", "Description"),
]
LOOKUP_COLUMNS = [
    ("ca", "CustomerAddress"),
    ("vsid", "VirtualSubnetID"),
    ("mac", "MACAddress"),
    ("pa", "ProviderAddress"),
    ("type", "Type"),
    ("vm_name", "VMName"),
]
HOSTS_COLUMNS = [
    ("name", "Name"),
    ("cluster", "Cluster"),
    ("sync", "Sync"),
    ("desired_generation", "Desired"),
    ("applied_generation", "Applied"),
    ("reason", "Reason"),
]


@dataclass
class Output:
    """Where and how a command prints; every line is escaped (see the module's doc)."""

    fmt: str
    stdout: TextIO

    def emit(self, data: Any, columns: list[tuple[str, str]] | None = None) -> None:
        """Objects: JSON with -o json, else a table (with columns) or a list."""
        if self.fmt == "json":
            self.json(data)
        elif columns is not None:
            print(format_table(data, columns), file=self.stdout)
        else:
            print(format_list(data), file=self.stdout)

    def json(self, data: Any) -> None:
        # ensure_ascii (the default, stated because the escaping depends on it): control
        # characters, escape sequences and bidi overrides leave as \\u001b, \\u202e.
        print(json.dumps(data, indent=2, default=str, ensure_ascii=True), file=self.stdout)

    def say(self, text: str) -> None:
        """A one-line human message (escaped whole, line breaks too): in JSON mode it
        stays off stdout so stdout stays JSON."""
        if self.fmt != "json":
            print(printable(text), file=self.stdout)


def error_line(message: object, stream: TextIO) -> None:
    """'hnvctl: <message>', on one line, escaped: what every refusal prints on stderr."""
    text = str(message).removeprefix("hnvctl: ").replace("\n", " ")
    print(f"hnvctl: {printable(text)}", file=stream)
