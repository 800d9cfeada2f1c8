"""openhnv controller: the VMM role.

It owns the fabric (host groups, hosts, logical networks and their sites, IP pools,
uplink port profiles, logical switches, VM networks, VM subnets, VMs), allocates VSIDs,
customer and provider addresses and MACs, and compiles for every host the
`agent.state.HostState` it must hold, pushed to the host's agent over a watch stream.

Rooms: `models` (the objects as users write them), `store` (SQLite, the only code that
touches the database), `allocate` (VSID, address, MAC, routing-domain id choices),
`placement` (which host gets a VM), `compiler` (fabric -> HostState), `fabric` (the
validated operations, one transaction each), `fabric_document` (the declarative fabric
document, planned and applied as one transaction), `auth` (tokens), `api` and
`api_apply` (HTTP), `cli`; `client` and the `hnvctl` package are the REST client side.
"""
