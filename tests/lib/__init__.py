"""Helpers shared by every test tier: namespaces (``netns``), NVGRE decoding (``nvgre``)."""
