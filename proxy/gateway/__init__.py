"""The gateway: the ordered steps of one request (verify, plan, admit, forward) and the cache, background-job and WebSocket variants of the last step."""
