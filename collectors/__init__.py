"""Chrono collectors: exchange ticker feeds -> normalized PriceFeed records -> ingest API."""

from __future__ import annotations

__version__ = "0.1.0"
