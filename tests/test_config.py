"""Node config: defaults, a full file, and errors that name the key (DESIGN §5, STYLE)."""

from __future__ import annotations

import textwrap

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appscale_tq.config import (
    AppConfig,
    ConfigError,
    NodeConfig,
    RedisAddress,
    config_from_mapping,
    load_config,
    load_config_file,
    parse_redis_url,
)

FULL = textwrap.dedent(
    """\
    listen: tcp:8000:interface=0.0.0.0
    amqp_url: amqps://tq:s3cret@rabbit.internal:5671/tq-vhost
    redis_url: redis://:p%40ss@redis.internal:6380/3
    apps:
      guestbook:
        lb_url: http://10.0.0.5:8080/
      s~other-app:
        lb_url: https://lb.internal
      plain-app:
    tombstone_seconds: 86400
    max_task_bytes: 1048576
    secret: hunter2
    prefetch: 16
    short_wait_seconds: 5
    redis_timeout: 1.5
    amqp_timeout: 2
    namespace: tq-test
    """
)


def refused(text_or_mapping, key):
    with pytest.raises(ConfigError) as info:
        if isinstance(text_or_mapping, str):
            load_config(text_or_mapping)
        else:
            config_from_mapping(text_or_mapping)
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(key + ":")
    return info.value


# --- defaults ---------------------------------------------------------------------------------


def test_defaults():
    config = NodeConfig()
    assert config.listen == "tcp:17446:interface=127.0.0.1"
    assert dict(config.apps) == {"default": AppConfig(lb_url="http://127.0.0.1:8080")}
    assert config.tombstone_seconds == 9 * 86400
    assert config.max_task_bytes == 102400
    assert config.secret is None
    assert config.amqp_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert config.redis == RedisAddress("127.0.0.1", 6379, 0, None)
    assert config.namespace == "tq"
    assert 0 < config.short_wait_seconds <= 60
    assert config.prefetch >= 1


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}", "---\n", "null"])
def test_an_empty_file_gives_the_defaults(text):
    assert load_config(text) == NodeConfig()


def test_default_apps_are_not_shared_between_configs():
    assert NodeConfig().apps is not NodeConfig().apps


# --- a full file ------------------------------------------------------------------------------


def test_full_file():
    config = load_config(FULL)
    assert config.listen == "tcp:8000:interface=0.0.0.0"
    assert config.amqp_url == "amqps://tq:s3cret@rabbit.internal:5671/tq-vhost"
    assert config.redis == RedisAddress("redis.internal", 6380, 3, "p@ss")
    assert dict(config.apps) == {
        "guestbook": AppConfig("http://10.0.0.5:8080"),  # trailing slash dropped
        "s~other-app": AppConfig("https://lb.internal"),
        "plain-app": AppConfig("http://127.0.0.1:8080"),  # no settings: the default LB
    }
    assert config.tombstone_seconds == 86400.0
    assert config.max_task_bytes == 1048576
    assert isinstance(config.max_task_bytes, int)
    assert config.secret == "hunter2"
    assert config.prefetch == 16
    assert config.short_wait_seconds == 5.0
    assert config.redis_timeout == 1.5
    assert config.amqp_timeout == 2.0
    assert config.namespace == "tq-test"


def test_load_config_file(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(FULL, encoding="utf-8")
    assert load_config_file(str(path)) == load_config(FULL)


def test_missing_file_names_the_option(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config_file(str(tmp_path / "nope.yaml"))
    assert info.value.key == "--config"
    assert "nope.yaml" in str(info.value)


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config_file(str(tmp_path))
    assert info.value.key == "--config"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_bytes(b"secret: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path))
    assert info.value.key == "--config"


def test_config_survives_a_second_validation():
    # tap.py re-validates a loaded config with overrides merged in
    config = load_config(FULL)
    merged = attrs.asdict(config, recurse=False)
    merged["apps"] = {app: {"lb_url": a.lb_url} for app, a in config.apps.items()}
    assert config_from_mapping(merged) == config


# --- bad YAML and bad shapes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["apps: [", "listen: 'unterminated", "a: 1\n---\nb: 2\n", "key: value\n  bad: indent\n",
     "? [a, b]\n: 1\n", "\t- tab"],
)
def test_bad_yaml(text):
    refused(text, "(yaml)")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string", "5"])
def test_top_level_must_be_a_mapping(text):
    refused(text, "(top level)")


def test_unknown_top_level_key_is_named():
    error = refused("listne: tcp:1\n", "listne")
    assert "listen" in str(error)  # the known keys are listed
    refused({1: 2}, "1")


# --- every key's bad values -------------------------------------------------------------------

BAD_VALUES = {
    "listen": ["", 5, None, ["tcp:1"]],
    "amqp_url": ["", 5, "http://rabbit", "rabbit:5672", "amqp://h:99999/", "amqp://h:x/",
                 "amqp://h:0/"],
    "redis_url": ["", 5, "http://redis", "redis://h:6379/x", "redis://h:6379/-1",
                  "redis://h:6379/0/1", "redis://h:99999/0", "redis://h:port/0", "redis://h/²",
                  "redis://h/١"],
    "tombstone_seconds": [0, 0.5, -1, "9d", True, None, float("nan"), float("inf"), 10**400,
                          1e10],
    "max_task_bytes": [0, -1, 1.5, "100KiB", True, float("nan"), float("inf"), 10**400,
                       65 * 1024 * 1024],
    "secret": ["", 5, ["a"], True],
    "prefetch": [0, -1, 1.5, 65536, "64", False, float("nan")],
    "short_wait_seconds": [-0.1, 61, 1800, float("nan"), float("inf"), "2s"],
    "redis_timeout": [0, 0.05, float("nan"), float("inf"), 3601, "3"],
    "amqp_timeout": [0, -1, float("nan"), float("-inf"), 10**400, "4"],
    "namespace": ["", 5, "a b", "a:b", "ü", "x" * 65, "amq", "amq.tq", "a/b"],
    "apps": [None, {}, [], "default", 5],
}


@pytest.mark.parametrize(
    "key,value", [(key, value) for key, values in BAD_VALUES.items() for value in values]
)
def test_bad_values_name_their_key(key, value):
    refused({key: value}, key)


GOOD_VALUES = {
    "listen": ["unix:/run/tq.sock", "tcp:0"],
    "amqp_url": ["amqp://localhost", "amqps://u:p@h:5671/%2F", "amqp://[::1]:5672/"],
    "redis_url": ["redis://localhost", "redis://h:1/15", "redis://[::1]:6379/2"],
    "tombstone_seconds": [1, 1.5, 86400 * 365, 1e9],
    "max_task_bytes": [1, 102400, 2**20, 100.0, 64 * 1024 * 1024],
    "secret": [None, "s"],
    "prefetch": [1, 65535, 8.0],
    "short_wait_seconds": [0, 0.5, 60],
    "redis_timeout": [0.1, 5],
    "amqp_timeout": [0.1, 30],
    "namespace": ["tq", "tq_2", "a.b", "amqx", "Q-1"],
}


@pytest.mark.parametrize(
    "key,value", [(key, value) for key, values in GOOD_VALUES.items() for value in values]
)
def test_good_values_are_kept(key, value):
    config = config_from_mapping({key: value})
    assert getattr(config, key) == value


@pytest.mark.parametrize(
    "apps,key",
    [
        ({"guestbook": {"lb_url": "ftp://x"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "127.0.0.1:8080"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://lb/path"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://lb/?q=1"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://lb/#f"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://lb:99999"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://lb:http"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": "http://lb:0"}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": ""}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": 8080}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb_url": None}}, "apps.guestbook.lb_url"),
        ({"guestbook": {"lb": "http://lb"}}, "apps.guestbook.lb"),
        ({"guestbook": {1: "x", "b": "y"}}, "apps.guestbook.1"),
        ({"guestbook": {None: "x"}}, "apps.guestbook.None"),
        ({"guestbook": "http://lb"}, "apps.guestbook"),
        ({"guestbook": ["http://lb"]}, "apps.guestbook"),
        ({"guestbook": []}, "apps.guestbook"),
        ({"guestbook": 0}, "apps.guestbook"),
        ({"guestbook": ""}, "apps.guestbook"),
        ({"bad app": {}}, "apps.bad app"),
        ({"": {}}, "apps."),
        ({5: {}}, "apps.5"),
    ],
)
def test_bad_apps_name_the_app_and_key(apps, key):
    refused({"apps": apps}, key)


def test_bad_app_in_yaml_names_the_key():
    error = refused("apps:\n  guestbook:\n    lb_url: not-a-url\n", "apps.guestbook.lb_url")
    assert "not-a-url" in str(error)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    error = ConfigError("apps.x.lb_url", "bad")
    assert (error.key, str(error)) == ("apps.x.lb_url", "apps.x.lb_url: bad")


# --- redis_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,address",
    [
        ("redis://127.0.0.1:6379/0", RedisAddress("127.0.0.1", 6379, 0, None)),
        ("redis://redis.internal", RedisAddress("redis.internal", 6379, 0, None)),
        ("redis://h/", RedisAddress("h", 6379, 0, None)),
        ("redis://h:6380/12", RedisAddress("h", 6380, 12, None)),
        ("redis://:secret@h:6379/1", RedisAddress("h", 6379, 1, "secret")),
        ("redis://user:secret@h/2", RedisAddress("h", 6379, 2, "secret")),
        ("redis://:p%40ss%3Aword@h/0", RedisAddress("h", 6379, 0, "p@ss:word")),
        ("redis://[::1]:7000/4", RedisAddress("::1", 7000, 4, None)),
        ("redis:///5", RedisAddress("127.0.0.1", 6379, 5, None)),
    ],
)
def test_redis_url(url, address):
    assert parse_redis_url(url) == address
    assert config_from_mapping({"redis_url": url}).redis == address


@given(st.integers(0, 10**6), st.integers(1, 65535), st.text("abcdefgh0123456789", max_size=12))
def test_redis_url_parts_round_trip(db, port, password):
    url = f"redis://:{password}@host.example:{port}/{db}"
    assert parse_redis_url(url) == RedisAddress("host.example", port, db, password or None)


@given(st.text(max_size=40))
def test_any_redis_url_gives_an_address_or_a_config_error(url):
    try:
        address = parse_redis_url(url)
    except ConfigError as e:
        assert e.key == "redis_url"
        return
    assert 0 < address.port < 65536
    assert address.db >= 0


# --- anything at all --------------------------------------------------------------------------

yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=10) | st.integers() | st.none(), inner, max_size=3),
    max_leaves=8,
)
KEYS = ["listen", "amqp_url", "redis_url", "apps", "tombstone_seconds", "max_task_bytes",
        "secret", "prefetch", "short_wait_seconds", "redis_timeout", "amqp_timeout",
        "namespace", "other"]


@given(st.dictionaries(st.sampled_from(KEYS), yaml_values))
def test_any_mapping_gives_a_config_or_a_config_error(data):
    try:
        config = config_from_mapping(data)
    except ConfigError as e:
        assert str(e.key) in KEYS or e.key.startswith("apps.")
        return
    assert config.apps
    assert config.redis.port > 0


@given(st.text(max_size=60))
def test_any_text_gives_a_config_or_a_config_error(text):
    try:
        config = load_config(text)
    except ConfigError as e:
        assert e.key and str(e).startswith(e.key + ": ")
    else:
        assert isinstance(config, NodeConfig)
