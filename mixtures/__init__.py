"""User-facing seqio task and mixture modules (import one by name to register it)."""
