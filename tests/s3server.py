"""A real S3 endpoint for tests: moto's standalone server on loopback, one bucket, dummy credentials.

Clients reach it as they reach AWS, through the standard variables (AWS_ENDPOINT_URL for boto3 and
pyarrow, MLFLOW_S3_ENDPOINT_URL for MLflow's artifact store), so the code under test runs unmodified.
Each test works under its own prefix of the one bucket (`S3Server.prefix()`).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

BUCKET = "overinterp-test"  # moto refuses bucket names that AWS would (e.g. under 3 characters)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    env: dict  # what a user's shell would export to reach this endpoint

    def prefix(self, name: str = "t") -> str:
        """A fresh s3:// URI under the bucket, so tests never see each other's objects."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, uri: str) -> list[str]:
        """Every key under an s3:// URI of this bucket, relative to it."""
        prefix = uri.split(f"s3://{self.bucket}/", 1)[1].rstrip("/") + "/"
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))

    def upload(self, local_dir: str, uri: str) -> None:
        """Copy a local folder to an s3:// URI of this bucket (what `aws s3 cp --recursive` does)."""
        key0 = uri.split(f"s3://{self.bucket}/", 1)[1].rstrip("/")
        c = self.client()
        for d, _, files in os.walk(local_dir):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), local_dir).replace(os.sep, "/")
                c.upload_file(os.path.join(d, f), self.bucket, f"{key0}/{rel}")


def start() -> tuple[S3Server, object]:
    """(the endpoint, moto's server: call .stop() on it)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}  # no 1 s wait for an instance profile that is not there
    s3 = S3Server(endpoint, BUCKET, env)
    s3.client().create_bucket(Bucket=BUCKET)
    return s3, server
