"""Kernel feature probe: does the *running* kernel have what openhnv's data plane needs?

Owns the list of kernel features the kernel test tier and the lab rely on, the kernel
modules that provide them, and a probe that answers for real: it tries ``modprobe``
(failure ignored), then creates each link type inside a throw-away network namespace and
lets the namespace die with the probing process. Nothing is left behind, nothing outside
that namespace is touched.

Used by the test tier runner (run the kernel tier here or in a VM?), by
``tests/kernel/conftest.py`` (fail loudly when the features are missing) and by
``hnv-lab`` (re-run itself inside a VM when they are missing).

    python -m netns_lab.features     # table; exit 0 if everything is present, 1 otherwise
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from agent.text import format_table as text_table

# Kernel modules that provide the features below. The VM runner loads the same list
# inside the guest. Names are the distribution kernel's (Debian linux-image-amd64):
# ip_gre provides gretap (and pulls in gre), 8021q provides VLAN devices.
MODULES: tuple[str, ...] = (
    "ip_gre", "gre", "8021q", "bonding", "vrf", "vxlan", "bridge", "veth",
)

# feature -> shell fragment run inside the throw-away namespace; exit status 0 means
# "present". The fragments run in this order, and later ones may use devices made by
# earlier ones (vlan and bridge_vlan_filtering need the veth pair).
_CHECKS: dict[str, str] = {
    "veth": "ip link add ohp0 type veth peer name ohp1",
    "bridge": "ip link add ohbr0 type bridge",
    # A kernel built without CONFIG_BRIDGE_VLAN_FILTERING refuses vlan_filtering 1 with
    # EOPNOTSUPP; read the flag back and add a VLAN to a port to be sure it took effect.
    "bridge_vlan_filtering": (
        "ip link add ohbr1 type bridge vlan_filtering 1"
        " && ip -d link show ohbr1 | grep -q 'vlan_filtering 1'"
        " && ip link set ohp1 master ohbr1"
        " && bridge vlan add dev ohp1 vid 802"
    ),
    "vlan": "ip link add link ohp0 name ohp0.802 type vlan id 802",
    "bond": "ip link add ohbond0 type bond mode active-backup",
    "vrf": "ip link add ohvrf0 type vrf table 4242",
    "vxlan": "ip link add ohvx0 type vxlan id 4096 dstport 4789 local 127.0.0.1",
    # NVGRE: gretap keyed by VSID<<8 (VSID 3535905 here).
    "gretap": "ip link add ohgt0 type gretap local 127.0.0.1 remote 127.0.0.2 key 905191680",
}

# Everything the kernel tier needs; "netns" is whether a network namespace could be made.
KERNEL_TIER_FEATURES: tuple[str, ...] = ("netns", *_CHECKS)


@dataclass(frozen=True)
class FeatureResult:
    """One probed feature: present or not, and the kernel's answer when not."""

    name: str
    present: bool
    reason: str = ""


def _unshare_prefix() -> list[str]:
    # As root the namespace is made directly, so the kernel can still autoload modules
    # (request_module works from the initial user namespace). Without root, a user
    # namespace maps us to root inside it: enough to create links, not to load modules.
    if os.geteuid() == 0:
        return ["unshare", "--net"]
    return ["unshare", "--user", "--map-root-user", "--net"]


def _load_modules() -> None:
    """Best effort ``modprobe``: a kernel without loadable modules just says no."""
    if os.geteuid() != 0 or not shutil.which("modprobe"):
        return
    if not os.path.isdir(f"/lib/modules/{os.uname().release}"):
        return  # nothing to load from; skip the fork
    subprocess.run(["modprobe", "-a", "-q", *MODULES],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _probe_script() -> str:
    lines = ["ip link set lo up"]
    for name, fragment in _CHECKS.items():
        # One line per feature: "<name> ok" or "<name> fail <first line of the error>".
        lines.append(
            f'if out=$( {{ {fragment} ; }} 2>&1 ); then echo "{name} ok"; '
            f'else echo "{name} fail $(printf %s "$out" | head -n 1)"; fi'
        )
    return "\n".join(lines)


def probe_details(load_modules: bool = True) -> dict[str, FeatureResult]:
    """Probe every feature in :data:`KERNEL_TIER_FEATURES`; cheap (well under a second)."""
    if load_modules:
        _load_modules()
    if not shutil.which("unshare") or not shutil.which("ip"):
        reason = "unshare (util-linux) and ip (iproute2) are needed to probe"
        return {n: FeatureResult(n, False, reason) for n in KERNEL_TIER_FEATURES}
    proc = subprocess.run([*_unshare_prefix(), "sh", "-c", _probe_script()],
                          capture_output=True, text=True, check=False, timeout=30)
    return parse_probe_output(proc.stdout, proc.stderr)


def parse_probe_output(stdout: str, stderr: str = "") -> dict[str, FeatureResult]:
    """Results from the probe script's "<feature> ok|fail <reason>" lines.

    No lines at all means the namespace could not be made (``unshare`` failed, its
    stderr says why): then every feature is reported missing with that reason.
    """
    results: dict[str, FeatureResult] = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        status, _, reason = rest.partition(" ")
        if name in _CHECKS:
            results[name] = FeatureResult(name, status == "ok", reason.strip())
    namespace_ok = bool(results)
    reason = "" if namespace_ok else (stderr.strip().splitlines() or ["unshare failed"])[0]
    results["netns"] = FeatureResult("netns", namespace_ok, reason)
    for name in _CHECKS:
        results.setdefault(name, FeatureResult(name, False, reason or "not probed"))
    return {name: results[name] for name in KERNEL_TIER_FEATURES}


def probe(load_modules: bool = True) -> dict[str, bool]:
    """``{feature: present}`` for every feature in :data:`KERNEL_TIER_FEATURES`."""
    return {name: r.present for name, r in probe_details(load_modules).items()}


def missing(load_modules: bool = True) -> list[str]:
    """Names of the kernel-tier features the running kernel lacks; empty when all present."""
    return [name for name, present in probe(load_modules).items() if not present]


def format_table(results: dict[str, FeatureResult]) -> str:
    rows = [(r.name, "yes" if r.present else "NO", r.reason) for r in results.values()]
    return f"kernel {os.uname().release}\n" + text_table(None, rows, gap="  ", indent="  ")


def main(argv: list[str] | None = None) -> int:
    results = probe_details()
    print(format_table(results))
    return 0 if all(r.present for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
