"""Prometheus samples, as an admin listener's ``/metrics`` exposes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass(frozen=True)
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when it was never exported (a counter never incremented)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """Every sample of ``name``, keyed by the values of ``label_names``."""
        return {
            tuple(dict(labels)[n] for n in label_names): value
            for (sample, labels), value in self.samples.items()
            if sample == name
        }

    def label_values(self, label: str) -> set[str]:
        return {v for (_, labels), _ in self.samples.items() for k, v in labels if k == label}


async def scrape(client: Any, admin: str) -> Scrape:
    response = await client.get(f"http://{admin}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(parse_metrics(response.text))
