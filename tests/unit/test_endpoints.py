import pytest

from pyloader.kernel.endpoints import parse_endpoint
from pyloader.errors import ConfigError


@pytest.mark.parametrize("text,plen,port,shown", [
    ("198.18.0.10", 128, None, "198.18.0.10"),
    ("198.18.0.10:80", 144, 80, "198.18.0.10:80"),
    ("198.18.0.0/24", 120, None, "198.18.0.0/24"),
    ("2001:db8::10", 128, None, "2001:db8::10"),
    ("[2001:db8::10]:8080", 144, 8080, "[2001:db8::10]:8080"),
    ("2001:db8::/64", 64, None, "2001:db8::/64"),
    ("*", 0, None, "*"),
])
def test_parse(text, plen, port, shown):
    ep = parse_endpoint(text)
    assert ep.prefixlen == plen and ep.port == port and str(ep) == shown
    key = ep.key()
    assert len(key) == 4 + 16 + 2 and int.from_bytes(key[:4], "little") == plen
    assert key[-2:] == (port or 0).to_bytes(2, "big")


@pytest.mark.parametrize("bad", ["", "nope", "198.18.0.10:0", "198.18.0.10:70000",
                                 "198.18.0.0/24:80", "[2001:db8::1", "300.1.1.1", "1.2.3.4:x"])
def test_bad_endpoints_give_a_clear_error(bad):
    with pytest.raises(ConfigError, match="bad endpoint"):
        parse_endpoint(bad)
