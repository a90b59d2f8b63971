"""mapper: signed visitor IDs mapped to ActiveCampaign contacts and events."""

from __future__ import annotations
