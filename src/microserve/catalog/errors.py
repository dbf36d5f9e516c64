"""The one base of every error the catalog raises, so that callers can turn any of them into one message."""

from __future__ import annotations


class CatalogError(Exception):
    """A model cannot be planned, found, fetched, verified or run here; the message says why in one line."""
