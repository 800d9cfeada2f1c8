"""netns tier: root and the running kernel's namespaces, veth, bridges, VXLAN."""
