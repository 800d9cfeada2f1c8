"""Benchmarks: every figure is a ratio against a baseline measured in the same run.

``python -m bench`` (``make bench``) runs records, convergence and datapath and prints one
table. Nothing here is imported by the agent or the controller.
"""
