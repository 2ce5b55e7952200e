"""The API's guards and error mapping in process, through Starlette's TestClient, beside the
end-to-end tests (test_api.py, test_api_key.py, the dialects' own): the application `exojet api`
builds, as it is before its lifespan has connected it to NATS (nothing here needs a server)."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client as NATS
from starlette.testclient import TestClient

from exojet.api.app import create_app
from exojet.api.config import DEFAULT_PORT, ApiConfig, allowed_hosts

KEY = "sesame-in-process"
CHAT = {"model": "local/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _api(host: str = "127.0.0.1", key: str | None = None, extra_hosts: tuple[str, ...] = ()) -> TestClient:
    """The app as `exojet api --host HOST [--api-key KEY]` configures it; requests come to `host`."""
    config = ApiConfig(nats_url="nats://127.0.0.1:4222", api_key=key, allowed_hosts=allowed_hosts(host, extra_hosts))
    # The connection is only used by the lifespan, which a TestClient outside `with` never runs.
    app = create_app(config, NATS())
    shown = f"[{host}]" if ":" in host else host
    return TestClient(app, base_url=f"http://{shown}:{DEFAULT_PORT}", raise_server_exceptions=False)


def _openai_code(answer: Any) -> str:
    return answer.json()["error"]["code"]


def test_a_loopback_api_answers_loopback_names_only() -> None:
    api = _api()
    for host in (f"127.0.0.1:{DEFAULT_PORT}", f"localhost:{DEFAULT_PORT}", f"[::1]:{DEFAULT_PORT}", "LOCALHOST"):
        assert api.get("/health", headers={"Host": host}).status_code == 503, host  # past the guard: no NATS yet
    rebound = api.get("/v1/models", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 400 and _openai_code(rebound) == "invalid_host"
    assert "evil.example" in rebound.json()["error"]["message"]


def test_an_api_on_an_address_answers_that_name_and_those_allowed() -> None:
    api = _api("10.1.2.3", extra_hosts=("api.example",))
    assert api.get("/health").status_code == 503
    assert api.get("/health", headers={"Host": "api.example"}).status_code == 503
    assert _openai_code(api.get("/health", headers={"Host": "localhost"})) == "invalid_host"
    # Bound to every address with no --allowed-host: any name.
    assert _api("0.0.0.0").get("/health", headers={"Host": "anything.example"}).status_code == 503


def test_the_key_is_required_everywhere_but_health_and_login() -> None:
    api = _api(key=KEY)
    assert api.get("/health").json() == {"status": "unavailable", "nats": False}
    missing = api.get("/openapi.json")
    assert missing.status_code == 401 and _openai_code(missing) == "invalid_api_key"
    assert "Missing API key" in missing.json()["error"]["message"]
    wrong = api.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Incorrect API key" in wrong.json()["error"]["message"]
    # The right key, as a bearer token or in Anthropic's header, gets past the guard (to "no NATS yet").
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        past = api.get("/v1/models", headers=headers)
        assert past.status_code == 503 and _openai_code(past) == "starting", headers
    # A browser opening the page is asked for the key.
    page = api.get("/")
    assert page.status_code == 401 and "enter the key" in page.text and page.headers["www-authenticate"] == "Bearer"
    assert api.post("/login", data={"key": "nope"}).status_code == 401


def test_a_refusal_comes_in_the_shape_of_the_dialect_its_path_belongs_to() -> None:
    api = _api(key=KEY)
    anthropic = api.post("/v1/messages", json=CHAT)
    assert anthropic.status_code == 401
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "authentication_error"
    ollama = api.post("/api/chat", json=CHAT)
    assert ollama.status_code == 401 and isinstance(ollama.json()["error"], str)
    assert _openai_code(api.post("/v1/completions", json=CHAT)) == "invalid_api_key"


def test_unknown_routes_and_methods_are_each_dialects_404_and_405() -> None:
    api = _api()
    unknown = api.get("/v1/nothing")
    assert unknown.status_code == 404 and _openai_code(unknown) == "not_found"
    method = api.delete("/v1/models")
    assert method.status_code == 405 and _openai_code(method) == "method_not_allowed"
    assert "GET" in method.headers["allow"]
    assert api.get("/api/nothing").status_code == 404 and isinstance(api.get("/api/nothing").json()["error"], str)
    wrong = api.get("/v1/messages")
    assert wrong.status_code == 405 and wrong.json()["type"] == "error"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": []}),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}),
        ("/v1/messages", {"model": "local/tiny", "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/chat", {"model": "local/tiny", "messages": "hi"}),
        ("/v1/completions", {"model": "local/tiny", "prompt": 3}),
    ],
)
def test_a_bad_body_is_a_400_before_anything_is_asked_of_nats(path: str, body: dict[str, Any]) -> None:
    answer = _api().post(path, json=body)
    assert answer.status_code == 400, answer.text  # never a framework's 422, never a 503: NATS is not needed


def test_a_body_that_is_not_json_is_a_400() -> None:
    assert _api().post("/v1/chat/completions", content=b"{not json").status_code == 400


def test_a_good_chat_before_nats_is_a_503_to_retry() -> None:
    answer = _api().post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 503 and _openai_code(answer) == "starting"
    assert answer.headers["retry-after"] == "5"
