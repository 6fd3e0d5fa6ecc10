#!/usr/bin/env python3
"""Consistency checks of the deployment files that schema validators cannot
make: names that must match across files, ports, security settings, and the
environment variables against what the services really read.

  deploy_lint.py compose RESOLVED.yml     output of `docker-compose config`
  deploy_lint.py k8s RENDERED.yml [--external-secret NAME]...
  deploy_lint.py dashboard FILE.json --promql-out RULES.yml
  deploy_lint.py env-names                print what each binary reads

Each check prints one line per problem and exits 1 if there was any.
Called by scripts/validate-deploy. Standard library plus PyYAML.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# binary -> (crate folder, default port, gRPC health name its readiness probe checks);
# storage's is its Store part (Kafka only), so a ClickHouse outage does not stop ingest.
SERVICES = {
    "gateway": ("services/gateway", 50050, "trackmesh.v1.Gateway"),
    "refinement-api": ("services/refinement", 50051, "trackmesh.v1.Refinement"),
    "learning-api": ("services/learning", 50052, "trackmesh.v1.Learning"),
    "storage-service": ("services/storage", 50053, "trackmesh.v1.Storage/Store"),
}
# Read by libraries (tracing's EnvFilter, the OpenTelemetry SDK), or only
# used to build other values in Kubernetes.
LIBRARY_ENV = {
    "RUST_LOG", "RUST_BACKTRACE", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME",
    "POD_NAME", "POD_NAMESPACE",
}
SHUTDOWN_GRACE_S = 20

problems: list[str] = []


def problem(message: str) -> None:
    problems.append(message)
    print(f"  FAIL {message}")


def finish(what: str) -> int:
    if problems:
        print(f"{what}: {len(problems)} problem(s)")
        return 1
    print(f"{what}: ok")
    return 0


# ---------------------------------------------------------------- env names


def _config_struct_fields(text: str) -> set[str]:
    """Fields of `pub struct *Config` that derive Deserialize (envy reads them)."""
    fields: set[str] = set()
    for match in re.finditer(
        r"#\[derive\([^)]*Deserialize[^)]*\)\](?:\s*(?:#\[[^\]]*\]|///[^\n]*))*\s*"
        r"pub struct (\w+Config)\s*\{", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        body = text[match.end():i - 1]
        fields |= {f.upper() for f in re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:", body, re.M)}
    return fields


def _env_reads(text: str) -> set[str]:
    return set(re.findall(r"env::var(?:_os)?\(\s*\"([A-Z0-9_]+)\"", text))


def known_env() -> dict[str, set[str]]:
    """binary -> the environment variables it reads, from the Rust sources."""
    shared = {p: p.read_text(errors="replace") for p in (ROOT / "shared/src").rglob("*.rs")}
    common = set(LIBRARY_ENV)
    for path, text in shared.items():
        if path.name == "redis.rs":
            continue
        common |= _config_struct_fields(text) | _env_reads(text)
    redis = _config_struct_fields((ROOT / "shared/src/redis.rs").read_text())
    known = {}
    for binary, (crate, _, _) in SERVICES.items():
        names = set(common)
        for path in (ROOT / crate / "src").rglob("*.rs"):
            text = path.read_text(errors="replace")
            names |= _config_struct_fields(text) | _env_reads(text)
            if "RedisConfig" in text or "ServiceConfig" in text:
                names |= redis
        known[binary] = names
    return known


def check_env(where: str, binary: str, names, known: dict[str, set[str]]) -> None:
    for name in sorted(set(names) - known[binary]):
        problem(f"{where}: {binary} does not read {name} (typo, or not implemented yet?)")


# ---------------------------------------------------------------- compose


def dockerfile_targets() -> set[str]:
    text = (ROOT / "Dockerfile").read_text()
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))


def seconds(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)", str(value)):
        total += float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def env_dict(env) -> dict[str, str]:
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in (env or {}).items()}


def addr_host_port(value: str):
    match = re.match(r"^(?:\w+://)?([^/:]+):(\d+)", value)
    return (match.group(1), int(match.group(2))) if match else (None, None)


def cmd_compose(path: Path) -> int:
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services", {})
    known = known_env()
    targets = dockerfile_targets()
    published_ok = {"gateway", "jaeger", "prometheus", "grafana"}
    for binary in SERVICES:
        if binary not in services:
            problem(f"compose: service {binary} missing")
    for name, svc in services.items():
        if svc.get("ports") and name not in published_ok:
            problem(f"compose: {name} publishes host ports, so it cannot be scaled")
        if "container_name" in svc:
            problem(f"compose: {name} sets container_name, so it cannot be scaled")
        for dep, cond in (svc.get("depends_on") or {}).items():
            condition = cond.get("condition") if isinstance(cond, dict) else None
            if dep not in services:
                problem(f"compose: {name} depends on unknown service {dep}")
            elif condition == "service_healthy" and "healthcheck" not in services[dep]:
                problem(f"compose: {name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        for volume in svc.get("volumes") or []:
            source = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            kind = volume.get("type") if isinstance(volume, dict) else ("bind" if source.startswith((".", "/")) else "volume")
            if kind == "bind" and not Path(source).exists():
                problem(f"compose: {name} mounts {source}, which does not exist")
    for binary, (_, port, _) in SERVICES.items():
        svc = services.get(binary)
        if not svc:
            continue
        build = svc.get("build") or {}
        target = build.get("target") if isinstance(build, dict) else None
        if target not in targets:
            problem(f"compose: {binary} builds target {target!r}, not a stage of the Dockerfile")
        env = env_dict(svc.get("environment"))
        check_env(f"compose {binary}", binary, env, known)
        if env.get("SERVER_PORT") != str(port):
            problem(f"compose: {binary} SERVER_PORT={env.get('SERVER_PORT')}, expected {port}")
        test = (svc.get("healthcheck") or {}).get("test") or []
        if binary not in " ".join(test if isinstance(test, list) else [test]) or "healthcheck" not in str(test):
            problem(f"compose: {binary} healthcheck should run `{binary} healthcheck`, got {test}")
        if not svc.get("read_only"):
            problem(f"compose: {binary} should have a read-only root filesystem")
        if "ALL" not in (svc.get("cap_drop") or []):
            problem(f"compose: {binary} should drop all capabilities")
        if seconds(svc.get("stop_grace_period", "10s")) <= seconds(env.get("SHUTDOWN_GRACE", "20s")):
            problem(f"compose: {binary} stop_grace_period must exceed SHUTDOWN_GRACE")
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            host, _ = addr_host_port(endpoint)
            if host not in services:
                problem(f"compose: {binary} sends traces to {host}, not a service here")
    gateway = env_dict((services.get("gateway") or {}).get("environment"))
    for var, binary in (("REFINEMENT_ADDR", "refinement-api"), ("LEARNING_ADDR", "learning-api"),
                        ("STORAGE_ADDR", "storage-service")):
        host, port = addr_host_port(gateway.get(var, ""))
        if host != binary or port != SERVICES[binary][1]:
            problem(f"compose: gateway {var}={gateway.get(var)} should point at {binary}:{SERVICES[binary][1]}")
    # Prometheus (observability profile) must scrape every service on its port.
    prom_path = ROOT / "monitoring/prometheus/prometheus.yml"
    prom = yaml.safe_load(prom_path.read_text())
    scraped = {}
    for job in prom.get("scrape_configs", []):
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd.get("names", []):
                scraped[dns_name] = (job["job_name"], sd.get("port"))
    for binary, (_, port, _) in SERVICES.items():
        if scraped.get(binary) != (binary, port):
            problem(f"prometheus.yml: job {binary} should discover {binary}:{port} by DNS, got {scraped.get(binary)}")
    return finish(f"compose consistency ({path.name})")


# ---------------------------------------------------------------- kubernetes


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def cmd_k8s(path: Path, external_secrets: list[str]) -> int:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    known = known_env()
    configmaps = by_kind.get("ConfigMap", {})
    secrets = set(by_kind.get("Secret", {})) | set(external_secrets)
    deployments = by_kind.get("Deployment", {})
    services = by_kind.get("Service", {})
    namespaces = set(by_kind.get("Namespace", {}))

    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] != "Namespace" and ns not in namespaces:
            problem(f"{doc['kind']}/{doc['metadata']['name']}: namespace {ns!r} is not created here")

    for binary, (_, port, grpc_name) in SERVICES.items():
        dep = deployments.get(binary)
        if not dep:
            problem(f"Deployment/{binary} missing")
            continue
        where = f"Deployment/{binary}"
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        if not _matches(spec["selector"]["matchLabels"], labels):
            problem(f"{where}: selector does not match the pod labels")
        if "replicas" in spec and binary in by_kind.get("HorizontalPodAutoscaler", {}):
            problem(f"{where}: sets replicas although an HPA owns the count")
        sa = pod.get("serviceAccountName")
        if sa not in by_kind.get("ServiceAccount", {}):
            problem(f"{where}: ServiceAccount {sa} not defined")
        elif by_kind["ServiceAccount"][sa].get("automountServiceAccountToken") is not False:
            problem(f"ServiceAccount/{sa}: automountServiceAccountToken should be false")
        if pod.get("automountServiceAccountToken") is not False:
            problem(f"{where}: automountServiceAccountToken should be false")
        psc = pod.get("securityContext", {})
        if not psc.get("runAsNonRoot") or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problem(f"{where}: pod must run as non-root with seccomp RuntimeDefault")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        annotations = spec["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(port):
            problem(f"{where}: Prometheus annotations should scrape port {port}")
        for volume in pod.get("volumes", []):
            secret = (volume.get("secret") or {}).get("secretName")
            if secret and secret not in secrets:
                problem(f"{where}: volume uses Secret {secret}, which is not defined")
            cm = (volume.get("configMap") or {}).get("name")
            if cm and cm not in configmaps:
                problem(f"{where}: volume uses ConfigMap {cm}, which is not defined")
        containers = pod["containers"]
        if len(containers) != 1:
            problem(f"{where}: expected one container")
        c = containers[0]
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if ports.get("grpc") != port:
            problem(f"{where}: container port grpc should be {port}")
        sc = c.get("securityContext", {})
        if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", [])
                and sc.get("runAsNonRoot")):
            problem(f"{where}: container must be non-root, read-only, no privilege escalation, drop ALL")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problem(f"{where}: resources.{kind}.{r} missing")
        ready = c.get("readinessProbe", {}).get("grpc")
        if not ready or ready.get("port") != port or ready.get("service") != grpc_name:
            problem(f"{where}: readinessProbe should be gRPC health of {grpc_name} on {port}")
        for probe in ("livenessProbe", "startupProbe"):
            p = c.get(probe)
            if not p:
                problem(f"{where}: {probe} missing")
                continue
            target = (p.get("grpc") or {}).get("port") or (p.get("httpGet") or {}).get("port")
            if target not in (port, "grpc"):
                problem(f"{where}: {probe} does not probe the service port")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_sleep = float(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
        # Environment: ConfigMaps + literal env.
        env = {}
        for source in c.get("envFrom", []):
            name = (source.get("configMapRef") or {}).get("name")
            if name:
                if name not in configmaps:
                    problem(f"{where}: envFrom ConfigMap {name} is not defined")
                else:
                    env.update(configmaps[name].get("data", {}))
            sname = (source.get("secretRef") or {}).get("name")
            if sname and sname not in secrets:
                problem(f"{where}: envFrom Secret {sname} is not defined")
        for item in c.get("env", []):
            env[item["name"]] = item.get("value", "")
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["name"] not in secrets:
                problem(f"{where}: env {item['name']} uses Secret {ref['name']}, which is not defined")
            ref = (item.get("valueFrom") or {}).get("configMapKeyRef")
            if ref and ref["name"] not in configmaps:
                problem(f"{where}: env {item['name']} uses ConfigMap {ref['name']}, which is not defined")
        check_env(where, binary, env, known)
        if env.get("SERVER_PORT") != str(port):
            problem(f"{where}: SERVER_PORT={env.get('SERVER_PORT')}, expected {port}")
        if grace <= pre_sleep + seconds(env.get("SHUTDOWN_GRACE", f"{SHUTDOWN_GRACE_S}s")):
            problem(f"{where}: terminationGracePeriodSeconds {grace} must exceed preStop + SHUTDOWN_GRACE")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        keys_file = env.get("API_KEYS_FILE")
        if keys_file and not any(keys_file.startswith(m.rstrip("/") + "/") for m in mounts):
            problem(f"{where}: API_KEYS_FILE={keys_file} is not under a mounted volume")
        if binary == "gateway":
            for var, target in (("REFINEMENT_ADDR", "refinement-api"), ("LEARNING_ADDR", "learning-api"),
                                ("STORAGE_ADDR", "storage-service")):
                host, tport = addr_host_port(env.get(var, ""))
                svc = services.get(host)
                if not svc:
                    problem(f"{where}: {var}={env.get(var)} names no Service")
                    continue
                if svc["spec"].get("clusterIP") != "None":
                    problem(f"{where}: {var} should use a headless Service for client-side balancing")
                if tport != SERVICES[target][1] or not _matches(
                        svc["spec"]["selector"], deployments[target]["spec"]["template"]["metadata"]["labels"]):
                    problem(f"{where}: {var} does not reach {target}:{SERVICES[target][1]}")
        if binary == "storage-service":
            hpa = by_kind.get("HorizontalPodAutoscaler", {}).get(binary)
            partitions = int(env.get("KAFKA_PARTITIONS", "12"))
            if hpa and hpa["spec"]["maxReplicas"] > partitions:
                problem(f"HorizontalPodAutoscaler/{binary}: maxReplicas above KAFKA_PARTITIONS ({partitions})")

    pods = [(n, d["spec"]["template"]["metadata"].get("labels", {})) for n, d in deployments.items()]
    for name, svc in services.items():
        selected = [n for n, labels in pods if _matches(svc["spec"].get("selector"), labels)]
        if not selected:
            problem(f"Service/{name}: selects no pod")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for dep_name in selected:
                c = deployments[dep_name]["spec"]["template"]["spec"]["containers"][0]
                names = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
                if target not in names:
                    problem(f"Service/{name}: targetPort {target} is not a port of {dep_name}")
        if svc["spec"].get("type") in ("LoadBalancer", "NodePort") and selected != ["gateway"]:
            problem(f"Service/{name}: only the gateway may be exposed outside the cluster")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for name, doc in by_kind.get(kind, {}).items():
            selector = (doc["spec"].get("selector") or doc["spec"].get("podSelector") or {}).get("matchLabels", {})
            if selector and not any(_matches(selector, labels) for _, labels in pods):
                problem(f"{kind}/{name}: selects no pod")
            for rule in doc["spec"].get("ingress", []) + doc["spec"].get("egress", []):
                for peer in rule.get("from", []) + rule.get("to", []):
                    sel = (peer.get("podSelector") or {}).get("matchLabels")
                    if sel and "namespaceSelector" not in peer and not any(_matches(sel, l) for _, l in pods):
                        problem(f"{kind}/{name}: peer {sel} selects no pod")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            problem(f"HorizontalPodAutoscaler/{name}: target {ref['kind']}/{ref['name']} not defined")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problem(f"HorizontalPodAutoscaler/{name}: minReplicas above maxReplicas")
    if not any(not d["spec"].get("podSelector") and set(d["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
               for d in by_kind.get("NetworkPolicy", {}).values()):
        problem("NetworkPolicy: no default deny for the namespace")
    return finish(f"kubernetes consistency ({path.name})")


# ---------------------------------------------------------------- dashboard


def cmd_dashboard(path: Path, promql_out: Path) -> int:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        problem(f"{path.name}: not JSON: {error}")
        return finish("dashboard")
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in doc:
            problem(f"{path.name}: no {key}")
    variables = {v["name"] for v in doc.get("templating", {}).get("list", [])}
    ids, cells, exprs = set(), {}, []
    for panel in promql_names.dashboard_panels(doc):
        pid = panel.get("id")
        where = f"{path.name}: panel {pid} '{panel.get('title')}'"
        if pid in ids:
            problem(f"{where}: duplicate id")
        ids.add(pid)
        if not panel.get("title"):
            problem(f"{where}: no title")
        grid = panel.get("gridPos", {})
        x, y, w, h = (grid.get(k) for k in ("x", "y", "w", "h"))
        if None in (x, y, w, h) or x < 0 or w <= 0 or h <= 0 or x + w > 24:
            problem(f"{where}: bad gridPos {grid}")
        else:
            for cx in range(x, x + w):
                for cy in range(y, y + h):
                    if (cx, cy) in cells:
                        problem(f"{where}: overlaps panel {cells[(cx, cy)]}")
                        break
                    cells[(cx, cy)] = pid
                else:
                    continue
                break
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            problem(f"{where}: no query")
        for target in targets:
            ds = (target.get("datasource") or panel.get("datasource") or {}).get("uid", "")
            if ds.startswith("$") and ds.strip("${}") not in variables:
                problem(f"{where}: datasource variable {ds} is not defined")
            expr = target.get("expr", "")
            if not expr:
                problem(f"{where}: target {target.get('refId')} has no expr")
                continue
            for var in re.findall(r"\$(?:\{)?(\w+)", expr):
                if not var.startswith("__") and var not in variables:
                    problem(f"{where}: uses ${var}, which is not a dashboard variable")
            exprs.append((where, promql_names.substitute_grafana_variables(expr)))
    # Every query as a recording rule, so that promtool parses the PromQL.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    promql_out.write_text(yaml.safe_dump(rules, sort_keys=False))
    print(f"{path.name}: {len(ids)} panels, {len(exprs)} queries written to {promql_out}")
    return finish(f"dashboard sanity ({path.name})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compose")
    p.add_argument("resolved", type=Path)
    p = sub.add_parser("k8s")
    p.add_argument("rendered", type=Path)
    p.add_argument("--external-secret", action="append", default=[])
    p = sub.add_parser("dashboard")
    p.add_argument("file", type=Path)
    p.add_argument("--promql-out", type=Path, required=True)
    sub.add_parser("env-names")
    args = parser.parse_args()
    if args.cmd == "compose":
        return cmd_compose(args.resolved)
    if args.cmd == "k8s":
        return cmd_k8s(args.rendered, args.external_secret)
    if args.cmd == "dashboard":
        return cmd_dashboard(args.file, args.promql_out)
    for binary, names in known_env().items():
        print(f"{binary}: {' '.join(sorted(names))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
