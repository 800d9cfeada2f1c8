"""hnvctl: the command line over the controller's REST API (what the VMM cmdlets are).

    hnvctl <object> create|list|show|set|delete ...   one verb group per fabric object
    hnvctl host set-switch HOST --logical-switch X --nic eth0 --nic eth1 \\
        --management-vm-network Management             New-SCVirtualNetwork
    hnvctl vm create|migrate|delete ...                New-/Move-/Remove-SCVirtualMachine
    hnvctl ip list [--pool P] [--kind CA|PA] [--host H] Get-SCIPAddress
    hnvctl lookup-records --host H                      Get-NetVirtualizationLookupRecord
    hnvctl hosts [--wait S]                             hosts and their sync status
    hnvctl host state HOST                              the HostState compiled for HOST
    hnvctl apply -f fabric.yaml [--dry-run] [--prune]   the whole fabric, as one transaction
    hnvctl gateway-service|gateway|nat-connection|nat-rule|customer-route create ...
                                                        the HNV gateway (Add-SCVMNetworkGateway,
                                                        Add-SCNATConnection, Add-SCNATRule,
                                                        New-NetVirtualizationCustomerRoute)

Output is a table (Format-Table style) or, with `-o json`, JSON for scripts; whatever
the controller holds is printed escaped (no control character, escape sequence or
bidirectional override reaches the terminal raw).

The package: `cli` (parser, `main`, exit codes), `commands` (one function per verb),
`flags` (object flags from the document models), `apply` (the apply client: files,
YAML, one request), `output` (tables, lists, JSON, escaping). HTTP is
`controller.client`'s; the fabric's rules are the controller's alone.
"""

from controller.hnvctl.apply import Documents, apply_fabric, read_documents
from controller.hnvctl.cli import main

__all__ = ["Documents", "apply_fabric", "main", "read_documents"]
