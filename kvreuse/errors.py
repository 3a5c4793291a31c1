"""Exceptions raised at kvreuse's boundaries."""


class KVReuseError(Exception):
    """Base class of kvreuse's errors."""


class UnsupportedRope(KVReuseError, ValueError):
    """A rotary embedding that cannot be relocated exactly (e.g. it depends on sequence length)."""
