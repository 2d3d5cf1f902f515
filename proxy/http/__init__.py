"""The client-facing HTTP/1.1 server: listening sockets, one task per connection, and response body framing."""
