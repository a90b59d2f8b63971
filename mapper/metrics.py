"""Prometheus metrics: what this process did, and what the outbox holds.

Counters count this process's own work since it started; the outbox
gauge is read from the database at each scrape, so it is the same from
every process. No label carries a person, a hash, an event name or a
visitor: labels are statuses and outcomes only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mapper.outbox import count_by_status

logger = logging.getLogger(__name__)

# Seconds from intake to AC's acceptance: from a quick send to a long outage.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)


class OutboxCollector(Collector):
    """Counts the outbox's events by status when scraped."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        try:
            with self._sessions() as session:
                counts = count_by_status(session)
        except SQLAlchemyError:
            # A scrape must still answer; the missing gauge says the rest.
            logger.warning("The outbox could not be counted for /metrics.")
            return

        family = GaugeMetricFamily(
            "mapper_outbox_events",
            "Events in the outbox by status, across all processes.",
            labels=["status"],
        )
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


class Metrics:
    """One process's metrics, in a registry of its own."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter(
            "mapper_events_accepted",
            "Events stored from browsers, repeats of a client id left out.",
            registry=self.registry,
        )
        self.delivered = Counter(
            "mapper_events_delivered",
            "Events AC accepted.",
            registry=self.registry,
        )
        self.retried = Counter(
            "mapper_event_retries",
            "Attempts that failed and will be tried again, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.dead = Counter(
            "mapper_events_dead",
            "Events given up on after AC refused them too often.",
            registry=self.registry,
        )
        self.held_expired = Counter(
            "mapper_held_events_expired",
            "Held events dropped because their visitor was not identified in time.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "mapper_delivery_latency_seconds",
            "Time from an event's intake to AC accepting it.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(OutboxCollector(sessions))

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
