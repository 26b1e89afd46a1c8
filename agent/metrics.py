"""Optional Prometheus endpoint (off by default): the status snapshot as metrics, in base units.

Names follow Prometheus' conventions: base units in the name (``_hertz``, ``_watts``, ``_joules_total``,
``_seconds``), counters end in ``_total``, and constant facts are an ``_info`` metric with value 1. Every
GPU series has the labels ``gpu`` (NVML index), ``uuid`` and ``simulated``. README.md ("Prometheus")
shows a scrape config and what the address option exposes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

_LABELS = ["gpu", "uuid", "simulated"]
# (metric name, status key, scale to the base unit, help)
_GPU_GAUGES = (
    ("envpipe_gpu_sm_clock_hertz", "clock_mhz", 1e6, "SM clock read from the GPU"),
    ("envpipe_gpu_target_clock_hertz", "target_mhz", 1e6, "SM clock the agent last asked for (unset: none)"),
    ("envpipe_gpu_power_watts", "power_w", 1.0, "Board power"),
    ("envpipe_gpu_locked", "locked", 1.0, "1 while the agent holds a clock lock on the GPU"),
)
_GPU_COUNTERS = (
    ("envpipe_gpu_energy_joules", "energy_j", "Energy counter of the GPU"),
    ("envpipe_gpu_phase_events", "events", "Phase events accepted for the GPU"),
    ("envpipe_gpu_clock_changes", "clock_changes", "Clock changes applied to the GPU"),
    ("envpipe_gpu_clock_resets", "resets", "Clock resets of the GPU"),
)


def _gpu_labels(gpu: dict[str, Any]) -> list[str]:
    return [str(gpu["index"]), gpu["uuid"], str(gpu["simulated"]).lower()]


class AgentCollector:
    """Collects from ``agent.status()`` at scrape time (no second copy of the numbers)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        status = self.agent.status()
        info = InfoMetricFamily("envpipe_agent", "The agent answering", labels=[])
        info.add_metric([], {"version": status["version"], "backend": status["backend"],
                             "read_only": str(status["read_only"]).lower()})
        yield info
        for name, key, scale, doc in _GPU_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            for gpu in status["gpus"]:
                if gpu.get(key) is not None:
                    family.add_metric(_gpu_labels(gpu), float(gpu[key]) * scale)
            yield family
        for name, key, doc in _GPU_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            for gpu in status["gpus"]:
                family.add_metric(_gpu_labels(gpu), float(gpu[key]))
            yield family
        yield from self._leases(status)
        yield self._latency(status)
        for key, value in status["counters"].items():
            yield CounterMetricFamily(f"envpipe_agent_{key}", f"agent counter {key} (docs/protocol.md)", value=value)
        yield GaugeMetricFamily("envpipe_agent_uptime_seconds", "Time since the agent started", value=status["uptime_s"])

    @staticmethod
    def _leases(status: dict[str, Any]) -> Iterator[Metric]:
        holders = GaugeMetricFamily(
            "envpipe_gpu_lease", "1 per held GPU, labelled with its holder", labels=[*_LABELS, "job", "rank", "uid"]
        )
        ages = GaugeMetricFamily("envpipe_gpu_lease_age_seconds", "Age of the GPU's lease", labels=_LABELS)
        for gpu in status["gpus"]:
            holder = gpu.get("holder")
            if holder:
                uid = "" if holder.get("uid") is None else str(holder["uid"])
                holders.add_metric([*_gpu_labels(gpu), holder["job_id"], str(holder["rank"]), uid], 1.0)
                ages.add_metric(_gpu_labels(gpu), float(gpu["lease_age_s"]))
        yield holders
        yield ages

    @staticmethod
    def _latency(status: dict[str, Any]) -> Metric:
        family = HistogramMetricFamily(
            "envpipe_gpu_apply_latency_seconds", "Phase event received -> clock set by the driver", labels=_LABELS
        )
        for gpu in status["gpus"]:
            histogram = gpu["apply_latency_histogram"]
            cumulative, buckets = 0, []
            for bound_s, count in zip([*histogram["bounds_s"], float("inf")], histogram["counts"], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound_s == float("inf") else repr(bound_s), cumulative))
            family.add_metric(_gpu_labels(gpu), buckets, histogram["sum_s"])
        return family


def start_metrics_server(agent: Any, addr: str, port: int) -> None:
    """Serve /metrics on ``addr:port`` from a daemon thread (a non-loopback address is warned about)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    start_http_server(port, addr=addr, registry=registry)
