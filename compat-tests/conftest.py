"""Starts the real mlxserver binary with the real small models for the compatibility suite.

The binary comes from MLXSERVER_BIN (scripts/test.sh sets it); the models from
MLXSERVER_TEST_MODELS (scripts/fetch-models.sh fills it).
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
import requests

BIN = os.environ.get("MLXSERVER_BIN", "mlxserver")
MODELS = os.environ.get("MLXSERVER_TEST_MODELS", os.path.expanduser("~/.cache/mlxserver/models"))
CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"
API_KEY = "compat-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(home, *args):
    env = dict(os.environ, MLXSERVER_HOME=home)
    return subprocess.run([BIN, *args], env=env, check=True, capture_output=True, text=True)


def start_server(extra_env=None):
    """Registers the small models in a fresh home and starts `mlxserver serve` on a free port."""
    home = tempfile.mkdtemp(prefix="mlxserver-compat-")
    run_cli(home, "pull", os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf"), "--name", CHAT_MODEL)
    run_cli(home, "pull", os.path.join(MODELS, "all-MiniLM-L6-v2"), "--name", EMBED_MODEL)
    port = free_port()
    env = dict(os.environ, MLXSERVER_HOME=home, RUST_LOG="warn", **(extra_env or {}))
    process = subprocess.Popen([BIN, "serve", "--port", str(port), "--api-key", API_KEY], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(base + "/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError("mlxserver did not start")
    return process, {"base": base, "key": API_KEY, "home": home, "port": port}


def stop_server(process, info):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    shutil.rmtree(info["home"], ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    process, info = start_server()
    yield info
    stop_server(process, info)


@pytest.fixture(scope="module")
def metrics_server():
    process, info = start_server({"MLXSERVER_METRICS": "true"})
    yield info
    stop_server(process, info)
