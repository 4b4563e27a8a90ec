"""The official Anthropic Python SDK against mlxserver's /v1/messages and
/v1/messages/count_tokens.

The 2.x SDK has no `temperature`/`top_k`/`top_p` keyword arguments any more, so they go
through `extra_body`, which the SDK merges into the JSON body as written."""
import json

import anthropic
import pytest
import requests

from conftest import CHAT_MODEL

GREEDY = {"extra_body": {"temperature": 0}}

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    # Bounded, like the OpenAI tool tests: a forced call always closes within max_tokens.
    "input_schema": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 30}}, "required": ["location"]},
}
FORCE_WEATHER = {"type": "tool", "name": "get_weather"}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server["base"], api_key=server["key"], max_retries=0)


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


def test_messages_create_with_system_and_three_turns(client):
    message = client.messages.create(
        model=CHAT_MODEL,
        system="You answer briefly.",
        messages=[
            {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "I am a helpful assistant."},
            {"role": "user", "content": "Name one color."},
        ],
        max_tokens=16,
        **GREEDY,
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == CHAT_MODEL
    assert message.content and message.content[0].type == "text"
    assert isinstance(message.content[0].text, str)
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.stop_sequence is None
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= 16
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == 16


def test_stop_sequences(client):
    message = client.messages.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 6 like this: 1, 2, 3, 4, 5, 6"}],
        stop_sequences=[","],
        max_tokens=24,
        **GREEDY,
    )
    text = text_of(message)
    assert "," not in text
    assert message.stop_reason in ("stop_sequence", "max_tokens", "end_turn")
    if message.stop_reason == "stop_sequence":
        assert message.stop_sequence == ","
    else:
        assert message.stop_sequence is None


def test_top_k_and_top_p_are_accepted(client):
    messages = [{"role": "user", "content": "Tell me a fun fact."}]
    greedy = client.messages.create(model=CHAT_MODEL, messages=messages, max_tokens=12, **GREEDY)
    # top_k=1 leaves only the likeliest token, whatever the temperature: the greedy answer.
    top1 = client.messages.create(model=CHAT_MODEL, messages=messages, max_tokens=12, extra_body={"temperature": 1.0, "top_k": 1})
    assert text_of(top1) == text_of(greedy)
    nucleus = client.messages.create(model=CHAT_MODEL, messages=messages, max_tokens=12, extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 40})
    assert nucleus.type == "message" and nucleus.content[0].type == "text"


def test_streaming_events_and_final_message(client):
    request = dict(
        model=CHAT_MODEL,
        system="You answer briefly.",
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=24,
        **GREEDY,
    )
    whole = client.messages.create(**request)
    events, deltas = [], []
    with client.messages.stream(**request) as stream:
        for event in stream:
            # The SDK adds its own "text"/"input_json" convenience events; keep the wire ones.
            if event.type in ("text", "input_json", "citation", "thinking", "signature"):
                continue
            events.append(event)
            if event.type == "content_block_delta":
                assert event.delta.type == "text_delta"
                deltas.append(event.delta.text)
        final = stream.get_final_message()

    types = [e.type for e in events]
    collapsed = [t for i, t in enumerate(types) if i == 0 or not (t == "content_block_delta" and types[i - 1] == t)]
    assert collapsed == ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"], types
    assert types.count("content_block_delta") >= 2

    start = events[0].message
    assert start.type == "message" and start.role == "assistant" and start.content == []
    assert start.stop_reason is None
    assert start.usage.input_tokens > 0
    block_start = events[1]
    assert block_start.index == 0 and block_start.content_block.type == "text" and block_start.content_block.text == ""
    assert all(e.index == 0 for e in events if e.type.startswith("content_block"))
    message_delta = events[-2]
    assert message_delta.delta.stop_reason in ("end_turn", "max_tokens")
    assert message_delta.usage.output_tokens > 0

    assert text_of(final) == "".join(deltas)
    assert text_of(final) == text_of(whole)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_streaming_wire_format_names_every_event(server):
    """The SDK skips SSE events without an `event:` line, so each one must carry the name
    that its data's `type` has."""
    response = requests.post(
        server["base"] + "/v1/messages",
        headers={"x-api-key": server["key"], "anthropic-version": "2023-06-01"},
        json={"model": CHAT_MODEL, "max_tokens": 8, "temperature": 0, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        stream=True,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    name, pairs = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data = json.loads(line[len("data:"):].strip())
            pairs.append((name, data["type"]))
            name = None
    assert pairs, "no events"
    assert all(event == kind for event, kind in pairs), pairs
    kinds = [kind for _, kind in pairs if kind != "ping"]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


def test_forced_tool_use_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = client.messages.create(
        model=CHAT_MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=100, **GREEDY
    )
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) >= 1
    use = uses[0]
    assert use.name == "get_weather"
    assert use.id.startswith("toolu_")
    assert isinstance(use.input, dict)
    assert isinstance(use.input["location"], str)

    follow_up = client.messages.create(
        model=CHAT_MODEL,
        messages=[
            *messages,
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}]},
        ],
        tools=[WEATHER_TOOL],
        max_tokens=40,
        **GREEDY,
    )
    assert follow_up.type == "message" and follow_up.role == "assistant"
    assert follow_up.content
    assert follow_up.stop_reason in ("end_turn", "max_tokens", "tool_use")
    for block in follow_up.content:
        assert block.type in ("text", "tool_use")


def test_tool_result_as_content_blocks_and_message_to_param(client):
    """The SDK's own `Message.to_param()` is how agents feed a reply back; tool_result content
    may be a list of text blocks."""
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    message = client.messages.create(
        model=CHAT_MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=100, **GREEDY
    )
    use = next(block for block in message.content if block.type == "tool_use")
    follow_up = client.messages.create(
        model=CHAT_MODEL,
        messages=[
            *messages,
            message.to_param(),
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "Rainy, 12 degrees"}]}]},
        ],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        max_tokens=24,
        **GREEDY,
    )
    assert follow_up.type == "message"
    assert follow_up.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in follow_up.content] == ["text"]


def test_streaming_forced_tool_use(client):
    events = []
    with client.messages.stream(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the weather in Berlin?"}],
        tools=[WEATHER_TOOL],
        tool_choice=FORCE_WEATHER,
        max_tokens=100,
        **GREEDY,
    ) as stream:
        for event in stream:
            if event.type not in ("text", "input_json"):
                events.append(event)
        final = stream.get_final_message()

    starts = [e for e in events if e.type == "content_block_start" and e.content_block.type == "tool_use"]
    assert starts, [e.type for e in events]
    start = starts[0]
    assert start.content_block.name == "get_weather"
    assert start.content_block.id.startswith("toolu_")
    assert start.content_block.input == {}
    json_deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta" and e.index == start.index]
    assert json_deltas
    arguments = json.loads("".join(e.delta.partial_json for e in json_deltas))

    assert final.stop_reason == "tool_use"
    use = next(block for block in final.content if block.type == "tool_use")
    assert use.name == "get_weather" and use.id == start.content_block.id
    assert isinstance(use.input, dict) and use.input == arguments
    assert [e for e in events if e.type == "message_delta"][0].delta.stop_reason == "tool_use"


def test_count_tokens(client):
    short = client.messages.count_tokens(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}])
    long = client.messages.count_tokens(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi, please tell me everything you know about the history of the Roman Empire."}]
    )
    assert short.input_tokens > 0
    assert long.input_tokens > short.input_tokens

    # The count is the prompt the model would read: it matches what messages.create bills.
    request = dict(model=CHAT_MODEL, system="You answer briefly.", messages=[{"role": "user", "content": "Name one color."}])
    counted = client.messages.count_tokens(**request)
    created = client.messages.create(max_tokens=4, **request, **GREEDY)
    assert counted.input_tokens == created.usage.input_tokens

    # System and content given as lists of text blocks (as Claude Code sends them) count the same.
    as_blocks = client.messages.count_tokens(
        model=CHAT_MODEL,
        system=[{"type": "text", "text": "You answer briefly."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name one color."}]}],
    )
    assert as_blocks.input_tokens == counted.input_tokens

    with_tools = client.messages.count_tokens(tools=[WEATHER_TOOL], **request)
    assert with_tools.input_tokens > counted.input_tokens


def test_unknown_model_is_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as error:
        client.messages.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    body = error.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_wrong_key_is_authentication_error(server):
    bad = anthropic.Anthropic(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_missing_max_tokens_is_invalid_request_error(server):
    response = requests.post(
        server["base"] + "/v1/messages",
        headers={"x-api-key": server["key"], "anthropic-version": "2023-06-01"},
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_bad_request_through_the_sdk(client):
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"temperature": 5})
    assert error.value.body["error"]["type"] == "invalid_request_error"
