"""The sharded KV service built on raft: state machine, sharding, routing, HTTP API."""
