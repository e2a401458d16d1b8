"""The lab: demo and test tooling (namespace node and cluster, traffic
generator, test servers, the test Kubernetes API, the demos).

Never imported by the product (tests/unit/test_layout.py checks it) and not
installed with it (setup.cfg excludes this package)."""
