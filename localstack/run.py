#!/usr/bin/env python3
"""LocalStack in host mode (no Docker), for integration tests and benchmarks.

    run.py up      start LocalStack on 127.0.0.1:4566 unless it is already up,
                   wait for /_localstack/health, create Ferry's queues
    run.py down    stop the LocalStack this script started, by its PID
    run.py init    create the command, response and dead-letter queues

LocalStack lives in its own virtualenv (.localstack-venv, made by
``make localstack-venv``) because it pins its own boto3. Its state and log go
to .localstack/ in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".localstack-venv" / "bin" / "python"
STATE_DIR = ROOT / ".localstack"
PID_FILE = STATE_DIR / "localstack.pid"
LOG_FILE = STATE_DIR / "localstack.log"
HOST = "127.0.0.1"
PORT = int(os.environ.get("FERRY_LOCALSTACK_PORT", "4566"))
ENDPOINT = f"http://{HOST}:{PORT}"

# DESIGN.md section 8: hypercorn honours the host part of GATEWAY_LISTEN (the
# default server binds every interface); DNS_ADDRESS=0 keeps its DNS server off.
LOCALSTACK_ENV = {
    "GATEWAY_LISTEN": f"{HOST}:{PORT}",
    "LOCALSTACK_HOST": f"{HOST}:{PORT}",
    "GATEWAY_SERVER": "hypercorn",
    "DNS_ADDRESS": "0",
    "SERVICES": "sqs,s3",
    "SQS_ENDPOINT_STRATEGY": "path",
    "SQS_DELAY_PURGE_RETRY": "1",
    "SQS_DELAY_RECENTLY_DELETED": "1",
    "SKIP_SSL_CERT_DOWNLOAD": "1",
    "DISABLE_EVENTS": "1",
}


def healthy() -> bool:
    try:
        with urllib.request.urlopen(f"{ENDPOINT}/_localstack/health", timeout=2) as response:
            services = json.load(response).get("services", {})
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return all(services.get(name) in ("available", "running") for name in ("sqs", "s3"))


def up(timeout: float = 90.0) -> int:
    """Start LocalStack unless one is already healthy; return 0 when it answers."""
    if healthy():
        print(f"LocalStack already up at {ENDPOINT}")
        return 0
    if not VENV_PYTHON.exists():
        print("no LocalStack virtualenv: run 'make localstack-venv'", file=sys.stderr)
        return 1
    STATE_DIR.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(LOCALSTACK_ENV)
    env["FILESYSTEM_ROOT"] = str(STATE_DIR / "fs")
    with LOG_FILE.open("ab") as log:
        # cwd is the state directory so this repository's localstack/ folder
        # never shadows the real localstack package.
        process = subprocess.Popen(
            [str(VENV_PYTHON), "-m", "localstack.runtime.main"],
            cwd=STATE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    PID_FILE.write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"LocalStack exited with {process.returncode}; see {LOG_FILE}", file=sys.stderr)
            return 1
        if healthy():
            print(f"LocalStack up at {ENDPOINT} (pid {process.pid})")
            return 0
        time.sleep(0.5)
    print(f"LocalStack did not become healthy in {timeout:.0f}s; see {LOG_FILE}", file=sys.stderr)
    down()
    return 1


def down() -> int:
    """Stop the LocalStack we started (by PID); leave any other one alone."""
    if not PID_FILE.exists():
        return 0
    pid = int(PID_FILE.read_text().strip())
    PID_FILE.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


def init() -> int:
    """Create Ferry's default queues (names from FERRY_* or the defaults)."""
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=ENDPOINT,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    dlq = os.environ.get("FERRY_DEAD_LETTER_QUEUE", "ferry-commands-dlq")
    dlq_url = sqs.create_queue(QueueName=dlq)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    # Large on purpose (the appliance's default): poison is dead-lettered by the appliance
    # itself, and receives lost to crashes must not dead-letter a valid command.
    max_receives = os.environ.get("FERRY_MAX_RECEIVE_COUNT", "100")
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives})
    commands = sqs.create_queue(QueueName=os.environ.get("FERRY_COMMAND_QUEUE", "ferry-commands"))
    # Set apart from creation, so queues made by an earlier run get today's attributes.
    sqs.set_queue_attributes(QueueUrl=commands["QueueUrl"], Attributes={"RedrivePolicy": redrive})
    responses = sqs.create_queue(
        QueueName=os.environ.get("FERRY_RESPONSE_QUEUE", "ferry-responses")
    )
    retention = os.environ.get("FERRY_RESPONSE_RETENTION_S", "3600")
    sqs.set_queue_attributes(
        QueueUrl=responses["QueueUrl"], Attributes={"MessageRetentionPeriod": retention}
    )
    print("queues ready")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="LocalStack in host mode for Ferry")
    parser.add_argument("action", choices=["up", "down", "init"])
    action = parser.parse_args().action
    if action == "up":
        return up() or init()
    if action == "down":
        return down()
    return init()


if __name__ == "__main__":
    sys.exit(main())
