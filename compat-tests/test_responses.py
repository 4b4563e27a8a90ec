"""The official OpenAI Python SDK's Responses API (`client.responses`) against mlxserver's
/v1/responses."""
import json

import openai
import pytest
import requests
from openai import OpenAI

from conftest import CHAT_MODEL

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    # Bounded, like the chat tool tests: a forced call always closes within the token budget.
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 30}}, "required": ["location"]},
    "strict": False,
}
FORCE_WEATHER = {"type": "function", "name": "get_weather"}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["base"] + "/v1", api_key=server["key"], max_retries=0)


def assert_finished(resp, limit):
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"
        assert resp.usage.output_tokens == limit
    else:
        assert resp.status == "completed", resp
        assert resp.incomplete_details is None


def test_create_with_string_input(client):
    resp = client.responses.create(model=CHAT_MODEL, input="Say hi", max_output_tokens=16, temperature=0)
    assert resp.object == "response"
    assert resp.id.startswith("resp_")
    assert resp.model == CHAT_MODEL
    assert isinstance(resp.created_at, (int, float)) and resp.created_at > 0
    assert_finished(resp, 16)
    assert isinstance(resp.output_text, str) and resp.output_text
    message = resp.output[0]
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.status in ("completed", "incomplete")
    assert message.content[0].type == "output_text"
    assert message.content[0].text == resp.output_text
    assert message.content[0].annotations == []
    assert resp.usage.input_tokens > 0
    assert 0 < resp.usage.output_tokens <= 16
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.error is None


def test_instructions_and_item_list_input(client):
    plain = client.responses.create(
        model=CHAT_MODEL, input=[{"role": "user", "content": "Name one color."}], max_output_tokens=12, temperature=0
    )
    instructed = client.responses.create(
        model=CHAT_MODEL,
        instructions="You are a painter who answers briefly.",
        input=[{"role": "user", "content": "Name one color."}],
        max_output_tokens=12,
        temperature=0,
    )
    parts = client.responses.create(
        model=CHAT_MODEL,
        instructions="You are a painter who answers briefly.",
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name one color."}]}],
        max_output_tokens=12,
        temperature=0,
    )
    for resp in (plain, instructed, parts):
        assert resp.object == "response"
        assert_finished(resp, 12)
        assert resp.output[0].type == "message"
    assert instructed.instructions == "You are a painter who answers briefly."
    # Instructions are the system message: the same prompt as a developer turn in the input.
    # (Fewer tokens than none at all is possible: SmolLM2's template adds a longer default.)
    as_developer = client.responses.create(
        model=CHAT_MODEL,
        input=[{"role": "developer", "content": "You are a painter who answers briefly."}, {"role": "user", "content": "Name one color."}],
        max_output_tokens=12,
        temperature=0,
    )
    assert instructed.usage.input_tokens == as_developer.usage.input_tokens != plain.usage.input_tokens
    assert instructed.output_text == as_developer.output_text
    # A string content and a list of input_text parts are the same prompt.
    assert parts.usage.input_tokens == instructed.usage.input_tokens
    assert parts.output_text == instructed.output_text

    # Earlier turns given as items (a system/developer message and an assistant reply) are read.
    history = client.responses.create(
        model=CHAT_MODEL,
        input=[
            {"role": "developer", "content": "You answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name one color."},
        ],
        max_output_tokens=12,
        temperature=0,
    )
    assert_finished(history, 12)
    assert history.usage.input_tokens > plain.usage.input_tokens


def test_streaming_events(client):
    request = dict(model=CHAT_MODEL, input="Name three colors.", max_output_tokens=24, temperature=0)
    whole = client.responses.create(**request)
    events = list(client.responses.create(stream=True, **request))
    types = [e.type for e in events]

    assert types[0] == "response.created"
    assert events[0].response.status in ("queued", "in_progress")
    assert events[0].response.output == []
    body = [t for t in types if t != "response.in_progress"]
    collapsed = [t for i, t in enumerate(body) if i == 0 or not (t == "response.output_text.delta" and body[i - 1] == t)]
    last = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert collapsed == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ], types
    if "response.in_progress" in types:
        assert types.index("response.in_progress") == 1

    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), numbers

    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.output_index == 0
    assert added.item.type == "message" and added.item.status == "in_progress" and added.item.content == []
    item_id = added.item.id
    part_added = next(e for e in events if e.type == "response.content_part.added")
    assert part_added.item_id == item_id and part_added.content_index == 0
    assert part_added.part.type == "output_text" and part_added.part.text == ""

    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2
    assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in deltas)
    text = "".join(e.delta for e in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text and done.item_id == item_id
    part_done = next(e for e in events if e.type == "response.content_part.done")
    assert part_done.part.text == text
    item_done = next(e for e in events if e.type == "response.output_item.done")
    assert item_done.item.id == item_id and item_done.item.content[0].text == text

    final = events[-1].response
    assert final.id == events[0].response.id
    assert final.status == whole.status
    assert final.output_text == text
    assert text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_streaming_wire_format_names_every_event(server):
    response = requests.post(
        server["base"] + "/v1/responses",
        headers={"Authorization": f"Bearer {server['key']}"},
        json={"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 6, "temperature": 0, "stream": True},
        stream=True,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    name, pairs = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                continue
            pairs.append((name, json.loads(payload)["type"]))
            name = None
    assert pairs and all(event == kind for event, kind in pairs), pairs


def test_previous_response_id_retrieve_and_delete(client):
    r1 = client.responses.create(model=CHAT_MODEL, input="My name is Ana. Say hello to me.", max_output_tokens=10, temperature=0)
    assert r1.store in (None, True)
    r2 = client.responses.create(
        model=CHAT_MODEL, input="What is my name?", previous_response_id=r1.id, max_output_tokens=10, temperature=0
    )
    assert r2.previous_response_id == r1.id
    assert r2.id != r1.id
    # r1's input and answer come before r2's question.
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens

    fetched = client.responses.retrieve(r1.id)
    assert fetched.id == r1.id
    assert fetched.object == "response"
    assert fetched.output_text == r1.output_text
    assert fetched.usage.input_tokens == r1.usage.input_tokens

    client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r1.id)
    # r2 stays until it is deleted itself.
    assert client.responses.retrieve(r2.id).id == r2.id


def test_store_false_is_not_kept(client):
    unstored = client.responses.create(model=CHAT_MODEL, input="Say hi", max_output_tokens=6, temperature=0, store=False)
    assert unstored.status in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
        client.responses.create(model=CHAT_MODEL, input="And again?", previous_response_id=unstored.id, max_output_tokens=6, temperature=0)
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
        client.responses.create(model=CHAT_MODEL, input="Hi", previous_response_id="resp_doesnotexist", max_output_tokens=6, temperature=0)


def test_function_call_round_trip(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    resp = client.responses.create(
        model=CHAT_MODEL, input=[question], tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_output_tokens=100, temperature=0
    )
    assert resp.status == "completed"
    calls = [item for item in resp.output if item.type == "function_call"]
    assert calls, resp.output
    call = calls[0]
    assert call.name == "get_weather"
    assert call.call_id
    assert call.id and call.id != call.call_id
    assert call.status == "completed"
    assert isinstance(call.arguments, str)
    arguments = json.loads(call.arguments)
    assert isinstance(arguments, dict) and isinstance(arguments["location"], str)

    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    # Stateless: the whole conversation as input items.
    full = client.responses.create(
        model=CHAT_MODEL,
        input=[question, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}, output],
        tools=[WEATHER_TOOL],
        max_output_tokens=30,
        temperature=0,
    )
    assert full.status in ("completed", "incomplete")
    assert full.output
    # Stateful: only the tool output, chained to the stored response.
    chained = client.responses.create(
        model=CHAT_MODEL, previous_response_id=resp.id, input=[output], tools=[WEATHER_TOOL], max_output_tokens=30, temperature=0
    )
    assert chained.status in ("completed", "incomplete")
    assert chained.output
    assert chained.usage.input_tokens == full.usage.input_tokens
    assert chained.output_text == full.output_text


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"], "additionalProperties": False}
    resp = client.responses.create(
        model=CHAT_MODEL,
        input="Ana was born in 1990. How old is she in 2020? Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
        max_output_tokens=40,
        temperature=0,
    )
    # An unbounded integer must still end: the model has to finish within 40 tokens.
    assert resp.status == "completed", resp
    answer = json.loads(resp.output_text)
    assert set(answer) == {"age"}
    assert isinstance(answer["age"], int) and not isinstance(answer["age"], bool)
    assert resp.text.format.type == "json_schema"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi", max_output_tokens=4)


def test_bad_key_is_401(server):
    bad = OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.responses.create(model=CHAT_MODEL, input="hi", max_output_tokens=4)
