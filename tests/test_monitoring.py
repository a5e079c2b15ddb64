"""The monitoring profile: the Grafana dashboard and the Prometheus alerting rules name only metrics
(and labels) the service exports, the rules say what pages whom, Prometheus scrapes every chatbot
process of docker-compose.yml, and the profile's services are wired to the files under ops/.

Without a Prometheus here, PromQL is read by a small tokenizer; where `promtool` is installed its
own checks run too, with unit tests of the alerts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose
from prometheus_client import REGISTRY

import service.observability as observability
from tests.test_deployment import env_example, read_compose

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana" / "dashboards" / "chatbot.json"
DATASOURCES = OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = OPS / "grafana" / "provisioning" / "dashboards" / "chatbot.yml"
PROMETHEUS = OPS / "prometheus" / "prometheus.yml"
ALERTS = OPS / "prometheus" / "alerts.yml"
PROFILE = "monitoring"

BUILTIN_METRICS = {"up", "ALERTS"}  # made by Prometheus itself: scrape health, the alerting rules' state
TARGET_LABELS = {"job", "instance"}  # added to every scraped series: the compose service, the process
BUILTIN_LABELS = {"up": TARGET_LABELS, "ALERTS": {"alertname", "alertstate", "severity", "pool", "platform", "kind"} | TARGET_LABELS}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "hour",
    "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp",
    "vector", "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "atan2"}
KEYWORDS |= {"inf", "nan"}
GLOBAL_GAUGES = ("chatbot_queued_jobs", "chatbot_waiting_conversations")  # the same value from every worker of a pool
# What the issue asks the dashboard to show, by the metric that shows it.
DASHBOARD_NEEDS = {
    "chatbot_queued_jobs", "chatbot_waiting_conversations", "chatbot_time_in_queue_seconds_bucket",
    "chatbot_time_to_first_token_seconds_bucket", "chatbot_time_to_final_reply_seconds_bucket",
    "chatbot_generated_tokens_total", "chatbot_active_slots", "chatbot_jobs_total", "chatbot_deliveries_total",
    "chatbot_platform_errors_total", "chatbot_feedback_total", "chatbot_tokens_total",
}

_STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{((?:" + _STRING + r"|[^{}\"'`])*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*(" + _STRING + ")")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)")


# --- what the service exports ----------------------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the chatbot's metrics export, to the label names it carries."""
    labels = {
        metric.describe()[0].name: set(metric._labelnames)
        for metric in vars(observability).values()
        if hasattr(metric, "_labelnames") and hasattr(metric, "describe")
    }
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "summary": ["", "_count", "_sum", "_created"],
        "gauge": [""],
    }
    names = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("chatbot_"):
            continue
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = labels[family.name] | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
    return names


# --- PromQL, as far as these checks need it ------------------------------------------------------


def unquoted(value: str) -> str:
    return value[1:-1]


def read_promql(expr: str) -> dict:
    """The metric names, label matchers per selector, grouping labels and unknown words of an expression.

    Grafana's variables ($pool, $__rate_interval) only appear inside strings and ranges, which are
    set aside before the words are read.
    """
    selectors = []  # (metric or None, [(label, operator, value)])
    for match in _SELECTOR.finditer(expr):
        matchers = [(label, operator, unquoted(value)) for label, operator, value in _MATCHER.findall(match.group(2))]
        selectors.append((match.group(1), matchers))
    text = _SELECTOR.sub(lambda match: f" {match.group(1) or ''} ", expr)
    text = re.sub(_STRING, '""', text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    grouping = set()
    for _, names in _GROUPING.findall(text):
        grouping |= {name.strip() for name in names.split(",") if name.strip()}
    text = _GROUPING.sub(lambda match: f" {match.group(1)} ", text)
    metrics, unknown = set(), set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(1)
        if word.lower() in KEYWORDS or word in AGGREGATIONS:  # `sum by (pool) (...)`: by is followed by (
            continue
        if text[match.end():].lstrip().startswith("("):
            if word not in FUNCTIONS:
                unknown.add(f"{word}(")
        else:
            metrics.add(word)
    return {"metrics": metrics, "selectors": selectors, "grouping": grouping, "unknown": unknown}


def mistakes(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What in `expr` names something the service (or Prometheus) does not export."""
    read = read_promql(expr)
    found = [f"unknown function {word}" for word in sorted(read["unknown"])]
    known = {**exported, **BUILTIN_LABELS}
    if not read["metrics"]:
        found.append("names no metric")
    for metric in sorted(read["metrics"] - set(known)):
        found.append(f"{metric} is not exported")
    for metric, matchers in read["selectors"]:
        if metric is None:
            found.append("a selector without a metric name")
        elif metric in known:
            found += [f"{metric} has no label {label}" for label, _, _ in matchers if label not in known[metric]]
    every_label = set().union(*known.values())
    found += [f"no metric has the label {label}" for label in sorted(read["grouping"] - every_label)]
    for gauge in GLOBAL_GAUGES:
        for match in re.finditer(rf"\b{gauge}\b", expr):
            if not re.search(r"max\s+by\s*\(\s*pool\s*\)\s*\(\s*$", expr[: match.start()]):
                found.append(f"{gauge} is sampled by every worker of a pool: use max by (pool) (...)")
    return found


# --- the files -------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: {query}"
            queries.append((f"variable {variable['name']}", f"group by ({match.group(2)}) ({match.group(1)})"))
    return queries


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def scrape_jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}


def job_values(expr: str) -> set[str]:
    """The job names an expression selects by equality or a plain alternation."""
    values = set()
    for _, matchers in read_promql(expr)["selectors"]:
        for label, operator, value in matchers:
            if label == "job" and operator in ("=", "=~"):
                values |= set(value.split("|")) if operator == "=~" else {value}
    return values


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return exported_metrics()


@pytest.fixture(scope="module")
def compose() -> dict:
    return read_compose(env_example())


# --- dashboard and rules name what is exported --------------------------------------------------


def test_the_exported_metrics_are_read_from_the_service(exported):
    assert {"chatbot_jobs_total", "chatbot_time_in_queue_seconds_bucket", "chatbot_active_slots"} <= set(exported)
    assert exported["chatbot_jobs_total"] == {"pool", "outcome", "job", "instance"}
    assert "le" in exported["chatbot_time_in_queue_seconds_bucket"]


def test_every_dashboard_query_names_exported_metrics(exported):
    board = dashboard()
    queries = dashboard_queries(board)
    assert len(queries) > 20
    problems = [f"{where}: {problem}" for where, expr in queries for problem in mistakes(expr, exported)]
    assert not problems, "\n".join(problems)
    shown = set().union(*(read_promql(expr)["metrics"] for _, expr in queries))
    assert not DASHBOARD_NEEDS - shown, "the dashboard does not show these"


def test_every_rule_names_exported_metrics_and_says_whom_it_pages(exported):
    names = []
    for rule in rules():
        assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, rule
        name = rule["alert"]
        names.append(name)
        assert name.startswith("Chatbot"), name  # the dashboard's alert panels select alertname=~"Chatbot.*"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        problems = mistakes(rule["expr"], exported)
        assert not problems, f"{name}: {problems}"
    assert len(names) == len(set(names))


def test_the_rules_cover_what_pages_an_operator():
    paging = {rule["alert"]: rule["expr"] for rule in rules() if rule["labels"]["severity"] == "critical"}
    assert {"ChatbotNoWorkerForPool", "ChatbotQueueWaitHigh", "ChatbotAdapterDown", "ChatbotErrorRateHigh",
            "ChatbotRedisRefusingWrites"} <= set(paging)
    assert "chatbot_active_slots" in paging["ChatbotNoWorkerForPool"]
    assert "chatbot_time_in_queue_seconds_bucket" in paging["ChatbotQueueWaitHigh"]


def test_the_checks_catch_mistakes(exported):
    good = 'sum by (pool) (rate(chatbot_jobs_total{pool=~"$pool", outcome="failed"}[$__rate_interval]))'
    assert mistakes(good, exported) == []
    assert mistakes(good.replace("chatbot_jobs_total", "chatbot_job_total"), exported) == ["chatbot_job_total is not exported"]
    assert mistakes(good.replace("outcome=", "result="), exported) == ["chatbot_jobs_total has no label result"]
    assert mistakes(good.replace("by (pool)", "by (pol)"), exported) == ["no metric has the label pol"]
    assert mistakes(good.replace("rate(", "rat("), exported) == ["unknown function rat("]
    assert mistakes("sum(chatbot_queued_jobs)", exported) == [
        "chatbot_queued_jobs is sampled by every worker of a pool: use max by (pool) (...)"
    ]
    assert mistakes('up{job="slack"} == 0 and on (instance) chatbot_active_slots offset 5m', exported) == []
    assert mistakes("histogram_quantile(0.95, sum by (le) (rate(chatbot_time_in_queue_seconds[5m])))", exported) == [
        "chatbot_time_in_queue_seconds is not exported"  # a histogram is read through its _bucket series
    ]


# --- Prometheus and Grafana are wired to the compose file ---------------------------------------


def test_prometheus_scrapes_every_chatbot_process_on_its_metrics_port(compose):
    services, jobs = compose["services"], scrape_jobs()
    metrics_ports = {
        name: int(service["environment"]["CHATBOT__METRICS__PORT"])
        for name, service in services.items()
        if "CHATBOT__METRICS__PORT" in service.get("environment", {})
    }
    assert set(metrics_ports) == {"worker", "worker-openai", "discord", "slack"}
    for name, port in metrics_ports.items():
        # Docker's DNS answers a service's name with every replica: each is a target, its own instance.
        [lookup] = jobs[name]["dns_sd_configs"]
        assert lookup["names"] == [name] and lookup["type"] == "A" and lookup["port"] == port, name
    for name, job in jobs.items():
        for lookup in job.get("dns_sd_configs", []):
            assert set(lookup["names"]) <= set(services), name
    prometheus_config = yaml.safe_load(PROMETHEUS.read_text())
    assert prometheus_config["rule_files"] == [ALERTS.name]  # beside the config file, where compose mounts it


def test_queries_select_jobs_prometheus_has():
    jobs = set(scrape_jobs())
    exprs = [expr for _, expr in dashboard_queries(dashboard())] + [rule["expr"] for rule in rules()]
    selected = set().union(*(job_values(expr) for expr in exprs))
    assert selected and selected <= jobs, selected - jobs


def test_the_monitoring_profile_validates_and_mounts_the_ops_files(compose):
    assert PyCompose.from_json(json.dumps(compose)).service_names()[-2:] == ["prometheus", "grafana"]
    services = compose["services"]
    profiled = {name for name, service in services.items() if PROFILE in service.get("profiles", [])}
    assert profiled == {"prometheus", "grafana"}
    for name in profiled:
        service = services[name]
        assert service["profiles"] == [PROFILE], name
        image, _, tag = service["image"].rpartition(":")
        assert image in {"prom/prometheus", "grafana/grafana"} and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), service["image"]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
                assert volume.endswith(":ro"), (name, volume)
        # Published on the host's loopback only, on the port the container serves.
        [published] = service["ports"]
        host, _, container_port = published.rpartition(":")
        assert host.startswith("127.0.0.1:"), (name, published)
        healthcheck = service["healthcheck"]
        assert f"http://127.0.0.1:{container_port}/" in " ".join(healthcheck["test"]), name
        assert healthcheck["test"][0] == "CMD" and {"interval", "timeout", "retries"} <= set(healthcheck), name
        assert service["restart"] == "unless-stopped", name
    for volume in ("prometheus-data", "grafana-data"):
        assert volume in compose["volumes"]


def test_prometheus_reads_its_config_and_rules_from_the_mounts(compose):
    prometheus = compose["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    config = option_value(prometheus["command"], "--config.file")
    assert mounts[config] == "./ops/prometheus/prometheus.yml"
    rule_file = str(Path(config).parent / yaml.safe_load(PROMETHEUS.read_text())["rule_files"][0])
    assert mounts[rule_file] == "./ops/prometheus/alerts.yml"
    assert "/-/ready" in " ".join(prometheus["healthcheck"]["test"])


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(compose):
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./ops/grafana/provisioning"
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus_port = prometheus["ports"][0].rpartition(":")[2]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{prometheus_port}"
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    folder = provider["options"]["path"]
    assert (ROOT / mounts[folder] / DASHBOARD.name).is_file()
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{folder}/{DASHBOARD.name}"
    board = dashboard()
    assert board["uid"] and board["title"]
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(target["datasource"]["uid"] == datasource["uid"] for target in panel["targets"]), panel["title"]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))


def bind_mounts(service: dict) -> dict[str, str]:
    """Container path to host path of the service's bind mounts."""
    mounts = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def option_value(command: list[str], name: str) -> str:
    [value] = [argument.split("=", 1)[1] for argument in command if argument.startswith(f"{name}=")]
    return value


# --- promtool, where it is installed ------------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


def promtool(*arguments: str) -> None:
    result = subprocess.run(["promtool", *arguments], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules():
    promtool("check", "config", str(PROMETHEUS))  # checks the rule files it names as well
    promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    substitutes = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$pool": ".*", "$platform": ".*"}
    recorded = []
    for index, (where, expr) in enumerate(dashboard_queries(dashboard())):
        for variable, value in sorted(substitutes.items(), key=lambda item: -len(item[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a variable this test does not know: {expr}"
        recorded.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    promtool("check", "rules", str(path))


# Series in promtool's notation: 'a+bxn' is a, a+b, ... n+1 samples a minute apart; '_xn' n missing.
ALERT_CASES = """
- name: a pool whose only worker stopped, beside one still serving
  input_series:
    - {series: 'chatbot_active_slots{job="worker", instance="a:9100", pool="default"}', values: '1x30 _x60'}
    - {series: 'chatbot_active_slots{job="worker", instance="b:9100", pool="small"}', values: '0x90'}
  alerts:
    - {at: 20m, alertname: ChatbotNoWorkerForPool, fire: []}
    - {at: 50m, alertname: ChatbotNoWorkerForPool, fire: [{severity: critical, pool: default}]}
    - {at: 50m, alertname: ChatbotNoWorker, fire: []}

- name: no worker ever came up
  input_series:
    - {series: 'up{job="discord", instance="d:9100"}', values: '1x30'}
  alerts:
    - {at: 10m, alertname: ChatbotNoWorker, fire: []}
    - {at: 20m, alertname: ChatbotNoWorker, fire: [{severity: critical}]}

- name: messages to one pool wait over a minute, the other pool's are claimed at once
  input_series:
    - {series: 'chatbot_active_slots{job="worker", instance="a:9100", pool="default"}', values: '4x40'}
    - {series: 'chatbot_time_in_queue_seconds_bucket{job="worker", instance="a:9100", le="60"}', values: '0x40'}
    - {series: 'chatbot_time_in_queue_seconds_bucket{job="worker", instance="a:9100", le="120"}', values: '0+2x40'}
    - {series: 'chatbot_time_in_queue_seconds_bucket{job="worker", instance="a:9100", le="+Inf"}', values: '0+2x40'}
    - {series: 'chatbot_active_slots{job="worker", instance="b:9100", pool="small"}', values: '1x40'}
    - {series: 'chatbot_time_in_queue_seconds_bucket{job="worker", instance="b:9100", le="60"}', values: '0+2x40'}
    - {series: 'chatbot_time_in_queue_seconds_bucket{job="worker", instance="b:9100", le="120"}', values: '0+2x40'}
    - {series: 'chatbot_time_in_queue_seconds_bucket{job="worker", instance="b:9100", le="+Inf"}', values: '0+2x40'}
  alerts:
    - {at: 5m, alertname: ChatbotQueueWaitHigh, fire: []}
    - {at: 30m, alertname: ChatbotQueueWaitHigh, fire: [{severity: critical, pool: default}]}

- name: a queue nobody answers from, sampled by two workers; another pool answering
  input_series:
    - {series: 'chatbot_queued_jobs{job="worker", instance="a:9100", pool="default"}', values: '3x40'}
    - {series: 'chatbot_queued_jobs{job="worker", instance="b:9100", pool="default"}', values: '3x40'}
    - {series: 'chatbot_queued_jobs{job="worker", instance="c:9100", pool="small"}', values: '2x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="c:9100", pool="small", outcome="answered"}', values: '0+1x40'}
  alerts:
    - {at: 30m, alertname: ChatbotQueueStalled, fire: [{severity: critical, pool: default}]}

- name: one pool answers a fifth of its jobs with errors
  input_series:
    - {series: 'chatbot_jobs_total{job="worker", instance="a:9100", pool="default", outcome="answered"}', values: '0+8x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="a:9100", pool="default", outcome="failed"}', values: '0+2x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="b:9100", pool="small", outcome="answered"}', values: '0+10x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="b:9100", pool="small", outcome="failed"}', values: '0x40'}
  alerts:
    - {at: 30m, alertname: ChatbotErrorRateHigh, fire: [{severity: critical, pool: default}]}

- name: Redis refuses one worker's answers; a fresh worker answering its first job does not page
  input_series:
    - {series: 'chatbot_generated_tokens_total{job="worker", instance="a:9100"}', values: '0+50x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="a:9100", pool="default", outcome="answered"}', values: '5x40'}
    - {series: 'chatbot_generated_tokens_total{job="worker", instance="b:9100"}', values: '0+50x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="b:9100", pool="default", outcome="answered"}', values: '0+1x40'}
    - {series: 'chatbot_generated_tokens_total{job="worker", instance="c:9100"}', values: '0x5 100x35'}
    - {series: 'chatbot_jobs_total{job="worker", instance="c:9100", pool="default", outcome="answered"}', values: '_x5 1x35'}
    - {series: 'chatbot_generated_tokens_total{job="discord", instance="d:9100"}', values: '0x40'}
  alerts:
    - {at: 10m, alertname: ChatbotRedisRefusingWrites, fire: []}
    - {at: 30m, alertname: ChatbotRedisRefusingWrites, fire: [{severity: critical, job: worker, instance: "a:9100"}]}

- name: the Discord adapter is gone and the Slack adapter cannot be scraped
  input_series:
    - {series: 'up{job="discord", instance="d:9100"}', values: '1x20 _x40'}
    - {series: 'up{job="slack", instance="s:9100"}', values: '1x20 0x40'}
  alerts:
    - {at: 15m, alertname: ChatbotAdapterDown, fire: []}
    - {at: 40m, alertname: ChatbotAdapterDown, fire: [{severity: critical, job: discord}, {severity: critical, job: slack}]}

- name: the Slack adapter runs but its connection is down
  input_series:
    - {series: 'chatbot_health_check{job="slack", instance="s:9100", check="slack"}', values: '1x10 0x20'}
    - {series: 'chatbot_health_check{job="slack", instance="s:9100", check="redis"}', values: '1x30'}
  alerts:
    - {at: 10m, alertname: ChatbotPlatformDisconnected, fire: []}
    - {at: 20m, alertname: ChatbotPlatformDisconnected, fire: [{severity: critical, job: slack, instance: "s:9100", check: slack}]}

- name: every Slack call fails while Discord delivers
  input_series:
    - {series: 'chatbot_platform_errors_total{job="slack", instance="s:9100", platform="slack", kind="SlackApiError"}', values: '0+1x40'}
    - {series: 'chatbot_deliveries_total{job="slack", instance="s:9100", platform="slack", kind="final"}', values: '10x40'}
    - {series: 'chatbot_platform_errors_total{job="discord", instance="d:9100", platform="discord", kind="HTTPException"}', values: '0+1x40'}
    - {series: 'chatbot_deliveries_total{job="discord", instance="d:9100", platform="discord", kind="final"}', values: '0+5x40'}
  alerts:
    - {at: 30m, alertname: ChatbotDeliveriesFailing, fire: [{severity: critical, platform: slack}]}
    - {at: 30m, alertname: ChatbotPlatformErrors, fire: []}

- name: Slack rate limits many calls; a worker cannot be scraped; jobs are delivered again
  input_series:
    - {series: 'chatbot_platform_errors_total{job="slack", instance="s:9100", platform="slack", kind="ratelimited:chat.update"}', values: '0+5x40'}
    - {series: 'up{job="worker", instance="a:9100"}', values: '0x40'}
    - {series: 'up{job="worker", instance="b:9100"}', values: '1x40'}
    - {series: 'chatbot_jobs_total{job="worker", instance="b:9100", pool="default", outcome="redelivered"}', values: '0+1x60'}
  alerts:
    - {at: 30m, alertname: ChatbotPlatformErrors, fire: [{severity: warning, platform: slack, kind: "ratelimited:chat.update"}]}
    - {at: 30m, alertname: ChatbotWorkerDown, fire: [{severity: warning, job: worker, instance: "a:9100"}]}
    - {at: 5m, alertname: ChatbotRedeliveries, fire: []}
    - {at: 50m, alertname: ChatbotRedeliveries, fire: [{severity: warning, pool: default}]}
"""


@needs_promtool
def test_the_alerts_fire_when_they_should(tmp_path):
    # The rules as shipped, less their annotations (promtool would compare every text).
    groups = yaml.safe_load(ALERTS.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(groups))
    tests = [
        {
            "interval": "1m",
            "name": case["name"],
            "input_series": case["input_series"],
            "alert_rule_test": [
                {"eval_time": alert["at"], "alertname": alert["alertname"],
                 "exp_alerts": [{"exp_labels": labels} for labels in alert["fire"]]}
                for alert in case["alerts"]
            ],
        }
        for case in yaml.safe_load(ALERT_CASES)
    ]
    cases_path = tmp_path / "alerts.test.yml"
    cases_path.write_text(yaml.safe_dump({"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests}))
    promtool("test", "rules", str(cases_path))
    # Every rule has a case that makes it fire, and no case names a rule that is not there.
    fired = {alert["alertname"] for case in yaml.safe_load(ALERT_CASES) for alert in case["alerts"] if alert["fire"]}
    assert fired == {rule["alert"] for rule in rules()}
