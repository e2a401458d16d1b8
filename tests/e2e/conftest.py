"""Fixtures of the end-to-end tests: a namespace node per module, a fresh agent."""
from __future__ import annotations

import os

import pytest

from pyloader.lab.netnode import Node
from support.agentproc import AgentProc


@pytest.fixture
def fresh(agent):
    """The module's `agent`, its new_records() counting from now."""
    agent.mark()
    return agent


@pytest.fixture(scope="module")
def node():
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces and bpf()")
    n = Node(pods=4).setup()
    try:
        n.start_nginx(n.pods[0])
        n.start_pyserver(n.pods[1])
        yield n
    finally:
        n.teardown()
