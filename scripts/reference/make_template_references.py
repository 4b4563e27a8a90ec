#!/usr/bin/env python3
"""Reference renderings of real chat templates, made by transformers' own Jinja code path.

Writes tests/fixtures/templates/expected.json, which tests/it/templates.rs compares byte for byte
with mlxserver's minijinja rendering (src/engine/template.rs).

The templates (tests/fixtures/templates/*.jinja) are verbatim copies of llama.cpp's
models/templates/ (ggml-org/llama.cpp, as mirrored at commit 1eeb523c of a fork; SmolLM3's is
the Unsloth-edited copy llama.cpp keeps). Rendering goes through
`transformers.utils.chat_template_utils.render_jinja_template`, i.e. the very
ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks, loopcontrols, AssistantTracker) with
transformers' `tojson` (ensure_ascii=False), `raise_exception` and `strftime_now` that
`apply_chat_template` uses. Variables are those `apply_chat_template` passes (messages, tools,
documents=None, add_generation_prompt, bos_token, eos_token, and enable_thinking when set).

Messages are written exactly the way mlxserver's `TemplateMessage` serializes them: `content` is
always a string (an assistant turn that only calls tools has ""), absent optional keys are
absent (not None), tool calls look like {"id", "type": "function", "function": {"name",
"arguments": <dict>}}, and tools like src/engine/tools.rs `template_tools`:
{"type": "function", "function": {"name", "description", "parameters"}}.

`strftime_now` is the one non-deterministic input: here it returns the marker
"\\u0000strftime:<format>\\u0000", which the Rust test replaces with today's date in that format
before comparing (chrono and Python agree on %d %b %Y and %B %d, %Y).

Cases where the template itself raises (Gemma 2 rejects a system turn, ...) are recorded with
"error" instead of "rendered"; the Rust test checks that mlxserver raises too.

Run (transformers and jinja2 from the family venv; no model download):
    ~/.cache/mlxserver/familyvenv/bin/python scripts/reference/make_template_references.py
"""

import copy
import datetime as _datetime
import json
from pathlib import Path

import jinja2
import transformers
from transformers.utils import chat_template_utils

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "templates"

# template file stem -> (bos_token, eos_token, has a thinking switch), the tokens as the
# models' tokenizer_config.json has them ("" where the model has none).
TEMPLATES = {
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>", True),
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>", False),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", False),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", False),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>", False),
    "google-gemma-2-2b-it": ("<bos>", "<eos>", False),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>", False),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True),
    "ibm-granite-granite-3.3-2B-Instruct": ("<|end_of_text|>", "<|end_of_text|>", False),
    "HuggingFaceTB-SmolLM3-3B": ("", "<|im_end|>", True),
}

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city (temperature & sky: 'sunny', <cloudy>, ...).",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

# Mistral's template wants 9-character alphanumeric call ids.
CALL_ID = "a1B2c3D4e"

THINKING_ANSWER = "<think>\nThe user greets me; reply briefly.\n</think>\n\nHello! How can I help?"

CASES = {
    "system_user": {"messages": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]},
    "multi_turn": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Japan? Answer with “quotes”."},
        ]
    },
    # Gemma 2 refuses a system turn; this is the chat every template must take.
    "multi_turn_no_system": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "  Tell me a joke.  "},
        ]
    },
    "tools": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What is the weather in Zürich?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": CALL_ID,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}},
                    }
                ],
            },
            {"role": "tool", "content": '{"temperature": 21, "condition": "sunny"}', "tool_call_id": CALL_ID},
            {"role": "assistant", "content": "It is 21 °C and sunny in Zürich."},
            {"role": "user", "content": "Thanks. And tomorrow?"},
        ],
        "tools": TOOLS,
    },
    "thinking_history": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": THINKING_ANSWER},
            {"role": "user", "content": "What is 2 + 2?"},
        ]
    },
}
THINKING_CASES = {
    "thinking_off": ("thinking_history", False),
    "thinking_on": ("thinking_history", True),
    "tools_thinking_off": ("tools", False),
}

STRFTIME_MARK = "\u0000strftime:{}\u0000"


class _MarkedNow:
    def strftime(self, format):
        return STRFTIME_MARK.format(format)


class _MarkedDatetime:
    @staticmethod
    def now():
        return _MarkedNow()


def render(source, case, bos, eos, enable_thinking):
    kwargs = {"bos_token": bos, "eos_token": eos}
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[copy.deepcopy(case["messages"])],
        tools=copy.deepcopy(case.get("tools")),
        chat_template=source,
        add_generation_prompt=True,
        **kwargs,
    )
    return rendered[0]


def main():
    # strftime_now is a closure over the module's `datetime` name.
    chat_template_utils.datetime = _MarkedDatetime
    entries = []
    for name, (bos, eos, thinks) in TEMPLATES.items():
        source = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
        runs = [(case_name, case_name, None) for case_name in CASES]
        if thinks:
            runs += [(label, base, flag) for label, (base, flag) in THINKING_CASES.items()]
        for label, base, enable_thinking in runs:
            case = CASES[base]
            entry = {
                "template": name,
                "case": label,
                "variables": {
                    "messages": case["messages"],
                    "tools": case.get("tools"),
                    "enable_thinking": enable_thinking,
                    "bos_token": bos,
                    "eos_token": eos,
                    "add_generation_prompt": True,
                },
            }
            try:
                entry["rendered"] = render(source, case, bos, eos, enable_thinking)
                status = "ok"
            except (jinja2.TemplateError, TypeError) as error:
                entry["error"] = f"{type(error).__name__}: {error}"
                status = entry["error"]
            entries.append(entry)
            print(f"{name:45} {label:22} {status}")
    out = FIXTURES / "expected.json"
    out.write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(entries)} entries)"
          f" with transformers {transformers.__version__}, jinja2 {jinja2.__version__}")


if __name__ == "__main__":
    main()
