"""``/metrics`` of the whole application: every replica's series, each labelled with its ``replica``.

The ingress asks every engine replica for its ``/metrics`` text (Serve's ``broadcast``), parses each with
prometheus_client's parser and writes them back out as one exposition: one ``# HELP``/``# TYPE`` per metric
and one sample per replica, told apart by a ``replica`` label (``sum by (model_name) (...)`` gives the
application's totals). The names are the single server's: ``jetmoe:...``, and ``vllm:...`` as well with
``--export-vllm-metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


def merge_metrics(replica_texts: Sequence[tuple[str, str]]) -> bytes:
    """One Prometheus text exposition from ``(replica name, exposition)`` pairs."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(replica_texts):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            for sample in family.samples:
                labels = sample.labels if REPLICA_LABEL in sample.labels else {REPLICA_LABEL: replica,
                                                                               **sample.labels}
                merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp,
                                             sample.exemplar))
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    """A collector of ready metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
