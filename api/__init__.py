"""The OpenAI-compatible HTTP API: one more stateless NATS client (see api/app.py)."""
