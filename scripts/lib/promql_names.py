"""Metric names used by the alert rules and the Grafana dashboards, and metric
names exported by the services (live /metrics text, or the Rust sources).

Used by scripts/check-metrics and scripts/validate-deploy. Standard library
plus PyYAML.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RULES = sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml"))
DEFAULT_DASHBOARDS = sorted((ROOT / "monitoring/grafana/dashboards").glob("*.json"))

# Series that Prometheus makes itself, not the services.
SYNTHETIC = {"up", "ALERTS", "ALERTS_FOR_STATE"}
SYNTHETIC_PREFIXES = ("scrape_",)

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "start", "end",
}
# Clauses whose parenthesised list holds label names, not metrics.
LABEL_LIST_CLAUSES = {"by", "without", "on", "ignoring", "group_left", "group_right"}

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def substitute_grafana_variables(expr: str) -> str:
    """Grafana variables as Prometheus would see them after interpolation."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\[\[\s*(\w+)\s*\]\]", ".*", expr)
    expr = re.sub(r"\$\{\s*\w+(:\w+)?\s*\}", ".*", expr)
    expr = re.sub(r"\$\w+", ".*", expr)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = substitute_grafana_variables(expr)
    names: set[str] = set()
    # Matchers that name the metric: {__name__="foo"}.
    for match in re.finditer(r"__name__\s*=\s*\"([^\"]+)\"", expr):
        names.add(match.group(1))
    # Strings, label matchers and ranges carry no metric names.
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"'(?:\\.|[^'\\])*'", "''", expr)
    expr = re.sub(r"`[^`]*`", "``", expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    tokens = [(m.group(0), m.start(), m.end()) for m in IDENT.finditer(expr)]
    skip_until = -1
    for token, start, end in tokens:
        if start < skip_until:
            continue
        rest = expr[end:].lstrip()
        if token in LABEL_LIST_CLAUSES and rest.startswith("("):
            skip_until = end + (len(expr[end:]) - len(rest)) + rest.index(")") + 1
            continue
        if token in KEYWORDS:
            continue
        if rest.startswith("("):  # a function or aggregation
            continue
        if re.match(r"(by|without)\s*\(", rest):  # `sum by (job) (...)`
            continue
        before = expr[:start].rstrip()
        if before.endswith(("offset", "@")):
            continue
        # Numbers like 1e3 or durations like 5m were not matched as IDENT
        # starts, but their tails can be ("e3"): drop what follows a digit.
        if start > 0 and (expr[start - 1].isdigit() or expr[start - 1] == "."):
            continue
        names.add(token)
    return names


def rule_exprs(path: Path) -> tuple[list[tuple[str, str]], set[str]]:
    """(where, expr) of every rule, and the names that recording rules define."""
    doc = yaml.safe_load(path.read_text()) or {}
    exprs, recorded = [], set()
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            exprs.append((f"{path.name}: {name}", str(rule["expr"])))
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def dashboard_panels(doc: dict):
    for panel in doc.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    doc = json.loads(path.read_text())
    exprs = []
    for panel in dashboard_panels(doc):
        for target in panel.get("targets", []) or []:
            if target.get("expr"):
                exprs.append((f"{path.name}: panel {panel.get('id')} '{panel.get('title')}'",
                              target["expr"]))
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            match = re.match(r"\s*label_values\((.*),\s*\w+\)\s*$", query)
            if match:
                exprs.append((f"{path.name}: variable ${var['name']}", match.group(1)))
            elif not query.startswith(("label_names", "metrics(")):
                inner = re.match(r"\s*query_result\((.*)\)\s*$", query)
                exprs.append((f"{path.name}: variable ${var['name']}",
                              inner.group(1) if inner else query))
    return exprs


def used_metrics(rules: list[Path], dashboards: list[Path]) -> dict[str, list[str]]:
    """metric name -> where it is used; recording rules' own names excluded."""
    exprs, recorded = [], set()
    for path in rules:
        found, names = rule_exprs(path)
        exprs += found
        recorded |= names
    for path in dashboards:
        exprs += dashboard_exprs(path)
    used: dict[str, list[str]] = {}
    for where, expr in exprs:
        for name in metric_names(expr):
            if name in recorded or name in SYNTHETIC or name.startswith(SYNTHETIC_PREFIXES):
                continue
            used.setdefault(name, []).append(where)
    return used


def exposition_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (plus histogram/summary parts)."""
    names: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                name, kind = parts[2], parts[3]
                names.add(name)
                if kind == "histogram":
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                elif kind == "summary":
                    names |= {f"{name}_sum", f"{name}_count"}
            continue
        match = IDENT.match(line)
        if match:
            names.add(match.group(0))
    return names


SOURCE_MACRO = re.compile(
    r"\b(counter|gauge|histogram)!\s*\(\s*\"([A-Za-z_:][A-Za-z0-9_:]*)\"", re.S)


# Names handed to a macro through a variable: `for (name, n) in [("x_total", ..)]`.
SOURCE_LITERAL = re.compile(r"\(\s*\"([a-z][a-z0-9_]*_(?:total|seconds|bytes|rows|size))\"\s*,")


# Registered at start-up as words: `zero_metrics! { counter … ; gauge … }`.
SOURCE_ZERO = re.compile(r"\bzero_metrics!\s*\{([^}]*)\}")


def source_names(root: Path) -> set[str]:
    """Metric names recorded in the Rust sources (services/, shared/)."""
    names: set[str] = set()
    for folder in ("services", "shared"):
        for path in (root / folder).rglob("*.rs"):
            if "/tests/" in str(path) or "/target/" in str(path):
                continue
            text = path.read_text(errors="replace")
            found = SOURCE_MACRO.findall(text)
            for block in SOURCE_ZERO.findall(text):
                counters, _, gauges = block.partition(";")
                found += [("counter", name) for name in IDENT.findall(counters)]
                found += [("gauge", name) for name in IDENT.findall(gauges)]
            if re.search(r"\b(counter|gauge|histogram)!\s*\(\s*[a-z_]+\s*[,)]", text):
                found += [("counter", name) for name in SOURCE_LITERAL.findall(text)
                          if name.endswith("_total")]
            for kind, name in found:
                names.add(name)
                if kind == "histogram":
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names
