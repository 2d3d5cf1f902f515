"""The response cache: what may be cached (pure policy), stored entries and recordings, the memory and Redis stores, single flight and replay."""
