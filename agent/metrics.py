"""Optional Prometheus endpoint (off by default; loopback only): the status snapshot as metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_GPU_GAUGES = (
    ("sm_clock_mhz", "clock_mhz", "Applied SM clock (MHz)"),
    ("power_w", "power_w", "Board power (W)"),
    ("events_per_s", "events_per_s", "Phase events per second"),
    ("apply_latency_p99_ms", "apply_latency_p99_ms", "p99 event-to-apply latency (ms)"),
)
_GPU_COUNTERS = (
    ("energy_j", "energy_j", "Energy counter (J)"),
    ("events", "events", "Phase events accepted"),
    ("clock_changes", "clock_changes", "Clock changes applied"),
)


class AgentCollector:
    """Collects from ``agent.status()`` at scrape time (no second copy of the numbers)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        status = self.agent.status()
        labels = ["gpu", "uuid", "simulated"]
        for name, key, doc in _GPU_GAUGES:
            family = GaugeMetricFamily(f"envpipe_gpu_{name}", doc, labels=labels)
            self._add(family, status, key)
            yield family
        for name, key, doc in _GPU_COUNTERS:
            family = CounterMetricFamily(f"envpipe_gpu_{name}", doc, labels=labels)
            self._add(family, status, key)
            yield family
        locked = GaugeMetricFamily("envpipe_gpu_locked", "1 when the agent holds a clock lock", labels=labels)
        self._add(locked, status, "locked")
        yield locked
        for key, value in status["counters"].items():
            yield CounterMetricFamily(f"envpipe_agent_{key}", f"agent counter {key}", value=value)
        yield GaugeMetricFamily("envpipe_agent_uptime_seconds", "agent uptime", value=status["uptime_s"])

    @staticmethod
    def _add(family: Any, status: dict[str, Any], key: str) -> None:
        for gpu in status["gpus"]:
            value = gpu.get(key)
            if value is not None:
                family.add_metric(
                    [str(gpu["index"]), gpu["uuid"], str(gpu["simulated"]).lower()], float(value)
                )


def start_metrics_server(agent: Any, addr: str, port: int) -> None:
    """Serve /metrics on ``addr:port`` from a daemon thread (addr is checked to be loopback by the config)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    start_http_server(port, addr=addr, registry=registry)
