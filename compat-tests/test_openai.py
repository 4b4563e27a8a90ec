"""The official OpenAI Python SDK against mlxserver, as its README uses it."""
import base64
import struct

import openai
import pytest
from openai import OpenAI

from conftest import CHAT_MODEL, EMBED_MODEL

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["base"] + "/v1", api_key=server["key"])


def test_chat_completion(client):
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
    )
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens > 10
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == CHAT_MODEL


def test_streaming_chat_matches_non_streaming(client):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert len(pieces) > 3
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_japanese_stream_is_valid_utf8_and_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "日本の首都はどこですか？"}]
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=40)
    pieces = []
    for chunk in client.chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=40, stream=True):
        for choice in chunk.choices:
            if choice.delta.content:
                assert "\ufffd" not in choice.delta.content
                choice.delta.content.encode("utf-8")
                pieces.append(choice.delta.content)
    assert "".join(pieces) == whole.choices[0].message.content


def test_max_tokens_gives_length(client):
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_stop_sequences(client):
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, stop=["Paris"]
    )
    assert "Paris" not in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    args = dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Tell me a fun fact."}], temperature=1.0, seed=42, max_tokens=20)
    first = client.chat.completions.create(**args).choices[0].message.content
    second = client.chat.completions.create(**args).choices[0].message.content
    assert first == second


def test_completions(client):
    completion = client.completions.create(model=CHAT_MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip()
    assert completion.usage.completion_tokens <= 8
    pieces = [c.choices[0].text for c in client.completions.create(model=CHAT_MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == completion.choices[0].text


def test_embeddings(client):
    response = client.embeddings.create(model=EMBED_MODEL, input=["The cat sits on the mat.", "A feline rests on a rug.", "Stock prices fell."])
    vectors = [d.embedding for d in response.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert response.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model=EMBED_MODEL, input="The cat sits on the mat.", encoding_format="base64")
    decoded = struct.unpack(f"<{len(vectors[0])}f", base64.b64decode(b64.data[0].embedding))
    assert max(abs(a - b) for a, b in zip(decoded, vectors[0])) < 1e-6


def test_models(client):
    ids = {m.id for m in client.models.list()}
    assert {CHAT_MODEL, EMBED_MODEL} <= ids
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["code"] == "model_not_found"


def test_bad_key_is_401(server):
    bad = OpenAI(base_url=server["base"] + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_parameters_are_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert error.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED_MODEL, input="x", dimensions=12)
