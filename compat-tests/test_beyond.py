"""Structured output, tool calling, logprobs and /metrics, through the official clients and
plain HTTP, against the real server and the real small model."""
import json
import math

import jsonschema
import ollama
import pytest
import requests
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import CHAT_MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["base"] + "/v1", api_key=server["key"])


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_validates(client, seed):
    response = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Invent a user profile."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        temperature=1.0,
        seed=seed,
        max_tokens=200,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_ollama_formats(server, client):
    response = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Describe Paris."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)
    # Sampled: a schema-free object has no size bound, so an answer may run out of tokens;
    # every answer that ends by itself parses.
    for seed in range(4):
        choice = client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Describe Paris."}],
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=200,
        ).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")

    api = ollama.Client(host=server["base"], headers={"X-API-Key": server["key"]})
    chat = api.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "Invent a user."}], format=PERSON, options={"seed": 5, "num_predict": 200})
    jsonschema.validate(json.loads(chat.message.content), PERSON)
    generated = api.generate(model=CHAT_MODEL, prompt="A JSON object about cats:", format="json", options={"temperature": 0, "num_predict": 200})
    assert generated.done_reason == "stop"
    assert isinstance(json.loads(generated.response), dict)


def test_streamed_structured_output_validates(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Invent a user profile."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        seed=11,
        max_tokens=200,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_unusable_schema_is_a_clear_400(server):
    response = requests.post(
        server["base"] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {server['key']}"},
        json={
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}},
}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_call_round_trip(client, stream):
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    request = dict(model=CHAT_MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", seed=7, max_tokens=80)
    if stream:
        calls = {}
        finish = None
        for chunk in client.chat.completions.create(stream=True, **request):
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = delta.id or entry["id"]
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
        assert finish == "tool_calls"
        call = calls[0]
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        response = client.chat.completions.create(**request)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert call_id and call_id.startswith("call_")
    assert name in ("get_weather", "get_time")
    schema = (WEATHER_TOOL if name == "get_weather" else TIME_TOOL)["function"]["parameters"]
    jsonschema.validate(json.loads(arguments), schema)

    # Feed the result back: the model answers in text, using it.
    messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": 21, "unit": "celsius", "sky": "clear"})})
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="none", temperature=0, max_tokens=40)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content.strip()


def test_named_tool_choice_forces_that_function(client):
    response = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Tell me a joke."}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        # Seeded like the round trip above: unseeded, a rare draw spells the city with escapes
        # and runs out of tokens before the call closes.
        seed=7,
        max_tokens=60,
    )
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME_TOOL["function"]["parameters"])


def test_unknown_named_tool_is_rejected(server):
    response = requests.post(
        server["base"] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {server['key']}"},
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    )
    assert response.status_code == 400
    assert "nope" in response.json()["error"]["message"]


def test_ollama_chat_with_tools_answers_and_takes_results(server):
    api = ollama.Client(host=server["base"], headers={"X-API-Key": server["key"]})
    response = api.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL], options={"temperature": 0, "num_predict": 60})
    message = response.message
    # A 135M model may answer in text or call the tool; either way the shape is Ollama's.
    if message.tool_calls:
        assert message.tool_calls[0].function.name == "get_weather"
        assert isinstance(message.tool_calls[0].function.arguments, dict)
    else:
        assert message.content
    follow_up = api.chat(
        model=CHAT_MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
            {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
        ],
        tools=[WEATHER_TOOL],
        options={"temperature": 0, "num_predict": 30},
    )
    assert follow_up.done


def test_chat_logprobs_match_the_greedy_choice(client):
    response = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        max_tokens=12,
    )
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 5
        # Greedy: the chosen token is the likeliest one.
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5)
        tops = [top.logprob for top in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert sum(math.exp(lp) for lp in tops) <= 1.0 + 1e-4
    text = "".join(entry.token for entry in entries)
    assert text.strip() == response.choices[0].message.content.strip()


def test_ollama_logprobs(server):
    body = {"model": CHAT_MODEL, "prompt": "The capital of France is", "stream": False, "logprobs": True, "top_logprobs": 3, "options": {"temperature": 0, "num_predict": 6}}
    response = requests.post(server["base"] + "/api/generate", headers={"X-API-Key": server["key"]}, json=body).json()
    assert len(response["logprobs"]) == response["eval_count"]
    for entry in response["logprobs"]:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"], abs_tol=1e-5)
    streamed = requests.post(server["base"] + "/api/chat", headers={"X-API-Key": server["key"]}, stream=True, json={
        "model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "options": {"num_predict": 5}})
    lines = [json.loads(line) for line in streamed.iter_lines() if line]
    assert sum(len(line.get("logprobs") or []) for line in lines) == lines[-1]["eval_count"]


def test_metrics_parse_as_prometheus_text(metrics_server):
    base, key = metrics_server["base"], metrics_server["key"]
    assert requests.get(base + "/metrics").status_code == 401
    for _ in range(2):
        requests.post(base + "/api/generate", headers={"X-API-Key": key}, json={"model": CHAT_MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 4}}).raise_for_status()
    text = requests.get(base + "/metrics", headers={"X-API-Key": key}).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests_total = families["mlxserver_requests"]
    generate_ok = [s for s in requests_total.samples if s.labels.get("route") == "/api/generate" and s.labels.get("status") == "200"]
    assert generate_ok and generate_ok[0].value == 2
    assert families["mlxserver_completion_tokens"].samples[0].value >= 2
    ttft = families["mlxserver_time_to_first_token_seconds"]
    count = [s for s in ttft.samples if s.name.endswith("_count")][0]
    assert count.value == 2
    assert families["mlxserver_loaded_models"].samples[0].value == 1
    for name in ["mlxserver_queue_depth", "mlxserver_memory_bytes", "mlxserver_prefix_cache_hits", "mlxserver_time_per_output_token_seconds"]:
        assert name in families, name


def test_completions_logprobs(client):
    response = client.completions.create(model=CHAT_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)
