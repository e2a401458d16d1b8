"""Route templates: default heuristics, user patterns, the per-server cap."""
from __future__ import annotations

import random
import string
import uuid

import pytest

from pyloader.errors import RedtapError
from pyloader.pipeline.routes import (OTHER_TARGET, OVERFLOW_ROUTE, RouteComponent, RoutePattern,
                             RouteTable, looks_like_id, server_key, template_path)

SRV = ("198.18.0.10", 80)


@pytest.mark.parametrize("path,route", [
    ("/users/123/orders/9f1c2ab7e0", "/users/{id}/orders/{id}"),
    ("/items/0", "/items/{id}"),
    ("/x/550e8400-e29b-41d4-a716-446655440000/y", "/x/{id}/y"),
    ("/x/550E8400E29B41D4A716446655440000", "/x/{id}"),
    ("/commit/3f786850e387550fdab836ed7e6dc881de23001b", "/commit/{id}"),
    ("/blob/cafe1234", "/blob/{id}"),
    ("/t/aGVsbG8gd29ybGQhISE", "/t/{id}"),               # base64 with digits
    ("/t/QkRaZXhqWWtLbVpQcVRy", "/t/{id}"),              # base64, random case
    ("/s/dGhpc19pc19hX3Rva2Vu-_x9", "/s/{id}"),          # base64url
    ("/a/" + "x" * 40, "/a/{id}"),                       # long token
    ("/orders/order-123456", "/orders/{id}"),            # many digits
    ("/day/2024-01-02/report", "/day/{id}/report"),
])
def test_ids_become_placeholders(path, route):
    assert template_path(path) == route


@pytest.mark.parametrize("path", [
    "/", "/api/v1/items", "/v2/users/me", "/status/p12", "/files/1m.bin", "/index.html",
    "/deadbeef", "/GetUserProfileSettings", "/health-check/readiness-probe", "//a//b/",
    "/static/app.min.js", "/search",
])
def test_words_versions_and_names_stay(path):
    assert template_path(path) == path


def test_empty_segment_is_not_an_id():
    assert not looks_like_id("")


def test_absolute_form_target_uses_its_path():
    assert template_path("http://shop.example/users/42") == "/users/{id}"


def test_asterisk_and_authority_form_targets():
    assert template_path("*") == "*"
    assert template_path("example.test:443") == OTHER_TARGET


def test_escaped_invalid_utf8_path_is_templated_not_crashing():
    assert template_path("/a/\\xff\\xfe/12") == "/a/\\xff\\xfe/{id}"


def test_ten_thousand_numeric_ids_give_one_route():
    t = RouteTable(max_routes=5)
    routes = {t.route(SRV, f"/users/{i}/orders") for i in range(10_000)}
    assert routes == {"/users/{id}/orders"} and t.overflowed == 0


def test_ten_thousand_uuids_and_hex_ids_give_one_route_each():
    t = RouteTable(max_routes=5)
    rnd = random.Random(5)
    u = {t.route(SRV, f"/o/{uuid.UUID(int=rnd.getrandbits(128))}") for _ in range(10_000)}
    h = {t.route(SRV, "/h/%016x" % rnd.getrandbits(64)) for _ in range(10_000)}
    assert u == {"/o/{id}"} and h == {"/h/{id}"}


def test_ten_thousand_random_tokens_give_one_route():
    rnd = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-_"
    t = RouteTable(max_routes=5)
    routes = {t.route(SRV, "/dl/" + "".join(rnd.choice(alphabet) for _ in range(22)))
              for _ in range(10_000)}
    # a token without a digit and with skewed case may escape the heuristics:
    # the cap still bounds them
    assert "/dl/{id}" in routes and len(routes) <= 6


def test_word_like_paths_past_the_cap_fold_into_overflow_and_are_counted():
    rnd = random.Random(3)
    t = RouteTable(max_routes=50)
    words = {"/" + "".join(rnd.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(20_000)}
    words = sorted(words)[:10_000]
    routes = [t.route(SRV, w) for w in words]
    assert len(set(routes)) == 51 and OVERFLOW_ROUTE in routes
    assert t.overflowed == 10_000 - 50 == routes.count(OVERFLOW_ROUTE)


def test_routes_admitted_before_the_cap_stay_admitted():
    t = RouteTable(max_routes=2)
    assert [t.route(SRV, p) for p in ("/a", "/b", "/c", "/a", "/b")] == \
        ["/a", "/b", OVERFLOW_ROUTE, "/a", "/b"]


def test_the_cap_is_per_server():
    t = RouteTable(max_routes=1)
    assert t.route(("198.18.0.10", 80), "/a") == "/a"
    assert t.route(("198.18.0.11", 80), "/b") == "/b"
    assert t.route(("198.18.0.10", 80), "/b") == OVERFLOW_ROUTE


def test_user_pattern_wins_over_heuristics():
    t = RouteTable(["/files/{name}", "/releases/2024-01-02"])
    assert t.route(SRV, "/files/9f1c2ab7e0") == "/files/{name}"
    assert t.route(SRV, "/releases/2024-01-02") == "/releases/2024-01-02"
    assert t.route(SRV, "/releases/2024-01-03") == "/releases/{id}"


def test_user_pattern_matches_words_heuristics_keep():
    t = RouteTable(["/api/v1/items/{id}"])
    assert t.route(SRV, "/api/v1/items/blue-shirt") == "/api/v1/items/{id}"
    assert t.route(SRV, "/api/v1/items") == "/api/v1/items"            # fewer segments
    assert t.route(SRV, "/api/v1/items/a/b") == "/api/v1/items/a/b"    # more segments
    assert t.route(SRV, "/api/v1/items/") == "/api/v1/items/"          # empty hole


def test_first_matching_user_pattern_wins():
    t = RouteTable(["/u/me", "/u/{user}"])
    assert t.route(SRV, "/u/me") == "/u/me"
    assert t.route(SRV, "/u/ann") == "/u/{user}"


def test_user_pattern_routes_are_never_folded():
    t = RouteTable(["/p/{x}"], max_routes=1)
    assert t.route(SRV, "/a") == "/a"
    assert t.route(SRV, "/b") == OVERFLOW_ROUTE
    assert t.route(SRV, "/p/anything") == "/p/{x}" and t.overflowed == 1


def test_user_pattern_applies_to_absolute_form():
    t = RouteTable(["/a/{b}"])
    assert t.route(SRV, "http://h.example/a/zz") == "/a/{b}"


@pytest.mark.parametrize("bad", ["api/{id}", "/a/{}", "/a/x{id}", "/a/{1x}", "/a/{id"])
def test_bad_user_pattern_is_a_clear_error(bad):
    with pytest.raises(RedtapError, match="route pattern"):
        RoutePattern(bad)


def test_max_routes_must_be_positive():
    with pytest.raises(RedtapError, match="max-routes"):
        RouteTable(max_routes=0)


def test_template_cache_is_bounded_and_results_stay_right():
    t = RouteTable(cache_size=10)
    for i in range(1000):
        assert t.route(SRV, f"/n/{i}") == "/n/{id}"
    assert len(t._cache) <= 10


def test_server_key_prefers_the_kubernetes_service():
    rec = {"server.address": "198.18.0.10", "server.port": 80}
    assert server_key(rec) == ("198.18.0.10", 80)
    rec.update({"server.k8s.service.name": "web", "server.k8s.namespace.name": "shop"})
    assert server_key(rec) == ("shop", "web")


def test_component_adds_route_and_keeps_raw_path():
    c = RouteComponent()
    rec = {"server.address": "198.18.0.10", "server.port": 80, "url.path": "/users/42"}
    c.process(rec)
    assert rec["url.path"] == "/users/42" and rec["http.route"] == "/users/{id}"
    assert c.counters() == {"routes": {"distinct": 1, "overflowed": 0}}
