"""kernel tier: gretap, 802.1Q, bonding, VLAN-filtering bridges, VRF (in a VM when the kernel lacks them)."""
