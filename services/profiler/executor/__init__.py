"""Executors: where a profile runs (base.py: the interface; local.py, kubernetes.py)."""
