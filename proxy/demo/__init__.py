"""``parkway demo`` and the mock upstreams it runs on loopback (OpenAI-style HTTP, Realtime WebSocket)."""
