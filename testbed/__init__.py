"""What tests/ and bench/ both run on: a generated tiny llama, a scratch cluster, a JetStream
cluster of real nats-server processes, hosts made of network namespaces, a log watcher.

It may import the product; tests/ and bench/ import it, the product never does (so nothing
imports tests/ or bench/, DESIGN.md's parts paragraph).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
