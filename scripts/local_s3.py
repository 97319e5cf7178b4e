"""A real S3 endpoint on 127.0.0.1 (moto's server mode), to rehearse `--storage s3://...` without a cloud.

    python scripts/local_s3.py --bucket sweeps          # prints the environment to export, serves until Ctrl-C

Then, in another shell, with the printed variables exported:

    python -m tune_lfm.search datasets --scale tiny --storage s3://sweeps/tune-lfm --name rehearsal
    python -m tune_lfm.analysis s3://sweeps/tune-lfm/rehearsal

tune_lfm, Ray Tune and pyarrow find the server through `AWS_ENDPOINT_URL` (pyarrow's S3 filesystem reads it), and the
credentials through `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; nothing in the project names either. Moto keeps the
objects in memory: they are gone when the server stops.
"""

from __future__ import annotations

import argparse
import secrets
import time


def start_s3(bucket: str, port: int = 0):
    """Start the server on a free port (or `port`), create `bucket`; return the server and the environment to use.

    The credentials are fresh random strings: moto accepts any, and a test can search its outputs for them.
    """
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{bound}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
           "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=bucket)
    return server, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", default="sweeps", help="bucket to create (default: sweeps)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    server, env = start_s3(args.bucket, args.port)
    for key, value in env.items():
        print(f"export {key}={value}")
    print(f"# bucket s3://{args.bucket} is ready; Ctrl-C stops the server (and forgets every object)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
