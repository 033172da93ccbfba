"""`cai serve`'s GET /metrics: prometheus_client's text format with the metric names and labels dashboards read
(cai_requests_total{status}, cai_guard_actions_total{action}, cai_upstream_errors_total and the two latency
histograms in milliseconds), counted per app. The guard runs on uvicorn against the stub upstream, rules only."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from stub_upstream import StubUpstream, free_port  # noqa: E402
from test_serve import QUESTION, GuardServer, policy  # noqa: E402

from cai_engine.guard.serve import LATENCY_BUCKETS_MS, Metrics  # noqa: E402


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body, keyed by name and sorted labels (the parser rejects malformed text)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def families(text: str) -> dict[str, str]:
    """Name and type of each metric, leaving out the ``*_created`` timestamps prometheus_client adds (set
    PROMETHEUS_DISABLE_CREATED_SERIES=True to turn those off)."""
    return {f.name: f.type for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}


def scrape(guard: GuardServer) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{guard.port}/metrics")


def test_metrics_keep_their_names_labels_and_types():
    with StubUpstream() as upstream, GuardServer(policy(), upstream.url) as guard:
        assert httpx.post(f"{guard.url}/chat/completions", json={"model": "m", "messages": QUESTION}).status_code == 200
        reply = scrape(guard)
    assert reply.status_code == 200 and reply.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert families(reply.text) == {
        "cai_requests": "counter",
        "cai_guard_actions": "counter",
        "cai_upstream_errors": "counter",
        "cai_upstream_latency_ms": "histogram",
        "cai_guard_latency_ms": "histogram",
    }
    got = samples(reply.text)
    assert got[("cai_requests_total", (("status", "ok"),))] == 1
    assert got[("cai_guard_actions_total", (("action", "none"),))] == 1
    assert got[("cai_upstream_errors_total", ())] == 0
    for which in ("upstream", "guard"):
        name = f"cai_{which}_latency_ms"
        bounds = [float(le) for (n, labels), _ in got.items() if n == f"{name}_bucket" for _, le in labels]
        assert bounds == [*map(float, LATENCY_BUCKETS_MS), float("inf")]
        assert got[(f"{name}_count", ())] == 1 and got[(f"{name}_bucket", (("le", "+Inf"),))] == 1
        assert got[(f"{name}_sum", ())] >= 0


def test_an_unreachable_upstream_is_counted():
    with GuardServer(policy(), f"http://127.0.0.1:{free_port()}/v1") as guard:
        reply = httpx.post(f"{guard.url}/chat/completions", json={"model": "m", "messages": QUESTION})
        assert reply.status_code == 502
        got = samples(scrape(guard).text)
    assert got[("cai_upstream_errors_total", ())] == 1
    assert got[("cai_requests_total", (("status", "upstream_unreachable"),))] == 1
    assert ("cai_guard_actions_total", (("action", "none"),)) not in got  # no answer, no guard decision


def test_each_app_counts_apart():
    """Two apps in one process (tests, an app mounted twice) keep their own registry: no 'Duplicated timeseries'
    error when the second is made, and no count leaks from one to the other."""
    first, second = Metrics(), Metrics()
    first.count("ok", "revised")
    first.observe("guard", 7.5)
    first.upstream_errors.inc()
    one, two = samples(first.render().decode()), samples(second.render().decode())
    assert one[("cai_requests_total", (("status", "ok"),))] == 1
    assert one[("cai_guard_actions_total", (("action", "revised"),))] == 1
    assert one[("cai_guard_latency_ms_bucket", (("le", "10.0"),))] == 1
    assert one[("cai_guard_latency_ms_bucket", (("le", "5.0"),))] == 0
    assert one[("cai_guard_latency_ms_sum", ())] == 7.5 and one[("cai_upstream_errors_total", ())] == 1
    assert not any(name == "cai_requests_total" for name, _ in two)
    assert two[("cai_upstream_errors_total", ())] == 0 and two[("cai_guard_latency_ms_count", ())] == 0
