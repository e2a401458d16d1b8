"""Secrets in URLs: the Redactor component and its command-line wiring."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyloader.cli import build_parser
from pyloader.pipeline.stages import redaction
from pyloader.errors import ConfigError
from pyloader.pipeline.redact import DEFAULT_KEYS, MASK, Redactor, parse_keys


def rec(path="/p", query=None) -> dict:
    r = {"url.path": path, "http.request.method": "GET"}
    if query is not None:
        r["url.query"] = query
    return r


def redacted(query: str, **kw) -> str:
    r = rec(query=query)
    Redactor(**kw).process(r)
    return r["url.query"]


@pytest.mark.parametrize("key", ["token", "access_token", "api_key", "X-Amz-Signature",
                                 "client_secret", "sessionid", "JSESSIONID", "Authorization",
                                 "password", "PassWord", "oauth_token", "apiKey", "refresh-token"])
def test_default_sensitive_keys_are_redacted(key):
    assert redacted(f"page=2&{key}=s3cr3t&x=1") == f"page=2&{key}={MASK}&x=1"


def test_other_params_and_separators_kept_byte_for_byte():
    q = "a=1;token=t&b=%20x+y&&c&d=e=f&token=u;z="
    assert redacted(q) == f"a=1;token={MASK}&b=%20x+y&&c&d=e=f&token={MASK};z="


def test_value_with_equals_signs_is_hidden_whole():
    assert redacted("sig=1&signature=a=b==") == f"sig=1&signature={MASK}"


@pytest.mark.parametrize("key", ["%74oken", "t%6Fken", "T%256Fken", "acc%65ss%5Ftoken",
                                 "pass%77ord"])
def test_percent_encoded_keys_are_recognised(key):
    assert redacted(f"{key}=x") == f"{key}={MASK}"


def test_plus_in_key_decodes_to_space():
    # "api+key" is "api key" to a server: still contains "key"
    assert redacted("api+key=x") == f"api+key={MASK}"


def test_key_without_value_or_with_empty_value_unchanged():
    for q in ("token", "token=", "a=1&token&b=2", "token=&a=1"):
        assert redacted(q) == q


def test_harmless_query_untouched_and_not_counted():
    r, red = rec(query="page=2&sort=name"), Redactor()
    red.process(r)
    assert r["url.query"] == "page=2&sort=name"
    assert red.counters() == {"redact": {"records": 0, "values": 0}}


def test_counters_count_records_and_values():
    red = Redactor()
    for q in ("token=a&key=b", "x=1", "secret=c"):
        red.process(rec(query=q))
    assert red.counters() == {"redact": {"records": 2, "values": 3}}


def test_already_masked_value_not_counted_again():
    red = Redactor()
    r = rec(query="token=abc")
    red.process(r)
    red.process(r)
    assert r["url.query"] == f"token={MASK}" and red.values == 1


def test_path_parameters_are_redacted():
    r = rec(path="/cart;jsessionid=0A1B2C/items;v=2", query="token=t")
    Redactor().process(r)
    assert r["url.path"] == f"/cart;jsessionid={MASK}/items;v=2"
    assert r["url.query"] == f"token={MASK}"


def test_record_without_query_untouched():
    r = rec(path="/a/b")
    Redactor().process(r)
    assert r == rec(path="/a/b")


def test_invalid_utf8_escapes_in_query_survive():
    # accesslog escapes invalid UTF-8 as \xNN text: redaction works on that text
    q = "n\\xff=1&token=\\xfe\\x00"
    assert redacted(q) == f"n\\xff=1&token={MASK}"


def test_configured_keys_replace_the_defaults():
    keys = parse_keys(" PIN, otp ,pin")
    assert keys == ("pin", "otp")
    assert redacted("pin=1&otp=2&token=3", keys=keys) == f"pin={MASK}&otp={MASK}&token=3"


@pytest.mark.parametrize("bad", ["", " , ", "a b", "to&ken", "x=y", "a;b"])
def test_bad_key_lists_are_a_clear_error(bad):
    with pytest.raises(ConfigError, match="--redact-keys"):
        parse_keys(bad)


def test_cli_default_is_on_with_the_default_keys():
    args = build_parser().parse_args(["run"])
    (comp,) = redaction(args)
    assert isinstance(comp, Redactor) and comp.keys == DEFAULT_KEYS


def test_cli_no_redact_turns_it_off():
    args = build_parser().parse_args(["run", "--no-redact"])
    assert redaction(args) == []


def test_cli_redact_keys():
    args = build_parser().parse_args(["run", "--redact-keys", "pin,OTP"])
    (comp,) = redaction(args)
    assert comp.keys == ("pin", "otp")
    with pytest.raises(ConfigError):
        redaction(build_parser().parse_args(["run", "--redact-keys", ""]))


# -- property: nothing sensitive survives, nothing else changes ------------
_key = st.one_of(st.sampled_from(["token", "Access_Token", "api%5Fkey", "sig", "page", "q",
                                  "monkey", "user", "SESSION", "", "pass%77ord"]),
                 st.text(st.characters(blacklist_characters="&;=", min_codepoint=32,
                                       max_codepoint=0x2FF), max_size=8))
_val = st.text(st.characters(blacklist_characters="&;", min_codepoint=0, max_codepoint=0x2FF),
               max_size=10)
_param = st.one_of(st.builds(lambda k, v: f"{k}={v}", _key, _val), _key)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_param, st.sampled_from("&;")), max_size=8))
def test_property_sensitive_values_hidden_rest_identical(parts):
    query = "".join(p + sep for p, sep in parts)[:-1] if parts else ""
    red = Redactor()
    out, n = red.redact_query(query)
    before, after = re.split(r"([&;])", query), re.split(r"([&;])", out)
    assert len(before) == len(after)
    hidden = 0
    for b, a in zip(before, after):
        key, eq, val = b.partition("=")
        if eq and val and val != MASK and red.sensitive(key):
            assert a == f"{key}={MASK}", (query, out)
            hidden += 1
        else:
            assert a == b, (query, out)
    assert n == hidden
