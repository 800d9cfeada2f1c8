"""Unit tier: no root, no kernel."""
