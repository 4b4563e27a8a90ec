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


@pytest.fixture(scope="session")
def server():
    home = tempfile.mkdtemp(prefix="mlxserver-compat-")
    run_cli(home, "pull", os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf"), "--name", CHAT_MODEL)
    run_cli(home, "pull", os.path.join(MODELS, "all-MiniLM-L6-v2"), "--name", EMBED_MODEL)
    port = free_port()
    env = dict(os.environ, MLXSERVER_HOME=home, RUST_LOG="warn")
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
    yield {"base": base, "key": API_KEY, "home": home, "port": port}
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    shutil.rmtree(home, ignore_errors=True)
