"""mapper: signed visitor IDs mapped to ActiveCampaign contacts and events.

Emails and AC hashes are kept only in the database's `contacts` table.
"""

from __future__ import annotations
