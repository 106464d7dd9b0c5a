"""A real S3-protocol server for tests: moto's ThreadedMotoServer on port 0, with the standard
AWS variables pointing at it (as an operator would for MinIO or R2)."""

from __future__ import annotations

import itertools
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
from moto.server import ThreadedMotoServer

_buckets = itertools.count()


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables for a local S3-protocol endpoint, as an operator sets them."""
    return {
        "AWS_ACCESS_KEY_ID": "relay-test",
        "AWS_SECRET_ACCESS_KEY": "relay-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


class S3:
    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> S3:
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = aws_env(self.endpoint)
        for name, value in self.env.items():
            self.saved[name] = os.environ.get(name)
            os.environ[name] = value
        return self

    def new_bucket(self) -> str:
        """A fresh bucket; its RELAY_ARCHIVE URL (with a prefix)."""
        name = f"relay-test-{os.getpid()}-{next(_buckets)}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="relay-test", aws_secret_access_key="relay-test-secret",
                     ).create_bucket(Bucket=name)  # fmt: skip
        return f"s3://{name}/outputs"

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.server.stop()


class RefusingS3:
    """An S3 endpoint that refuses every request with 403 AccessDenied (credentials rotated, a
    bucket policy changed): a real HTTP server on port 0. `env` holds the AWS variables for it.
    With `head_size`, a HEAD of any object answers that it exists with that size (a store that
    lists but refuses reads); `methods` records every request's method."""

    BODY = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"

    def __init__(self, head_size: int | None = None) -> None:
        self.head_size = head_size
        self.methods: list[str] = []

    def __enter__(self) -> RefusingS3:
        body, outer = self.BODY, self

        class Refuse(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def refuse(self) -> None:
                outer.methods.append(self.command)
                if self.command == "HEAD" and outer.head_size is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(outer.head_size))
                    self.send_header("Last-Modified", "Thu, 03 Dec 2026 10:00:00 GMT")
                    self.send_header("ETag", '"relay-test"')
                    self.end_headers()
                    return
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = refuse

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.env = aws_env(self.endpoint)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
