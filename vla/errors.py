"""The errors a caller of a policy can get, and how an error quotes what the caller sent.

Free of torch, so the network client and the ROS2 node can import them without the model.
"""

from __future__ import annotations


class SpecMismatchError(ValueError):
    """The artifact and the environment / robot disagree on what goes in or comes out."""


class ObservationError(ValueError):
    """An observation that does not fit the policy's spec (missing key, wrong size, NaN), or one the
    model cannot turn into finite actions."""


def brief(value, limit: int = 120) -> str:
    """repr(value) cut to `limit` characters, for error messages that quote what a caller sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
