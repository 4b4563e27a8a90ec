"""Hostile input over real HTTP: path tricks and odd characters in model names, a 60 MB body,
negative and huge numbers, invalid UTF-8, deeply nested and malformed JSON. Each gets a clear
4xx in its API family's error shape, never a 5xx, and nothing is written outside the store."""
import json
import os

import pytest
import requests

from conftest import API_KEY, CHAT_MODEL, EMBED_MODEL

BAD_NAMES = ["../../etc/passwd", "a/../../b", "..", "/abs/path", "x\u0000y", "n" * 300, "", " ", "a\\..\\b", "model:tag:extra", "%2e%2e%2f"]


def post(server, path, body=None, data=None, headers=None):
    all_headers = {"X-API-Key": API_KEY, **(headers or {})}
    if body is not None:
        data = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    return requests.post(server["base"] + path, data=data, headers=all_headers, timeout=120)


def assert_family_error(response, path):
    assert 400 <= response.status_code < 500, f"{path}: {response.status_code} {response.text[:300]}"
    body = response.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["message"], body
    elif path.startswith("/v1/"):
        assert body["error"]["message"] and body["error"]["type"], body
    else:
        assert isinstance(body["error"], str) and body["error"], body


def chat_body(path, model, **numbers):
    messages = [{"role": "user", "content": "Hi"}]
    if path == "/v1/messages":
        return {"model": model, "messages": messages, "max_tokens": numbers.get("max_tokens", 4)}
    if path == "/v1/chat/completions":
        return {"model": model, "messages": messages, "max_tokens": 4, **numbers}
    if path == "/api/chat":
        return {"model": model, "messages": messages, "stream": False, "options": {"num_predict": 4, **numbers}}
    if path == "/api/generate":
        return {"model": model, "prompt": "Hi", "stream": False, "options": {"num_predict": 4, **numbers}}
    if path == "/generate":
        return {"personality_name": model, "prompt": "Hi", "max_tokens": 4, **numbers}
    raise AssertionError(path)


CHAT_PATHS = ["/v1/chat/completions", "/v1/messages", "/api/chat", "/api/generate", "/generate"]


@pytest.mark.parametrize("path", CHAT_PATHS)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_model_names_are_4xx_in_the_family_shape(server, path, name):
    assert_family_error(post(server, path, chat_body(path, name)), path)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_model_management_refuses_path_tricks_and_writes_nothing_outside(server, name):
    before = set(os.listdir(server["home"]))
    for path, body in [
        ("/api/show", {"model": name}),
        ("/api/copy", {"source": CHAT_MODEL, "destination": name}),
        ("/api/create", {"model": name, "from": CHAT_MODEL, "stream": False}),
        ("/api/create", {"model": "fine-name", "from": name, "stream": False}),
        ("/api/pull", {"model": name, "stream": False}),
        ("/v1/embeddings", {"model": name, "input": "hi"}),
    ]:
        assert_family_error(post(server, path, body), path)
    response = requests.delete(server["base"] + "/api/delete", json={"model": name}, headers={"X-API-Key": API_KEY}, timeout=60)
    assert_family_error(response, "/api/delete")
    assert set(os.listdir(server["home"])) == before
    assert not os.path.exists(os.path.join(server["home"], "..", "etc"))


@pytest.mark.parametrize("path", CHAT_PATHS + ["/v1/embeddings", "/api/embed"])
def test_a_60_mb_body_is_413_in_the_family_shape(server, path):
    body = chat_body(path, CHAT_MODEL) if path in CHAT_PATHS else {"model": EMBED_MODEL, "input": "x"}
    body["padding"] = "x" * (60 * 1024 * 1024)
    response = post(server, path, body)
    assert response.status_code == 413, response.status_code
    assert_family_error(response, path)


@pytest.mark.parametrize("path", CHAT_PATHS + ["/v1/embeddings", "/api/embed", "/api/show", "/v1/completions"])
@pytest.mark.parametrize("payload", [b'{"model": "\xff\xfe", "prompt": "\xc3\x28"}', b"{not json", b"[" * 100000 + b"]" * 100000, b'{"model": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", b"", b"null", b"42"])
def test_malformed_json_is_400_in_the_family_shape(server, path, payload):
    response = post(server, path, data=payload, headers={"Content-Type": "application/json"})
    assert_family_error(response, path)


NUMBERS = [
    {"max_tokens": -1}, {"max_tokens": 10**30}, {"temperature": -3}, {"temperature": 1e308}, {"top_p": 7},
    {"top_k": -5}, {"seed": -1}, {"seed": 2**70}, {"num_predict": 2**63}, {"num_ctx": -100}, {"num_ctx": 10**12},
    {"repeat_penalty": -1e308}, {"n": 1000}, {"logprobs": True, "top_logprobs": 10**9}, {"presence_penalty": 1e300},
]


@pytest.mark.parametrize("path", CHAT_PATHS)
@pytest.mark.parametrize("numbers", NUMBERS, ids=lambda n: json.dumps(n))
def test_negative_and_huge_numbers_are_refused_or_clamped_never_5xx(server, path, numbers):
    response = post(server, path, chat_body(path, CHAT_MODEL, **numbers))
    if response.status_code == 200:
        return
    assert_family_error(response, path)


def test_huge_embedding_inputs_are_clear_errors(server):
    response = post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": [[-1, 10**12]]})
    assert_family_error(response, "/v1/embeddings")
    response = post(server, "/api/embed", {"model": EMBED_MODEL, "input": "x", "dimensions": -4})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
