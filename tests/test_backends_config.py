"""[[backends]] and [routing] (issue 9's interface): strict like the rest, errors name the key."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tomllib

from fastgate.config import (
    DEFAULT_BACKEND_NAME,
    BackendConfig,
    Config,
    RoutingConfig,
    UpstreamConfig,
    UpstreamURL,
    build_config,
    load_config,
    parse_upstream_url,
    with_overrides,
)
from fastgate.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def url(text: str) -> UpstreamURL:
    return parse_upstream_url("test", text)


def three_boxes() -> list[dict[str, Any]]:
    return [
        {"name": "gpu1", "url": "http://10.0.0.11:11434", "max_parallel": 4},
        {"name": "gpu2", "url": "http://10.0.0.12:11434", "max_parallel": 4, "weight": 1},
        {"name": "gpu-3_b", "url": "http://10.0.0.13:11434/ollama/", "max_parallel": 0, "weight": 2},
    ]


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(data)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# One backend, exactly as before


def test_no_backends_is_one_default_backend_at_the_default_url() -> None:
    config = Config()
    default_url = UpstreamURL("http", "127.0.0.1", 11434, "")
    assert config.backends == (BackendConfig(DEFAULT_BACKEND_NAME, default_url),)
    assert config.backends[0].name == "default"
    assert config.backends[0].max_parallel == 0 and config.backends[0].weight == 1  # no cap: Ollama queues
    assert build_config({}) == Config()


def test_only_upstream_url_is_one_default_backend_at_that_url() -> None:
    config = build_config({"upstream": {"url": "http://ollama.internal:11500/base/"}})
    assert config.backends == (BackendConfig("default", url("http://ollama.internal:11500/base")),)
    assert config.upstream.url == config.backends[0].url
    assert config.backend_tables == ()


def test_replacing_upstream_keeps_the_default_backend_in_step() -> None:
    # reload and --upstream replace upstream.url; a stored default backend would go stale.
    config = dataclasses.replace(Config(), upstream=UpstreamConfig(url=url("http://10.9.9.9:1")))
    assert config.backends == (BackendConfig("default", url("http://10.9.9.9:1")),)


# ---------------------------------------------------------------------------------------------------------
# Several backends


def test_backends_are_parsed_in_file_order_with_defaults() -> None:
    config = build_config({"backends": three_boxes()})
    assert config.backends == (
        BackendConfig("gpu1", url("http://10.0.0.11:11434"), max_parallel=4, weight=1),
        BackendConfig("gpu2", url("http://10.0.0.12:11434"), max_parallel=4, weight=1),
        BackendConfig("gpu-3_b", UpstreamURL("http", "10.0.0.13", 11434, "/ollama"), max_parallel=0,
                      weight=2),
    )
    assert config.backend_tables == config.backends
    minimal = build_config({"backends": [{"name": "a", "url": "http://h:1"}]}).backends[0]
    assert (minimal.max_parallel, minimal.weight) == (0, 1)


def test_upstream_url_is_the_first_backend_url() -> None:
    # Code that knows one Ollama (until it routes) keeps working: it talks to the first backend.
    assert build_config({"backends": three_boxes()}).upstream.url == url("http://10.0.0.11:11434")
    single = build_config({"backends": [{"name": "solo", "url": "http://10.1.1.1:8080"}]})
    assert single.upstream.url == url("http://10.1.1.1:8080") == single.backends[0].url


def test_upstream_connection_settings_stay_with_backends() -> None:
    config = build_config({"upstream": {"connect_timeout": 0.5, "max_idle_connections": 3},
                           "backends": three_boxes()})
    assert config.upstream.connect_timeout == 0.5 and config.upstream.max_idle_connections == 3
    assert len(config.backends) == 3


def test_upstream_url_together_with_backends_is_an_error() -> None:
    message = config_error({"upstream": {"url": "http://127.0.0.1:11434"}, "backends": three_boxes()})
    assert message.startswith("upstream.url: cannot be set together with [[backends]]")


def test_the_default_url_written_out_also_counts_as_set() -> None:
    # Explicitly set means written in the file, even when it equals the default.
    assert config_error({"upstream": {"url": "http://127.0.0.1:11434"},
                         "backends": [{"name": "a", "url": "http://10.0.0.1:1"}]}).startswith("upstream.url:")


def test_flag_upstream_replaces_the_backends() -> None:
    config = with_overrides(build_config({"backends": three_boxes()}), upstream="http://10.5.5.5:11434")
    assert config.backends == (BackendConfig("default", url("http://10.5.5.5:11434")),)
    assert config.upstream.url == url("http://10.5.5.5:11434")


def test_backends_from_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "fastgate.toml"
    path.write_text(textwrap.dedent("""\
        [upstream]
        read_timeout = 900

        [[backends]]
        name = "gpu1"
        url = "http://10.0.0.11:11434"
        max_parallel = 4

        [[backends]]
        name = "gpu2"
        url = "http://[fd00::12]:11434"
        weight = 3

        [routing]
        queue_timeout = 5
        max_queue = 0
    """))
    config = load_config(str(path))
    assert [b.name for b in config.backends] == ["gpu1", "gpu2"]
    assert config.backends[1].url == UpstreamURL("http", "fd00::12", 11434, "")
    assert config.backends[1].weight == 3
    assert config.upstream.read_timeout == 900.0
    assert config.routing == RoutingConfig(queue_timeout=5.0, max_queue=0)


def test_the_examples_three_gpu_boxes_parse_when_uncommented() -> None:
    text = (ROOT / "config.toml.example").read_text()
    block = re.search(r"^# \[\[backends\]\].*?(?=^[^#]|\Z)", text, re.DOTALL | re.MULTILINE)
    assert block is not None, "config.toml.example shows a commented-out [[backends]] example"
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                            for line in block.group(0).splitlines())
    without_url = re.sub(r"^url = .*\n", "", text.replace(block.group(0), ""), count=1, flags=re.MULTILINE)
    config = build_config(tomllib.loads(without_url + "\n" + uncommented))
    assert [b.name for b in config.backends] == ["gpu1", "gpu2", "gpu3"]
    assert all(b.max_parallel > 0 for b in config.backends)


# ---------------------------------------------------------------------------------------------------------
# [routing]


def test_routing_defaults() -> None:
    routing = Config().routing
    assert routing == RoutingConfig(health_interval=1.0, health_timeout=1.0, inventory_interval=30.0,
                                    loaded_interval=2.0, queue_timeout=30.0, max_queue=512)


def test_every_routing_key_is_parsed() -> None:
    routing = build_config({"routing": {"health_interval": 2, "health_timeout": 0.5, "inventory_interval": 60,
                                        "loaded_interval": 1.5, "queue_timeout": 10, "max_queue": 8}}).routing
    assert routing == RoutingConfig(2.0, 0.5, 60.0, 1.5, 10.0, 8)
    assert isinstance(routing.health_interval, float)


ROUTING_SECONDS = ["health_interval", "health_timeout", "inventory_interval", "loaded_interval",
                   "queue_timeout"]


@pytest.mark.parametrize("key, value",
                         [(k, v) for k in ROUTING_SECONDS for v in (0, -1, "1", True, float("inf"))]
                         + [("max_queue", v) for v in (-1, 1.5, "5", True)] + [("max_qeue", 5)])
def test_routing_errors_name_the_key(key: str, value: object) -> None:
    assert config_error({"routing": {key: value}}).startswith(f"routing.{key}:")


# ---------------------------------------------------------------------------------------------------------
# [[backends]] errors name the table and key


def with_first(**changes: Any) -> dict[str, Any]:
    backends = three_boxes()
    backends[0] = {**backends[0], **changes}
    return {"backends": [b for b in backends]}


@pytest.mark.parametrize("name", ["GPU1", "gpu 1", "", "gpu.1", "gpu/1", "gpü", "x" * 65, 5, None, True])
def test_bad_backend_name(name: object) -> None:
    assert config_error(with_first(name=name)).startswith("backends[0].name: expected a name")


def test_backend_name_limits() -> None:
    assert build_config(with_first(name="a" * 64)).backends[0].name == "a" * 64
    assert build_config(with_first(name="0-_z")).backends[0].name == "0-_z"


@pytest.mark.parametrize("value", ["https://10.0.0.1:11434", "10.0.0.1:11434", "http://h:0", "http://h:1?x=1",
                                   5, ""])
def test_backend_url_is_checked_like_upstream_url(value: object) -> None:
    assert config_error(with_first(url=value)).startswith("backends[0].url: ")


@pytest.mark.parametrize("key, value, expected", [
    ("max_parallel", -1, "expected an integer >= 0"), ("max_parallel", 1.5, "expected an integer >= 0"),
    ("max_parallel", True, "expected an integer >= 0"), ("weight", 0, "expected an integer >= 1"),
    ("weight", "2", "expected an integer >= 1"), ("wieght", 2, "unknown key"),
])
def test_backend_value_errors(key: str, value: object, expected: str) -> None:
    assert config_error(with_first(**{key: value})) == f"backends[0].{key}: {expected}" + (
        f", got {value!r}" if expected != "unknown key" else "")


def test_error_names_the_index_of_the_table() -> None:
    data = {"backends": three_boxes()}
    data["backends"][2]["weight"] = -3
    assert config_error(data).startswith("backends[2].weight:")


@pytest.mark.parametrize("missing", ["name", "url"])
def test_name_and_url_are_required(missing: str) -> None:
    data = {"backends": three_boxes()}
    del data["backends"][1][missing]
    assert config_error(data) == f"backends[1].{missing}: required"


def test_names_are_unique() -> None:
    data = {"backends": three_boxes()}
    data["backends"][2]["name"] = "gpu1"
    assert config_error(data) == "backends[2].name: 'gpu1' is already the name of backends[0]"


def test_one_ollama_twice_is_an_error() -> None:
    data = {"backends": three_boxes()}
    data["backends"][1]["url"] = "http://10.0.0.11:11434/"  # the same Ollama as gpu1, written differently
    assert config_error(data).startswith("backends[1].url: 'http://10.0.0.11:11434' is already the URL of "
                                         "backends[0] ('gpu1')")


@pytest.mark.parametrize("value", [{"name": "a", "url": "http://h:1"}, "gpu1", 5, [1], ["a"]])
def test_backends_must_be_an_array_of_tables(value: object) -> None:
    assert config_error({"backends": value}).startswith("backends: expected [[backends]] tables")


def test_an_empty_array_of_backends_is_an_error() -> None:
    assert config_error({"backends": []}) == "backends: expected at least one [[backends]] table"


def test_unknown_section_message_lists_the_new_sections() -> None:
    message = config_error({"backend": {}})
    assert message.startswith("backend: unknown section") and "backends" in message and "routing" in message


@pytest.mark.parametrize("instance", [BackendConfig("a", url("http://h:1")), RoutingConfig()],
                         ids=lambda i: type(i).__name__)
def test_new_config_classes_are_frozen(instance: object) -> None:
    field_name = dataclasses.fields(instance)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(instance, field_name, None)
