"""A real S3-compatible server on localhost for the object-storage tests (moto's standalone server).

One server per test module; each test gets its own bucket. Clients reach it through the ordinary
AWS environment (AWS_ENDPOINT_URL and fake credentials), exactly as users configure a real one;
nothing is mocked inside the client.
"""
from __future__ import annotations

import logging
import uuid

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server running for this module."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines on stderr
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, tmp_path, monkeypatch):
    """The environment a client (this process or a child) needs: endpoint, fake credentials, a cache dir."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "PYCKPT_CACHE_DIR": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket name (created) and an fsspec filesystem to look at it directly."""
    import fsspec

    name = f"b-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(name)
    return name, fs
