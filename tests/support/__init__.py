"""What the tests share, one copy of each, by what it stands in for.

* ``http``: a raw HTTP/1.1 client spoken with a real ``h11`` client (requests as bytes, replies
  parsed and counted) for tests that hold the socket themselves.
* ``signing``: the test credential's secrets and :func:`~support.signing.sign`, by the real
  ``signway_sdk`` or by Parkway's own signer.
* ``upstream``: upstreams on 127.0.0.1 port 0, written without ``proxy.http.connection`` so the
  code under test is not its own witness, and the behaviours tests give them.
* ``parkway``: Parkway in the test's nursery, its test config and TOML config files.
* ``processes``: programs run as child processes (``parkway serve``, nginx, redis-server),
  ports, and polling what another process does on its own clock.
* ``logs`` and ``metrics``: structlog lines a test can await; Prometheus samples.
* ``redis`` and ``nginx``: a real redis-server; a real nginx around the shipped snippet.
* ``websocket``: a Realtime API stand-in, raw wsproto peers, a harness for the WebSocket shell.
"""
