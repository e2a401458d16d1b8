"""Where records go: the JSON access log and its writer thread, Prometheus
metrics, the exit summary."""
