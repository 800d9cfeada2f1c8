"""The controller's service layer: every fabric operation, validated, allocated and
compiled as one transaction, and the views of what hosts were given.

- `engine`: `Fabric`, the transaction engine (build, trial compile, commit, publish)
  and the explicit registry of rules per kind (`RULES`); readers see only committed
  state;
- `views`: the sync/status view (`HostEntry`, `SyncView`, `HostView`) and agents'
  status reports;
- `hosts`, `networks`, `tenants`, `gateways`, `patch`: the rules per domain (host
  groups, clusters, hosts, virtual switches; logical networks, sites, pools, profiles,
  logical switches; VM networks, VM subnets, VMs, CA/PA leases, migration; the HNV
  gateway: services, gateways, NAT connections and rules, customer routes; PATCH);
- `migrations`: the stages of a make-before-break migration after the first, each a
  committed write, and the stepper thread that advances them;
- `common`: scopes, `Unavailable` and the builders' shared toolkit.

Import from here: `from controller.fabric import Fabric, SyncView, HostView, Unavailable,
HostEntry`.
"""

from controller.fabric.common import ALL, RETRY_AFTER_BUSY_S, KindRules, Unavailable, _uuid_of
from controller.fabric.engine import RULES, Fabric
from controller.fabric.views import HostEntry, HostView, SyncView

__all__ = ["ALL", "RETRY_AFTER_BUSY_S", "RULES", "Fabric", "HostEntry", "HostView", "KindRules", "SyncView",
           "Unavailable", "_uuid_of"]
