"""Config resolution: the example documents every key, defaults match the seed, errors are precise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lbd.config import (
    CERTIFICATE_KEYS,
    FAILOVER_KEYS,
    HEALTH_KEYS,
    LIMIT_KEYS,
    TLS_KEYS,
    TOP_LEVEL_KEYS,
    Config,
    load_config,
    load_servers_file,
)
from lbd.errors import ConfigError, ValidationError
from lbd.models import parse_server

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_example_config_loads_and_documents_every_key() -> None:
    config = load_config(EXAMPLES / "lbd.toml", {})
    assert config.servers == EXAMPLES / "servers.json"
    text = (EXAMPLES / "lbd.toml").read_text()
    table_keys = [key for key in TLS_KEYS if key != "certificates"]  # that one is its own [[tls.certificates]]
    assert "# [[tls.certificates]]" in text
    for key in (*TOP_LEVEL_KEYS, *HEALTH_KEYS, *LIMIT_KEYS, *table_keys, *CERTIFICATE_KEYS, *FAILOVER_KEYS):
        assert re.search(rf"^(# )?\[?{key}", text, re.MULTILINE), f"examples/lbd.toml does not mention {key}"
    assert len(load_servers_file(EXAMPLES / "servers.json", config.regions)) == 3


def test_defaults_are_the_seeds() -> None:
    config = Config()
    assert dict(config.regions.latency_ms) == {
        "us-east": 10, "eu-west": 50, "asia-south": 100, "oceania": 150, "ca-central": 30,
    }  # fmt: skip
    assert config.regions.proximity["me-central"] == ("eu-west", "asia-south", "us-east", "ca-central", "oceania")
    assert config.timeout_base_ms == 2000 and config.session_idle_timeout == 9000
    assert config.upstream_timeout_s("eu-west") == pytest.approx(2.05)
    assert (config.failover.home_max_load, config.failover.fallback_max_load) == (0.9, 0.8)
    assert config.failover.failback and config.failover.failback_stable_ms == 30_000


def test_flags_override_file_values(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text('mode = "static"\nlisten = "127.0.0.1:9000"\n')
    config = load_config(path, {"mode": "dynamic", "listen": None})
    assert config.mode == "dynamic" and str(config.listen) == "127.0.0.1:9000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[health]\nfall = 0\n", "health.fall: must be an integer >= 1"),
        ("[health]\npath = 'health'\n", "health.path: must be a path starting with '/'"),
        ("[health]\npanic_threshold = 2\n", "panic_threshold: must be a number from 0 to 1"),
        ("[health]\nbogus = 1\n", "unknown key 'bogus'"),
        ('admin_listen = "127.0.0.1:8079"\n', "admin_listen needs admin_token"),
        ('admin_token = "short"\n', "at least 16 characters"),
        ('default_client_region = "mars"\n', "default_client_region 'mars' is not a client region"),
        ("splice_responses = 1\n", "splice_responses: must be true or false; got 1"),
        ("[health]\npassive_5xx = 'yes'\n", "health.passive_5xx: must be true or false; got 'yes'"),
        ("[failover]\nhome_max_load = 1.5\n", "failover.home_max_load: must be a number from 0.05 to 1.0; got 1.5"),
        ("[failover]\nfailback = 1\n", "failover.failback: must be true or false; got 1"),
        ("[failover]\nfailback_stable_ms = -1\n", "failover.failback_stable_ms: must be an integer >= 0"),
        ("[failover]\nspill = true\n", "unknown key 'spill'"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path, {})


@pytest.mark.parametrize("server_id", ["s1\n", "s 1", "", "-s1"])
def test_a_server_id_is_its_characters_and_nothing_after(server_id: str) -> None:
    # `$` alone would let a trailing line break through, into logs, metrics labels and heads
    entry = {"id": server_id, "url": "http://127.0.0.1:9000", "region": "us-east", "capacity": 10}
    with pytest.raises(ValidationError, match="field 'id' must be 1-64 characters"):
        parse_server(entry, frozenset({"us-east"}))


def test_a_cluster_name_with_a_line_break_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text('[cluster]\nname = "prod\\n"\n')
    with pytest.raises(ConfigError, match=r"cluster\.name: must be 1-64 letters"):
        load_config(path, {})
