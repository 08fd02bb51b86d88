"""Stands in for `python -m kvstore` in the launcher tests (via KVCTL_NODE_COMMAND): reads the
node.toml that kvctl wrote and serves /health and a /v1/cluster in which every shard has a
leader. Knobs, from the environment:
    FAKE_NODE_EXIT=1             exit at once with status 3, saying so on stderr
    FAKE_NODE_NO_LEADER=1        report every shard without a leader
    FAKE_NODE_IGNORE_SIGTERM=1   ignore SIGTERM (only SIGKILL stops it)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def cluster_status(config: dict[str, Any], *, has_leaders: bool) -> dict[str, Any]:
    cluster = config["cluster"]
    nodes = cluster["nodes"]
    count = int(cluster["shards"])
    width = (1 << 64) // count
    shards = []
    for index in range(count):
        replicas = [
            nodes[(index + offset) % len(nodes)]["id"] for offset in range(cluster["replication"])
        ]
        shards.append(
            {
                "id": index + 1,
                "start_token": index * width,
                "end_token": (1 << 64) if index == count - 1 else (index + 1) * width,
                "replicas": replicas,
                "leader": replicas[0] if has_leaders else 0,
                "term": 1,
                "replica_status": [],
            }
        )
    return {
        "cluster_id": "fake",
        "epoch": 1,
        "nodes": [
            {
                "id": n["id"],
                "client_url": n["client_url"],
                "peer_address": n["peer_address"],
                "reachable": True,
            }
            for n in nodes
        ],
        "shards": shards,
        "healthy": has_leaders,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    if os.environ.get("FAKE_NODE_EXIT") == "1":
        print("fake node: exiting as asked by FAKE_NODE_EXIT", file=sys.stderr)
        sys.exit(3)
    if os.environ.get("FAKE_NODE_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(args.config, "rb") as file:
        config = tomllib.load(file)
    status = json.dumps(
        cluster_status(config, has_leaders=os.environ.get("FAKE_NODE_NO_LEADER") != "1")
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/v1/cluster":
                body = status
            elif self.path in ("/health", "/ready"):
                body = b'{"ok": true}'
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    host, port = config["client_listen"].rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"fake node {config['node_id']} serving on {config['client_listen']}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
