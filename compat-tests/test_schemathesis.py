"""Property-based checks of every documented route against /openapi.json: no 5xx and no
response that violates the spec."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import start_server, stop_server


@pytest.fixture
def short_context_server():
    # Fuzzed requests ask for huge max_tokens; a short default window bounds each answer so
    # the run measures the API rather than CPU decode speed.
    process, info = start_server({"MLXSERVER_CONTEXT_LENGTH": "128"})
    yield info
    stop_server(process, info)


def test_schemathesis_finds_no_server_errors_or_spec_violations(short_context_server, tmp_path):
    server = short_context_server
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
    command = [
        exe, "run", server["base"] + "/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        "--max-examples", os.environ.get("SCHEMATHESIS_EXAMPLES", "25"),
        "--header", f"X-API-Key: {server['key']}",
        "--request-timeout", "120",
        "--no-color",
        "--seed", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    print(result.stdout[-20000:])
    print(result.stderr[-5000:])
    assert result.returncode == 0, "schemathesis found failures (output above)"
