"""Helpers for parsing text that arrives in deltas."""

from __future__ import annotations


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`: text that may still
    become the marker, so a stream holds it back until the next delta decides."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
