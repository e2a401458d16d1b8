"""BPF_PROG_TEST_RUN: the endpoint filter's two maps (the exact hash of IP:PORT
entries, looked up first, and the LPM trie) give the trie's answer."""
from pyloader.kernel import abi

from support import packets as P


def _traced(h, server, cport) -> bool:
    c = P.Conn(server=server, client=("198.18.2.1", cport))
    h.req(c.req(P.get("/")))
    h.resp(c.resp(P.response(200)))
    return len(h.events()) == 1


def _settings(h) -> abi.Settings:
    return abi.Settings.from_buffer_copy(h.t.obj.map("settings").lookup((0).to_bytes(4, "little")))


def test_port_entries_and_a_cidr_together(h):
    h.reset(endpoints=("198.18.0.10:80", "198.18.5.0/24"))
    assert _settings(h).trie_only == 1
    assert _traced(h, ("198.18.0.10", 80), 40001)
    assert not _traced(h, ("198.18.0.10", 81), 40002)
    assert _traced(h, ("198.18.5.7", 8080), 40003)


def test_a_removed_port_entry_is_no_longer_traced(h):
    h.reset(endpoints=("198.18.0.10:80", "198.18.0.11:80"))
    assert _settings(h).trie_only == 0
    h.t.endpoints.remove(next(e for e in h.t.endpoints.current if str(e) == "198.18.0.10:80"))
    assert list(h.t.obj.map("endpoint_ports").keys()) == [
        next(iter(h.t.endpoints.current)).key()]
    assert not _traced(h, ("198.18.0.10", 80), 40004)
    assert _traced(h, ("198.18.0.11", 80), 40005)


def test_only_port_entries_go_to_the_hash(h):
    h.reset(endpoints=("198.18.0.10", "198.18.0.12:8080", "*"))
    assert _settings(h).trie_only == 2
    assert len(list(h.t.obj.map("endpoint_ports").keys())) == 1
    assert _traced(h, ("198.19.9.9", 1), 40006)  # the wildcard, through the trie
