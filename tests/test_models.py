"""fastgate.models: names, cloud detection and web tools as Ollama's source decides them; allow-list patterns.

Expected answers for names were read from ollama/ollama `types/model/name.go` (ParseName, IsValid),
`internal/modelref/modelref.go` (ParseRef, parseSourceSuffix) and `server/model_resolver.go`
(parseAndValidateModelRef), and checked against that code.
"""

from __future__ import annotations

import pytest

from fastgate.models import (
    DEFAULT_HOST,
    ModelName,
    is_cloud_model,
    is_web_tool,
    models_allowed,
    names_cloud,
    parse_model_name,
    pattern_allows,
    pattern_error,
    server_web_tool,
    uses_server_web_tools,
)

H = DEFAULT_HOST


def lib(model: str, tag: str = "latest", cloud: bool = False) -> ModelName:
    return ModelName(H, "library", model, tag, cloud)


PARSED = [
    # defaults, case, long forms
    ("llama3", lib("llama3")),
    ("LLAMA3", lib("llama3")),
    ("llama3:latest", lib("llama3")),
    ("Llama3:LATEST", lib("llama3")),
    ("registry.ollama.ai/library/llama3:latest", lib("llama3")),
    ("REGISTRY.OLLAMA.AI/Library/llama3", lib("llama3")),
    ("library/llama3", lib("llama3")),
    ("llama3.2:3b-instruct-q4_K_M", lib("llama3.2", "3b-instruct-q4_k_m")),
    ("qwen2.5:7b", lib("qwen2.5", "7b")),
    ("_why/_the:_stiff", ModelName(H, "_why", "_the", "_stiff")),
    ("evil/llama3", ModelName(H, "evil", "llama3", "latest")),
    ("llama3x/qwen", ModelName(H, "llama3x", "qwen", "latest")),
    ("example.com/me/m:7b", ModelName("example.com", "me", "m", "7b")),
    ("localhost:11434/library/foo", ModelName("localhost:11434", "library", "foo", "latest")),
    ("host:https/ns/m:t", ModelName("host:https", "ns", "m", "t")),
    # a scheme is parsed off the host and does not change the model; an empty host after it is the default
    ("https://registry.ollama.ai/library/llama3", lib("llama3")),
    ("http://EXAMPLE.com/ns/m", ModelName("example.com", "ns", "m", "latest")),
    ("http:///ns/m", ModelName(H, "ns", "m", "latest")),
    # Go's TrimSpace around the whole name
    (" llama3 \n", lib("llama3")),
    ("\u3000llama3\xa0", lib("llama3")),
    # explicit source suffixes are taken off first
    ("llama3:local", lib("llama3")),
    ("gpt-oss:20b:LOCAL", lib("gpt-oss", "20b")),
    ("llama3:cloud", lib("llama3", cloud=True)),
    ("llama3:latest:cloud", lib("llama3", cloud=True)),
    ("llama3:latest-cloud", lib("llama3", cloud=True)),
    ("llama3.2:8b-cloud", lib("llama3.2", "8b", cloud=True)),
    ("llama3:8B-CLOUD", lib("llama3", "8b", cloud=True)),
    ("gpt-oss:120b-cloud", lib("gpt-oss", "120b", cloud=True)),
    ("gpt-oss:120b:cloud", lib("gpt-oss", "120b", cloud=True)),
    ("llama3: cloud", lib("llama3", cloud=True)),  # the suffix itself is trimmed
    ("llama3: 8b-cloud", lib("llama3", "8b", cloud=True)),
    ("localhost:11434/library/foo:cloud", ModelName("localhost:11434", "library", "foo", "latest", True)),
    ("me/m:7b-cloud", ModelName(H, "me", "m", "7b", True)),
    # names that merely contain "cloud" are local
    ("cloud", lib("cloud")),
    ("CLOUD", lib("cloud")),
    ("my-cloud-model", lib("my-cloud-model")),
    ("mycloud:latest", lib("mycloud")),
    ("llama3:mycloud", lib("llama3", "mycloud")),
    ("llama3:cloud8b", lib("llama3", "cloud8b")),
    ("llama3:8b-local", lib("llama3", "8b-local")),
    ("cloud/llama3", ModelName(H, "cloud", "llama3", "latest")),
    ("host:cloud/ns/m", ModelName("host:cloud", "ns", "m", "latest")),
    # longest valid parts
    ("h" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80,
     ModelName("h" * 350, "n" * 80, "m" * 80, "t" * 80)),
]

INVALID = [
    "", "   ", ":", "@", "^", "llama3:", ":latest", "/llama3", "ns/", "//", "//m", "hh//", "a//b",
    "-llama3", "llama3:-8b", "-ns/m", ".ns/m", "ns.x/m", "name:space/m:t", "h/n/m/x",
    "llama 3", "llama3 :cloud", "llama3:8b -cloud", "lláma3", "llama3:8b\x00",
    # digests are no longer parsed: `@` is not a name character
    "llama3@sha256:abc", "m@d", "@sha256:abc", "llama3:latest@sha256:abc",
    # length limits
    "m" * 81, "llama3:" + "t" * 81, "n" * 81 + "/m", "h" * 351 + "/n/m",
    # a cloud suffix on nothing, conflicting sources
    "llama3:-cloud", "foo:cloud:local", "foo:local:cloud", "foo:cloud:cloud", "gpt-oss:20b-cloud:cloud",
    "foo:bar-cloud/baz",
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_parse_model_name(text: str, expected: ModelName) -> None:
    assert parse_model_name(text) == expected


@pytest.mark.parametrize("text", INVALID)
def test_parse_model_name_rejects_what_ollama_rejects(text: str) -> None:
    assert parse_model_name(text) is None


@pytest.mark.parametrize(("text", "_expected"), PARSED)
def test_str_and_shortest_read_back(text: str, _expected: ModelName) -> None:
    name = parse_model_name(text)
    assert name is not None
    assert parse_model_name(str(name)) == name
    assert parse_model_name(name.shortest) == name


def test_display_forms() -> None:
    assert str(lib("llama3")) == "registry.ollama.ai/library/llama3:latest"
    assert str(lib("gpt-oss", "120b", True)) == "registry.ollama.ai/library/gpt-oss:120b:cloud"
    assert lib("llama3").shortest == "llama3:latest"
    assert ModelName(H, "me", "m", "7b").shortest == "me/m:7b"
    assert ModelName("x.io", "library", "m", "7b").shortest == "x.io/library/m:7b"


CLOUD = [
    ("llama3:cloud", True), ("llama3:CLOUD", True), ("llama3.2:8b-cloud", True), ("llama3:8B-CLOUD", True),
    ("gpt-oss:120b-cloud", True), ("gpt-oss:20b:cloud", True), ("llama3: cloud ", True),
    ("localhost:11434/library/foo:cloud", True), ("me/m:7b-Cloud", True),
    # HasExplicitCloudSource does not check the rest of the name: Ollama then refuses it
    ("llama3:-cloud", True), ("llama3 :cloud", True), ("x!:cloud", True),
    ("cloud", False), ("CLOUD", False), ("mycloud:latest", False), ("my-cloud-model", False),
    ("llama3-cloud", False), ("llama3:mycloud", False), ("llama3:cloudy", False), ("llama3:cloud8b", False),
    ("llama3", False), ("llama3:local", False), ("llama3:8b", False), ("", False), ("  ", False),
    ("foo:bar-cloud/baz", False), ("host:cloud/ns/m", False),
    # conflicting suffixes are an error in Ollama, not a cloud reference
    ("foo:cloud:local", False), ("foo:local:cloud", False), ("foo:8b-cloud:cloud", False),
]


@pytest.mark.parametrize(("text", "expected"), CLOUD)
def test_is_cloud_model(text: str, expected: bool) -> None:
    assert is_cloud_model(text) is expected


def test_valid_cloud_names_parse_as_cloud() -> None:
    for text, expected in CLOUD:
        name = parse_model_name(text)
        if name is not None:
            assert name.cloud is expected, text


# (pattern, model names it allows, model names it refuses)
PATTERNS = [
    ("llama3", ["llama3", "LLAMA3", "llama3:latest", "registry.ollama.ai/library/llama3:latest",
                "library/llama3", "llama3:local", " llama3 "],
     ["llama3:8b", "llama3.2", "evil/llama3", "example.com/library/llama3", "llama3:cloud",
      "llama3:latest-cloud", "llama3x", "llama3@sha256:abc", "llama3:"]),
    ("LLAMA3:Latest", ["llama3", "Llama3:LATEST"], ["llama3:8b"]),
    ("llama3*", ["llama3", "llama3.2:3b", "llama3:8b", "LLAMA3:8B", "llama3-gradient:latest",
                 "registry.ollama.ai/library/llama3.1:70b"],
     ["evil/llama3", "llama3x/qwen", "example.com/library/llama3", "llama3:cloud", "llama3.2:8b-cloud",
      "llama3:8B-CLOUD", "llama3:8b:cloud", "qwen2.5"]),
    ("qwen2.5:*", ["qwen2.5", "qwen2.5:latest", "qwen2.5:7b", "QWEN2.5:0.5B-instruct"],
     ["qwen2.5-coder:7b", "qwen2:7b", "qwen2.5:7b-cloud", "me/qwen2.5:7b"]),
    ("*", ["llama3", "qwen2.5:7b", "mycloud:latest", "cloud"],
     ["evil/llama3", "example.com/library/x", "llama3:cloud", "gpt-oss:120b-cloud", "not valid"]),
    ("llama3:8?", ["llama3:8b"], ["llama3:80b", "llama3"]),
    ("llama3:[78]b", ["llama3:7b", "llama3:8b"], ["llama3:9b"]),
    # one slash: namespace/model[:tag] on the default host
    ("me/*", ["me/m", "me/m:7b", "ME/M:7B", "registry.ollama.ai/me/x"],
     ["m", "other/m", "example.com/me/m", "me/m:cloud"]),
    ("library/llama3", ["llama3", "library/llama3:latest"], ["llama3:8b", "me/llama3"]),
    ("*/llama3", ["llama3", "evil/llama3"], ["example.com/evil/llama3", "llama3:8b"]),
    ("*/*", ["llama3", "evil/llama3:8b"], ["example.com/a/b", "evil/llama3:cloud"]),
    # two slashes: host/namespace/model[:tag]
    ("example.com/me/*", ["example.com/me/m", "EXAMPLE.COM/me/m:7b", "http://example.com/me/m"],
     ["me/m", "m", "example.com/other/m", "example.org/me/m"]),
    ("localhost:11434/*/*:*", ["localhost:11434/a/b:c", "localhost:11434/library/foo"],
     ["localhost:11435/a/b", "localhost:11434/library/foo:cloud"]),
    ("*/*/*", ["llama3", "me/m", "example.com/me/m:7b"], ["llama3:cloud"]),
    # a wildcard never crosses a slash
    ("llama*", ["llama3"], ["llama/x", "llamas/llama3"]),
    ("?", ["a"], ["a/b", "ab"]),
    # cloud models only by patterns that name the cloud form
    ("*:cloud", ["llama3:cloud", "gpt-oss:120b-cloud", "gpt-oss:120b:cloud", "GPT-OSS:120B-CLOUD",
                 "llama3.2:8b-cloud"],
     ["llama3", "gpt-oss:120b", "me/m:cloud", "example.com/library/m:cloud", "cloud", "mycloud:latest"]),
    ("*-cloud", ["gpt-oss:120b-cloud", "llama3:cloud", "llama3:8B-CLOUD", "my-cloud", "my-cloud:latest"],
     ["my-cloud:7b", "me/m:7b-cloud", "llama3"]),
    ("gpt-oss:120b-cloud", ["gpt-oss:120b-cloud", "gpt-oss:120b:cloud", "GPT-OSS:120B-Cloud",
                            "registry.ollama.ai/library/gpt-oss:120b-cloud", "gpt-oss:120b: cloud"],
     ["gpt-oss:120b", "gpt-oss:20b-cloud", "gpt-oss:cloud", "gpt-oss:120b:local"]),
    ("gpt-oss:120b:cloud", ["gpt-oss:120b-cloud", "gpt-oss:120b:cloud"],
     ["gpt-oss:120b", "gpt-oss:20b:cloud"]),
    ("gpt-oss:*-cloud", ["gpt-oss:120b-cloud", "gpt-oss:20b:cloud", "gpt-oss:cloud"],
     ["gpt-oss:20b", "llama3:cloud", "gpt-oss-x:20b-cloud"]),
    ("llama3:cloud", ["llama3:cloud", "llama3:latest:cloud", "llama3:latest-cloud", "LLAMA3:CLOUD"],
     ["llama3", "llama3:8b-cloud", "llama3:8b:cloud"]),
    ("me/*:cloud", ["me/m:cloud", "me/m:7b-cloud"], ["m:cloud", "me/m", "you/m:cloud"]),
    ("localhost:11434/library/foo:cloud", ["localhost:11434/library/foo:cloud"],
     ["foo:cloud", "localhost:11434/library/foo"]),
    # ends in "cloud" but not in ":cloud"/"-cloud": local patterns
    ("gpt-oss*cloud", ["gpt-oss-mycloud"], ["gpt-oss:120b-cloud", "gpt-oss:cloud"]),
    ("*cloud", ["mycloud", "cloud"], ["llama3:cloud", "x:8b-cloud"]),
    ("*:*", ["llama3", "llama3:8b"], ["llama3:cloud", "llama3:8b-cloud"]),
    # patterns that can never match
    ("", [], ["llama3", ""]),
    ("a/b/c/d", [], ["a/b/c:d", "llama3"]),
    ("https://registry.ollama.ai/library/llama3", [], ["llama3"]),
]


@pytest.mark.parametrize(("pattern", "allowed", "refused"), PATTERNS)
def test_pattern_matching(pattern: str, allowed: list[str], refused: list[str]) -> None:
    for text in allowed:
        assert models_allowed([pattern], text), f"{pattern!r} should allow {text!r}"
    for text in refused:
        assert not models_allowed([pattern], text), f"{pattern!r} should refuse {text!r}"


def test_pattern_allows_takes_a_resolved_name() -> None:
    assert pattern_allows("llama3*", lib("llama3", "8b"))
    assert not pattern_allows("llama3*", lib("llama3", "8b", cloud=True))
    assert pattern_allows("llama3*-cloud", lib("llama3", "8b", cloud=True))


def test_models_allowed_lists() -> None:
    assert models_allowed([], "anything at all")  # empty: every name, even invalid ones
    assert models_allowed((), "gpt-oss:120b-cloud")  # cloud is the caller's separate decision
    assert models_allowed(iter(["qwen2.5:*", "llama3*"]), "llama3:8b")
    assert models_allowed(["qwen2.5:*", "llama3*"], "qwen2.5:7b")
    assert not models_allowed(["qwen2.5:*", "llama3*"], "mistral")
    assert not models_allowed(["*"], "")
    assert not models_allowed(["*"], "foo:cloud:local")
    assert models_allowed(["*", "*:cloud"], "gpt-oss:120b-cloud")


@pytest.mark.parametrize(("pattern", "ok"), [
    ("llama3*", True), ("qwen2.5:*", True), ("me/*", True), ("example.com:5000/me/m:*", True),
    ("*:cloud", True),
    ("", False), (" llama3", False), ("llama 3", False), ("a/b/c/d", False), ("/m", False), ("me/", False),
    ("a//b", False), ("llama3:", False), (":latest", False),
])
def test_pattern_error(pattern: str, ok: bool) -> None:
    assert (pattern_error(pattern) is None) is ok


WEB_TOOLS = [
    # /v1/messages: strings.HasPrefix(type, "web_search"), whitespace trimmed as cloud_proxy.go does
    (b"/v1/messages", "web_search_20250305", True),
    (b"/v1/messages", "web_search_20260209", True),
    (b"/v1/messages", "web_search", True),
    (b"/v1/messages", " web_search_20250305\n", True),
    (b"/v1/messages", "Web_Search_20250305", False),
    (b"/v1/messages", "WEB_SEARCH", False),
    (b"/v1/messages", "custom", False),
    (b"/v1/messages", "", False),
    (b"/v1/messages", "web_fetch_20250910", False),
    (b"/v1/messages", "x_web_search", False),
    # /v1/responses: type == "web_search" exactly
    (b"/v1/responses", "web_search", True),
    (b"/v1/responses", "web_search_preview", False),
    (b"/v1/responses", " web_search", False),
    (b"/v1/responses", "WEB_SEARCH", False),
    (b"/v1/responses", "function", False),
    (b"/v1/responses", "web_fetch", False),
    # no other route runs server-side tools
    (b"/v1/chat/completions", "web_search", False),
    (b"/api/chat", "web_search", False),
]


@pytest.mark.parametrize(("path", "tool_type", "expected"), WEB_TOOLS)
def test_server_web_tool(path: bytes, tool_type: str, expected: bool) -> None:
    assert server_web_tool(path, tool_type) is expected


def test_uses_server_web_tools() -> None:
    assert uses_server_web_tools(b"/v1/messages", ["custom", "web_search_20250305"])
    assert not uses_server_web_tools(b"/v1/messages", ["custom", "function"])
    assert not uses_server_web_tools(b"/v1/responses", [])
    assert uses_server_web_tools(b"/v1/responses", iter(["function", "web_search"]))


@pytest.mark.parametrize(("tool_type", "expected"), [
    ("web_search_20250305", True), ("web_search", True), (" web_search\t", True),
    ("web_search_preview", True),
    ("WEB_SEARCH", False), ("function", False), ("custom", False), ("", False), (None, False),
    ("web_fetch_20250910", False),
])
def test_is_web_tool_is_the_union_of_both_routes(tool_type: str | None, expected: bool) -> None:
    assert is_web_tool(tool_type) is expected
    assert is_web_tool(tool_type, "web_search") is expected  # the name never decides
    if tool_type is not None:
        routes = (b"/v1/messages", b"/v1/responses")
        assert any(server_web_tool(path, tool_type) for path in routes) is expected


@pytest.mark.parametrize(("pattern", "expected"), [
    ("*:cloud", True), ("*-cloud", True), ("gpt-oss:120b-cloud", True), ("GPT-OSS:120B-CLOUD", True),
    ("me/*:cloud", True), ("h/n/m:cloud", True), ("a/b/c/d:cloud", False),
    ("*", False), ("llama3*", False), ("*cloud", False), ("gpt-oss*cloud", False), ("cloud", False),
])
def test_names_cloud(pattern: str, expected: bool) -> None:
    assert names_cloud(pattern) is expected
