"""The official ollama Python package against mlxserver, as its README uses it."""
import ollama
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server["base"], headers={"X-API-Key": server["key"]})


def test_chat(client):
    response = client.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": QUESTION}], options={"temperature": 0})
    assert "Paris" in response.message.content
    assert response.done and response.done_reason == "stop"
    assert response.eval_count > 0 and response.prompt_eval_count > 10
    assert response.total_duration > response.eval_duration > 0


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat(model=CHAT_MODEL, messages=messages, options={"temperature": 0, "num_predict": 24})
    parts = list(client.chat(model=CHAT_MODEL, messages=messages, options={"temperature": 0, "num_predict": 24}, stream=True))
    assert parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert len(parts) > 3


def test_generate_with_context(client):
    first = client.generate(model=CHAT_MODEL, prompt="My name is Ada. Remember it.", options={"temperature": 0, "num_predict": 16})
    assert first.context and len(first.context) > 10
    second = client.generate(model=CHAT_MODEL, prompt="What is my name?", context=first.context, options={"temperature": 0, "num_predict": 16})
    assert second.response


def test_generate_raw_and_num_predict(client):
    response = client.generate(model=CHAT_MODEL, prompt="The quick brown fox", raw=True, options={"temperature": 0, "num_predict": 6})
    assert response.eval_count == 6 and response.done_reason == "length"


def test_embed(client):
    response = client.embed(model=EMBED_MODEL, input=["Hello world", "こんにちは世界"])
    assert len(response.embeddings) == 2 and len(response.embeddings[0]) == 384
    legacy = client.embeddings(model=EMBED_MODEL, prompt="Hello world")
    assert abs(legacy.embedding[0] - response.embeddings[0][0]) < 1e-6


def test_list_show_ps(client):
    models = {m.model: m for m in client.list().models}
    assert f"{CHAT_MODEL}:latest" in models
    # SmolLM2-135M: the parameter count Ollama's clients show, from the weights.
    assert models[f"{CHAT_MODEL}:latest"].details.parameter_size == "134.5M"
    shown = client.show(CHAT_MODEL)
    assert shown.details.parameter_size == "134.5M" and shown.details.family == "llama"
    assert "FROM" in shown.modelfile
    assert "completion" in shown.capabilities
    client.generate(model=CHAT_MODEL, prompt="hi", options={"num_predict": 1})
    loaded = {m.model for m in client.ps().models}
    assert f"{CHAT_MODEL}:latest" in loaded


def test_create_copy_delete_personality(client):
    client.create(model="pirate", from_=CHAT_MODEL, system="You are a pirate. Always say Arr.", parameters={"temperature": 0})
    assert "You are a pirate" in client.show("pirate").modelfile
    client.copy("pirate", "pirate2")
    assert "pirate2:latest" in {m.model for m in client.list().models}
    response = client.chat(model="pirate2", messages=[{"role": "user", "content": "Hello!"}], options={"num_predict": 12})
    assert response.message.content
    client.delete("pirate2")
    client.delete("pirate")
    with pytest.raises(ollama.ResponseError) as error:
        client.show("pirate")
    assert error.value.status_code == 404


def test_unknown_model_and_bad_key(server, client):
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404
    bad = ollama.Client(host=server["base"], headers={"X-API-Key": "wrong"})
    with pytest.raises(ollama.ResponseError) as error:
        bad.list()
    assert error.value.status_code == 401
