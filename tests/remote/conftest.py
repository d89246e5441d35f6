"""A real S3 server for the remote-storage tests: moto in server mode on loopback, one per session.

The tests talk to it through s3fs, as a user's training job talks to S3: no mocked calls. The
server runs in a thread of the test process (``ThreadedMotoServer``) on a free port; subprocesses
(the CLI, a writer killed mid-upload) reach it through ``AWS_ENDPOINT_URL``, as boto does.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs  # noqa: F401 - dev dependencies (moto[server], s3fs): a missing one fails, never skips
from moto import server as moto_server

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server, with test credentials in the environment."""
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket: ``s3://NAME``."""

    name = f"tk-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def options(s3_endpoint: str) -> dict[str, Any]:
    """Explicit ``storage_options`` for the server (what a user passes to the API)."""
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}


@pytest.fixture(scope="session")
def _proxy(s3_endpoint: str) -> Iterator[Any]:
    from tests.remote._proxy import S3Proxy

    proxy = S3Proxy(s3_endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(_proxy: Any) -> Iterator[Any]:
    """The fault-injecting proxy in front of the server, with no fault armed."""
    _proxy.reset()
    yield _proxy
    _proxy.reset()


@pytest.fixture
def via_proxy(proxy: Any) -> dict[str, Any]:
    """``storage_options`` that reach the server through the proxy, with few, quick retries."""
    return {
        "endpoint_url": proxy.url,
        "key": "testing",
        "secret": "testing",
        "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}},
    }
