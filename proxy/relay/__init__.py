"""The relay: upstream body bytes moved to the client socket as they arrive, its two drivers, the client watch and the observers on the side (token usage)."""
