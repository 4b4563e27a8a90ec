"""The README's curl examples, run against the test server as written (host, port and key
substituted)."""
import json
import os
import re
import shlex
import subprocess

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_curl_commands():
    text = open(README, encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


def test_the_readme_has_curl_examples():
    assert len(readme_curl_commands()) >= 2


@pytest.mark.parametrize("command", readme_curl_commands())
def test_readme_curl_example(server, command):
    command = command.replace("127.0.0.1:27000", f"127.0.0.1:{server['port']}")
    argv = shlex.split(command)
    argv[1:1] = ["-sS", "--fail-with-body", "-H", f"X-API-Key: {server['key']}"]
    result = subprocess.run(argv, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    body = result.stdout.decode("utf-8")
    assert body.strip()
    if '"stream": false' in command:
        answer = json.loads(body)
        assert answer.get("message", {}).get("content") or answer.get("response") or answer.get("choices")
