"""Kubernetes metadata: list/watch of the API (watch.py), a time-aware view of
pods and services (state.py), the pipeline stage naming both ends (meta.py)."""
