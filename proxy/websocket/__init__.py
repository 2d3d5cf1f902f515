"""WebSocket sessions: the handshake and close decisions (pure) and the proxied session on trio-websocket."""
