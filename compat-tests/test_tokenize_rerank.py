"""/tokenize, /detokenize and /v1/rerank over plain HTTP, against the real small models."""
import math

import pytest
import requests

from conftest import CHAT_MODEL, EMBED_MODEL

DOCUMENTS = [
    "The Eiffel tower stands in Paris. Paris is the capital of France.",
    "Bananas are yellow fruit.",
    "Python is a programming language.",
]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def post(server):
    def post(path, body):
        return requests.post(server["base"] + path, headers={"X-API-Key": server["key"]}, json=body, timeout=120)

    return post


def tokenize(post, body):
    response = post("/tokenize", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_tokenize_prompt(post):
    answer = tokenize(post, {"model": CHAT_MODEL, "prompt": "Hello world"})
    tokens = answer["tokens"]
    assert isinstance(tokens, list) and tokens
    assert all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
    assert answer["count"] == len(tokens)
    longer = tokenize(post, {"model": CHAT_MODEL, "prompt": "Hello world, and hello to everyone else in the room."})
    assert longer["count"] > answer["count"]


def test_tokenize_with_pieces(post):
    answer = tokenize(post, {"model": CHAT_MODEL, "prompt": "Hello world", "with_pieces": True})
    pieces = answer["pieces"]
    assert len(pieces) == len(answer["tokens"]) == answer["count"]
    assert all(isinstance(p, str) for p in pieces)
    assert "world" in "".join(pieces)


def test_tokenize_messages_applies_the_chat_template(post):
    bare = tokenize(post, {"model": CHAT_MODEL, "prompt": "Hello world"})
    messages = [{"role": "user", "content": "Hello world"}]
    templated = tokenize(post, {"model": CHAT_MODEL, "messages": messages})
    assert templated["count"] == len(templated["tokens"])
    assert templated["count"] > bare["count"]
    without_prompt = tokenize(post, {"model": CHAT_MODEL, "messages": messages, "add_generation_prompt": False})
    explicit = tokenize(post, {"model": CHAT_MODEL, "messages": messages, "add_generation_prompt": True})
    assert explicit["tokens"] == templated["tokens"]
    assert bare["count"] < without_prompt["count"] < templated["count"]
    assert templated["tokens"][: without_prompt["count"]] == without_prompt["tokens"]


def test_detokenize_round_trip(post):
    tokens = tokenize(post, {"model": CHAT_MODEL, "prompt": "Hello world"})["tokens"]
    response = post("/detokenize", {"model": CHAT_MODEL, "tokens": tokens})
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == "Hello world"
    text = "Paris, 日本 and émigré — ok?"
    tokens = tokenize(post, {"model": CHAT_MODEL, "prompt": text})["tokens"]
    assert post("/detokenize", {"model": CHAT_MODEL, "tokens": tokens}).json()["prompt"] == text


def test_tokenize_errors(post):
    unknown = post("/tokenize", {"model": "no-such-model", "prompt": "Hello"})
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["message"]


def rerank(post, body):
    response = post("/v1/rerank", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_rerank_orders_by_relevance(post):
    answer = rerank(post, {"model": EMBED_MODEL, "query": QUESTION, "documents": DOCUMENTS, "top_n": 2, "return_documents": True})
    results = answer["results"]
    assert len(results) == 2
    for result in results:
        assert isinstance(result["index"], int) and 0 <= result["index"] < len(DOCUMENTS)
        assert isinstance(result["relevance_score"], float) and math.isfinite(result["relevance_score"])
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 0
    assert results[0]["relevance_score"] > results[1]["relevance_score"]


def test_rerank_without_top_n_returns_every_document(post):
    answer = rerank(post, {"model": EMBED_MODEL, "query": QUESTION, "documents": DOCUMENTS})
    results = answer["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert results[0]["index"] == 0
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_rerank_accepts_document_objects(post):
    as_strings = rerank(post, {"model": EMBED_MODEL, "query": QUESTION, "documents": DOCUMENTS})
    as_objects = rerank(post, {"model": EMBED_MODEL, "query": QUESTION, "documents": [{"text": d} for d in DOCUMENTS], "return_documents": True})
    assert [r["index"] for r in as_objects["results"]] == [r["index"] for r in as_strings["results"]]
    for a, b in zip(as_strings["results"], as_objects["results"]):
        assert math.isclose(a["relevance_score"], b["relevance_score"], abs_tol=1e-5)
    assert as_objects["results"][0]["document"]["text"] == DOCUMENTS[0]


def test_rerank_errors_are_openai_shaped(post):
    empty = post("/v1/rerank", {"model": EMBED_MODEL, "query": QUESTION, "documents": []})
    assert empty.status_code == 400, empty.text
    error = empty.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    unknown = post("/v1/rerank", {"model": "no-such-model", "query": QUESTION, "documents": DOCUMENTS})
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["message"]
