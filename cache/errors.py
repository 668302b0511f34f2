"""The cache's one exception type (its own module: storage, fingerprint and the rest all raise it)."""


class CacheError(Exception):
    """A cache that is missing, damaged or incompatible; the message says which and what to do."""
