"""netns_lab: one kernel, many hosts.

The lab builds the seed's fabric (switch, hosts, VMs) out of network namespaces on one
kernel. This package also owns the two pieces every tier of tests and the lab share:
``netns_lab.features`` (does the running kernel have gretap, 802.1Q, bonding, VRF,
VLAN-filtering bridges?) and ``netns_lab.vm`` (if not, run a command inside a throw-away
virtme-ng VM booting the distribution kernel).
"""
