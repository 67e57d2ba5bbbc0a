"""The Prometheus and Grafana files under deploy/ cannot be checked by promtool here, so they are
checked against the code: every metric an alert or a panel names is one the services register,
every label they match on is one the metrics carry, every alert says what to do, and the scrape
config covers the four services on their default metrics ports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import services.profile.telemetry
import services.rewards.telemetry
import services.risk.telemetry
import services.scoring.telemetry
from libs.metrics import DEFAULT_METRICS_PORTS, REGISTRY, metric_names
from libs.settings import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TELEMETRY = (services.profile.telemetry, services.rewards.telemetry, services.risk.telemetry,
             services.scoring.telemetry)  # imported for the metrics they register

# What PromQL spells that is not a metric name.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "clamp_min", "clamp_max",
    "absent", "vector", "scalar", "time", "label_replace", "label_join", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "count_over_time", "last_over_time", "round", "ceil", "floor", "sort",
    "sort_desc", "changes", "resets", "label_values", "inf", "nan",
}
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}  # added by Prometheus itself
LABELS_KNOWN = {"service", "method", "code", "reason", "outcome", "kind", "le", "job", "instance"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NAME = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_NUMBER_UNIT = re.compile(r"\b\d+(?:\.\d+)?[smhdwy]?\b")


def references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to: strings, ranges, matchers, grouping
    clauses and Grafana variables are taken out first, so what is left are functions and metrics."""
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    text = _GRAFANA_VARIABLE.sub("1", expr)
    labels: set[str] = set()
    for body in _MATCHERS.findall(_STRING.sub('""', text)):
        for matcher in filter(None, (part.strip() for part in body.split(","))):
            name = re.match(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*\"\"$", matcher)
            assert name is not None, f"bad matcher {matcher!r} in {expr}"
            labels.add(name.group(1))
    text = _MATCHERS.sub(" ", _STRING.sub('""', text))
    for _, names in _GROUPING.findall(text):
        labels.update(filter(None, (name.strip() for name in names.split(","))))
    text = _GROUPING.sub(" ", _RANGE.sub(" ", text))
    text = _NUMBER_UNIT.sub(" ", text)
    words = set(_NAME.findall(text))
    return {word for word in words if word.lower() not in PROMQL_WORDS}, labels


def registered() -> set[str]:
    return metric_names(REGISTRY) | PROMETHEUS_OWN


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_reference_parser_finds_metrics_and_labels() -> None:
    metrics, labels = references(
        'histogram_quantile(0.99, sum by (service, le) (rate(loyalty_rpc_duration_seconds_bucket'
        '{method!~"A|B", service=~"$service"}[$__rate_interval]))) > 0.25 and up{job="risk"} == 0')
    assert metrics == {"loyalty_rpc_duration_seconds_bucket", "up"}
    assert labels == {"service", "le", "method", "job"}


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_each_alert_names_real_metrics_and_says_what_to_do(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"Loyalty[A-Z]\w+", rule["alert"])
    metrics, labels = references(rule["expr"])
    assert metrics and metrics <= registered(), metrics - registered()
    assert labels <= LABELS_KNOWN, labels - LABELS_KNOWN
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] in ("page", "ticket")
    assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 40


def test_outcomes_matched_exactly_are_outcomes_the_code_emits() -> None:
    """A typo in `outcome="..."` would make an alert silently never fire."""
    emitted = {sample.labels["outcome"] for family in REGISTRY.collect() for sample in family.samples
               if "outcome" in sample.labels}
    exprs = [rule["expr"] for rule in _alert_rules()]
    dashboard = json.loads((DEPLOY / "grafana" / "loyalty-dashboard.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    matched = {value for expr in exprs for value in re.findall(r'\boutcome="([^"]*)"', expr)}
    assert matched and matched <= emitted, matched - emitted


def test_the_alerts_cover_errors_latency_outbox_age_and_the_risk_gate() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert len(exprs) == len(_alert_rules()), "alert names are unique"
    assert "loyalty_rpc_requests_total" in exprs["LoyaltyHighErrorRate"]
    assert "histogram_quantile(0.99" in exprs["LoyaltyHighLatencyP99"]
    assert "loyalty_outbox_oldest_pending_age_seconds" in exprs["LoyaltyOutboxStale"]
    assert 'outcome="held_gate_unavailable"' in exprs["LoyaltyRiskGateUnavailable"]
    assert 'service="risk"' in exprs["LoyaltyRiskCallsFailing"]


def test_the_dashboard_is_valid_and_every_panel_queries_real_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "loyalty-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "service"} <= variables
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(panels) >= 12
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel["id"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        for target in panel["targets"]:
            metrics, labels = references(target["expr"])
            assert metrics and metrics <= registered(), (panel["title"], metrics - registered())
            assert labels <= LABELS_KNOWN, (panel["title"], labels - LABELS_KNOWN)
            used |= metrics
    # Each family of metrics the services export is on the dashboard.
    for family in ("loyalty_rpc_requests_total", "loyalty_rpc_duration_seconds_bucket", "loyalty_outbox_pending",
                   "loyalty_outbox_oldest_pending_age_seconds", "loyalty_db_pool_in_use",
                   "loyalty_profile_events_total", "loyalty_rewards_points_issued_total",
                   "loyalty_rewards_points_redeemed_total", "loyalty_rewards_points_expired_total",
                   "loyalty_risk_decisions_total", "loyalty_scoring_evaluation_duration_seconds_bucket",
                   "loyalty_client_requests_total"):
        assert family in used, family


def test_prometheus_scrapes_the_four_services_and_loads_the_alerts() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {name: [f"{name}:{DEFAULT_METRICS_PORTS[name]}"] for name in SERVICE_NAMES}
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert yaml.safe_load((provisioning / "dashboards" / "loyalty.yml").read_text())["providers"]
