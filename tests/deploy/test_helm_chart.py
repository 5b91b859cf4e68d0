"""The umbrella chart, rendered by Helm's engine with every helm/cdc-platform/ci values set.

Every manifest is validated strictly against the Kubernetes schemas (minimum and newest
supported version), then the workloads are checked against what the values asked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import (
    CHART_DIR,
    CI_DIR,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    Manifest,
    Rendered,
    chart_dependencies,
    ci_values_files,
    containers,
    env_of,
    image_command,
    iter_strings,
    load_values,
    pod_spec,
    render,
    selector_matches,
    stubbed_chart,
    validate_manifests,
)

SECRETISH_ENV = re.compile(r"(PASSWORD|SECRET|TOKEN|JAAS|USER_INFO|API_KEY|CREDENTIAL)", re.I)
KAFKA_WORDS = re.compile(r"kafka|schema[-_]?registry|debezium|connect_url|bootstrap", re.I)


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stubbed_chart(tmp_path_factory.mktemp("chart"))


_RENDER_CACHE: dict[tuple[Path, str], Rendered] = {}


def rendered_ci(chart: Path, name: str) -> tuple[dict[str, Any], Rendered]:
    values = load_values(CI_DIR / name)
    key = (chart, name)
    if key not in _RENDER_CACHE:
        _RENDER_CACHE[key] = render(chart, values)
    return values, _RENDER_CACHE[key]


# --------------------------------------------------------------------------- model of values


def merged(values: dict[str, Any], *path: str, default: Any = None) -> Any:
    """Umbrella values over the subchart defaults (what Helm will use)."""
    subchart_defaults = {
        "pipeline": yaml.safe_load((CHART_DIR / "charts/pipeline/values.yaml").read_text()),
        "platform": yaml.safe_load((CHART_DIR / "charts/platform/values.yaml").read_text()),
    }
    node: Any = values
    fallback: Any = subchart_defaults
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        fallback = fallback.get(key) if isinstance(fallback, dict) else None
    return node if node is not None else (fallback if fallback is not None else default)


def pipelines_of(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict((values.get("pipeline") or {}).get("pipelines") or {})


def enabled_sinks(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in p["pipeline"]["sinks"] if s.get("enabled", True) is not False]


def transport(values: dict[str, Any]) -> str:
    return str((values.get("global") or {}).get("transportMode", "kafka"))


# --------------------------------------------------------------------------- chart metadata


def test_chart_declares_pinned_dependencies_with_condition_flags() -> None:
    deps = {d.get("alias") or d["name"]: d for d in chart_dependencies()}
    assert set(deps) == {"platform", "pipeline", "kafka", "schemaRegistry"}
    assert deps["kafka"]["condition"] == "kafka.enabled"
    assert deps["schemaRegistry"]["condition"] == "schemaRegistry.enabled"
    assert deps["schemaRegistry"]["name"] == "schema-registry"
    for dep in deps.values():
        assert re.fullmatch(r"\d+\.\d+\.\d+", str(dep["version"])), f"{dep} is not pinned"
    for local in ("platform", "pipeline"):
        assert deps[local]["repository"] == ""
        sub = yaml.safe_load((CHART_DIR / "charts" / local / "Chart.yaml").read_text())
        assert sub["version"] == deps[local]["version"]
        assert (CHART_DIR / "charts" / local / "values.schema.json").is_file()
    assert (CHART_DIR / "values.schema.json").is_file()


def test_ci_values_sets_cover_the_required_scenarios() -> None:
    names = {p.name for p in ci_values_files()}
    assert {
        "kafka-bundled-values.yaml",
        "kafka-external-sasl-values.yaml",
        "pubsub-values.yaml",
        "kinesis-values.yaml",
        "multi-pipeline-values.yaml",
    } <= names
    multi = load_values(CI_DIR / "multi-pipeline-values.yaml")
    assert len(pipelines_of(multi)) == 2
    assert sum(len(enabled_sinks(p)) for p in pipelines_of(multi).values()) == 3


def test_chart_renders_without_the_downloadable_dependencies() -> None:
    """The chart as committed (no Bitnami charts vendored) renders its own objects."""
    out = render(CHART_DIR, load_values(CI_DIR / "multi-pipeline-values.yaml"))
    assert f"{RELEASE}-connect" in out.names("Deployment")
    assert not out.of_kind("StatefulSet")  # the Bitnami charts are simply absent


def test_helm_lint_passes(chart: Path) -> None:
    import helm_python as helm

    for path in ci_values_files():
        report = helm.lint(str(chart), load_values(path), strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{path.name}: {problems}"


# --------------------------------------------------------------------------- every values set


@pytest.mark.parametrize("values_file", [p.name for p in ci_values_files()])
def test_every_manifest_is_valid_kubernetes(chart: Path, values_file: str) -> None:
    _, out = rendered_ci(chart, values_file)
    assert out.manifests
    assert validate_manifests(out.manifests) == []
    keys = [(m.kind, m.name) for m in out.manifests]
    assert len(keys) == len(set(keys)), "two objects share kind and name"
    for m in out.manifests:
        assert "namespace" not in m.obj["metadata"] or m.obj["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("values_file", [p.name for p in ci_values_files()])
def test_pipelines_render_as_specified(chart: Path, values_file: str) -> None:
    values, out = rendered_ci(chart, values_file)
    pipelines = pipelines_of(values)
    deployments = {m.name: m for m in out.of_kind("Deployment")}
    ingest_names = {
        n for n, m in deployments.items() if m.labels.get("app.kubernetes.io/component") == "ingest"
    }
    sink_names = {
        n for n, m in deployments.items() if m.labels.get("app.kubernetes.io/component") == "sink"
    }
    assert ingest_names == {f"{RELEASE}-{name}-ingest" for name in pipelines}
    assert sink_names == {
        f"{RELEASE}-{name}-sink-{s['sink_id']}"
        for name, p in pipelines.items()
        for s in enabled_sinks(p)
    }
    for name, p in pipelines.items():
        check_pipeline(values, out, name, p)


def check_pipeline(values: dict[str, Any], out: Rendered, name: str, p: dict[str, Any]) -> None:
    prefix = f"{RELEASE}-{name}"
    ingest = out.get("Deployment", f"{prefix}-ingest")
    sinks = [out.get("Deployment", f"{prefix}-sink-{s['sink_id']}") for s in enabled_sinks(p)]
    config = out.get("ConfigMap", f"{prefix}-config")

    # -- config files: pipeline.yaml verbatim (+ pipeline_id), platform.yaml per transport
    pipeline_yaml = yaml.safe_load(config.obj["data"]["pipeline.yaml"])
    expected = dict(p["pipeline"])
    expected.setdefault("pipeline_id", name)
    assert pipeline_yaml == expected
    platform_yaml = yaml.safe_load(config.obj["data"]["platform.yaml"])
    assert platform_yaml["transport_mode"] == transport(values)
    health_port = platform_yaml["health_port"]
    assert health_port == merged(values, "pipeline", "ports", "health")

    # -- ingest: one replica, Recreate, probes, the image's command line
    spec = ingest.obj["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    (container,) = containers(ingest)
    grpc_port = merged(values, "pipeline", "ports", "ingestGrpc")
    assert container["startupProbe"]["grpc"]["port"] == grpc_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    ports = {p_["name"]: p_["containerPort"] for p_ in container["ports"]}
    assert ports == {"health": health_port, "grpc-health": grpc_port}
    image_cmd = image_command(REPO_ROOT / "Dockerfile.ingest")
    assert image_cmd[0] == "cdc"
    assert container["args"] == [*image_cmd[1:-1], str(grpc_port)]  # same command as the image

    # -- sink endpoints: exactly the enabled sinks, at their Services' gRPC ports
    sink_port = merged(values, "pipeline", "ports", "sinkGrpc")
    endpoints = dict(
        item.split("=", 1) for item in env_of(container)["CDC_SINK_ENDPOINTS"]["value"].split(",")
    )
    assert set(endpoints) == {s["sink_id"] for s in enabled_sinks(p)}
    for sink_id, address in endpoints.items():
        host, port = address.rsplit(":", 1)
        service = out.get("Service", host)
        (svc_port,) = [x for x in service.obj["spec"]["ports"] if x["name"] == "grpc"]
        assert svc_port["port"] == int(port) == sink_port
        assert svc_port["appProtocol"] == "grpc"
        sink = out.get("Deployment", f"{prefix}-sink-{sink_id}")
        assert selector_matches(
            service.obj["spec"]["selector"], sink.obj["spec"]["template"]["metadata"]["labels"]
        )
        assert not selector_matches(
            service.obj["spec"]["selector"], ingest.obj["spec"]["template"]["metadata"]["labels"]
        )

    # -- sink HTTP endpoints (/metrics, /readyz, for Prometheus and `cdc status`): every
    # enabled sink, at its Service's http port, which targets the sink's --http-port
    sink_http = merged(values, "pipeline", "ports", "sinkHttp")
    http_endpoints = dict(
        item.split("=", 1)
        for item in env_of(container)["CDC_SINK_HTTP_ENDPOINTS"]["value"].split(",")
    )
    assert set(http_endpoints) == set(endpoints)
    for sink_id, address in http_endpoints.items():
        host, port = address.rsplit(":", 1)
        assert host == endpoints[sink_id].rsplit(":", 1)[0]
        (http_port,) = [
            x for x in out.get("Service", host).obj["spec"]["ports"] if x["name"] == "http"
        ]
        assert http_port["port"] == int(port) == sink_http and http_port["targetPort"] == "http"
        sink = out.get("Deployment", f"{prefix}-sink-{sink_id}")
        (c,) = containers(sink)
        assert c["args"][c["args"].index("--http-port") + 1] == str(sink_http)
        assert {"name": "http", "containerPort": sink_http, "protocol": "TCP"} in c["ports"]
        annotations = sink.obj["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(sink_http)
        assert annotations["prometheus.io/path"] == "/metrics"

    # -- sinks: one replica, Recreate, native gRPC probes on the Deliver port, their sink id
    sink_cmd = image_command(REPO_ROOT / "Dockerfile.sink")
    for sink, s in zip(sinks, enabled_sinks(p), strict=True):
        assert sink.obj["spec"]["replicas"] == 1
        assert sink.obj["spec"]["strategy"] == {"type": "Recreate"}
        (c,) = containers(sink)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"]["port"] == sink_port, probe
        assert (
            c["args"][: sink_cmd.index("--sink-id") - 1]
            == sink_cmd[1 : sink_cmd.index("--sink-id")]
        )
        assert c["args"][c["args"].index("--sink-id") + 1] == s["sink_id"]
        assert c["args"][c["args"].index("--port") + 1] == str(sink_port)

    # -- every pipeline pod: config mounted read-only, resources, identity, security
    size = p.get("size") or merged(values, "pipeline", "defaults", "size")
    presets = merged(values, "pipeline", "resourcePresets")
    for workload, part in [(ingest, p.get("ingest") or {})] + [
        (sink, (p.get("sinks") or {}).get(s["sink_id"]) or {})
        for sink, s in zip(sinks, enabled_sinks(p), strict=True)
    ]:
        pod = pod_spec(workload)
        (c,) = pod["containers"]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/config")
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == config.name
        expected_resources = part.get("resources") or presets[part.get("size") or size]
        assert c["resources"] == expected_resources
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert pod["serviceAccountName"] == prefix
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        env = env_of(c)
        assert env["OTEL_SERVICE_NAME"]["value"].startswith(name)
        check_secrets_by_reference(values, p, c, part)
        check_tracing(values, env)
        annotations = workload.obj["spec"]["template"]["metadata"]["annotations"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])

    # -- identity, disruption budget, network policies
    sa = out.get("ServiceAccount", prefix)
    assert sa.obj["automountServiceAccountToken"] is False
    expected_annotations = dict(merged(values, "pipeline", "serviceAccount", "annotations") or {})
    expected_annotations.update((p.get("serviceAccount") or {}).get("annotations") or {})
    assert (sa.obj["metadata"].get("annotations") or {}) == expected_annotations

    pdb = out.get("PodDisruptionBudget", prefix)
    selector = pdb.obj["spec"]["selector"]["matchLabels"]
    # The capture stage (pubsub / kinesis) is one of the pipeline's workloads too.
    captures = [d for d in out.of_kind("Deployment") if d.name == f"{prefix}-capture"]
    for workload in [ingest, *sinks, *captures]:
        assert selector_matches(selector, workload.obj["spec"]["template"]["metadata"]["labels"])
    for other in out.of_kind("Deployment"):
        if other not in [ingest, *sinks, *captures]:
            assert not selector_matches(
                selector, other.obj["spec"]["template"]["metadata"]["labels"]
            )

    check_network_policies(values, out, name, p, ingest, sinks)


def check_secrets_by_reference(
    values: dict[str, Any], p: dict[str, Any], container: dict[str, Any], part: dict[str, Any]
) -> None:
    refs = [r["secretRef"]["name"] for r in container.get("envFrom", [])]
    expected = list(
        dict.fromkeys(
            (merged(values, "pipeline", "defaults", "secretRefs") or [])
            + (p.get("secretRefs") or [])
            + (part.get("secretRefs") or [])
        )
    )
    assert refs == expected
    for var in container.get("env", []):
        if SECRETISH_ENV.search(var["name"]):
            assert "value" not in var, f"{var['name']} carries a literal value"
            assert "secretKeyRef" in var["valueFrom"]


def check_tracing(values: dict[str, Any], env: dict[str, dict[str, Any]]) -> None:
    tracing = (values.get("global") or {}).get("tracing") or {}
    if tracing.get("otlpEndpoint"):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == tracing["otlpEndpoint"]
    elif (tracing.get("jaeger") or {}).get("enabled"):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{RELEASE}-jaeger:4317"
    else:
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


def check_network_policies(
    values: dict[str, Any],
    out: Rendered,
    name: str,
    p: dict[str, Any],
    ingest: Manifest,
    sinks: list[Manifest],
) -> None:
    prefix = f"{RELEASE}-{name}"
    ingest_labels = ingest.obj["spec"]["template"]["metadata"]["labels"]
    sink_port = merged(values, "pipeline", "ports", "sinkGrpc")

    sink_policy = out.get("NetworkPolicy", f"{prefix}-sinks")
    for sink in sinks:
        assert selector_matches(
            sink_policy.obj["spec"]["podSelector"]["matchLabels"],
            sink.obj["spec"]["template"]["metadata"]["labels"],
        )
    # gRPC only from this pipeline's ingest; the HTTP port (metrics) from networkPolicy.metricsFrom
    rule, metrics_rule = sink_policy.obj["spec"]["ingress"]
    assert metrics_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics_rule.get("from") == (
        merged(values, "pipeline", "networkPolicy", "metricsFrom") or None
    )
    (peer,) = rule["from"]
    assert selector_matches(peer["podSelector"]["matchLabels"], ingest_labels)
    for other in out.of_kind("Deployment"):
        if other.name != ingest.name:
            assert not selector_matches(
                peer["podSelector"]["matchLabels"],
                other.obj["spec"]["template"]["metadata"]["labels"],
            ), f"{other.name} may reach the sinks of {name}"
    assert rule["ports"] == [{"port": sink_port, "protocol": "TCP"}]

    ingest_policy = out.get("NetworkPolicy", f"{prefix}-ingest")
    assert ingest_policy.obj["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert selector_matches(ingest_policy.obj["spec"]["podSelector"]["matchLabels"], ingest_labels)
    egress = ingest_policy.obj["spec"]["egress"]
    to_sinks = [
        r
        for r in egress
        for peer in r.get("to", [])
        if "podSelector" in peer
        and all(
            selector_matches(
                peer["podSelector"]["matchLabels"], s.obj["spec"]["template"]["metadata"]["labels"]
            )
            for s in sinks
        )
    ]
    assert to_sinks and to_sinks[0]["ports"] == [{"port": sink_port, "protocol": "TCP"}]
    source_port = p["pipeline"]["source"].get("port")
    assert any(
        any("ipBlock" in peer for peer in r.get("to", []))
        and {"port": source_port, "protocol": "TCP"} in r["ports"]
        for r in egress
    ), "no egress rule to the source database"
    mode = transport(values)
    egress_ports = {port["port"] for r in egress for port in r["ports"]}
    if mode in ("pubsub", "kinesis"):
        assert 443 in egress_ports
    if mode == "kafka":
        external = ((values.get("global") or {}).get("kafka") or {}).get("externalBootstrapServers")
        kafka_port = int(external.rsplit(":", 1)[1]) if external else 9092
        assert kafka_port in egress_ports
    if mode == "direct":
        assert egress_ports <= {53, sink_port, source_port}


# --------------------------------------------------------------------------- per scenario


def test_bundled_kafka_platform(chart: Path) -> None:
    values, out = rendered_ci(chart, "kafka-bundled-values.yaml")
    # The dependency conditions let the (stand-in) Bitnami charts render.
    assert {f"{RELEASE}-kafka", f"{RELEASE}-schema-registry"} <= out.names("StatefulSet")
    connect = out.get("Deployment", f"{RELEASE}-connect")
    assert connect.obj["spec"]["replicas"] == values["platform"]["kafkaConnect"]["replicaCount"]
    (c,) = containers(connect)
    assert c["image"].startswith("ghcr.io/baselyne-systems/cdc-kafka-connect:")
    assert c["resources"] == merged(values, "platform", "kafkaConnect", "resources")
    assert c["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-connect"}}]
    data = out.get("ConfigMap", f"{RELEASE}-connect").obj["data"]
    assert data["CONNECT_BOOTSTRAP_SERVERS"] == f"{RELEASE}-kafka:9092"
    assert data["CONNECT_VALUE_CONVERTER"] == "io.confluent.connect.avro.AvroConverter"
    assert (
        data["CONNECT_VALUE_CONVERTER_SCHEMA_REGISTRY_URL"]
        == f"http://{RELEASE}-schema-registry:8081"
    )
    assert data["CONNECT_OFFSET_FLUSH_INTERVAL_MS"] == "10000"
    service = out.get("Service", f"{RELEASE}-connect")
    assert service.obj["spec"]["ports"][0]["port"] == 8083
    # The pipeline's platform.yaml points at the bundled platform.
    platform_yaml = yaml.safe_load(
        out.get("ConfigMap", f"{RELEASE}-orders-cdc-config").obj["data"]["platform.yaml"]
    )
    assert platform_yaml["kafka"]["bootstrap_servers"] == f"{RELEASE}-kafka:9092"
    assert platform_yaml["kafka"]["schema_registry_url"] == f"http://{RELEASE}-schema-registry:8081"
    assert platform_yaml["kafka"]["topic_num_partitions"] == 6
    assert platform_yaml["kafka"]["topic_replication_factor"] == 3
    assert platform_yaml["connector"]["connect_url"] == f"http://{RELEASE}-connect:8083"
    # Optional Jaeger.
    assert f"{RELEASE}-jaeger" in out.names("Deployment")
    jaeger_ports = {p["port"] for p in out.get("Service", f"{RELEASE}-jaeger").obj["spec"]["ports"]}
    assert {16686, 4317} <= jaeger_ports


@pytest.mark.parametrize("replication", [1, 2, 5])
def test_connect_internal_topic_replication_comes_from_values(
    chart: Path, replication: int
) -> None:
    values = load_values(CI_DIR / "kafka-bundled-values.yaml")
    values["kafka"]["controller"]["replicaCount"] = 5
    values["platform"]["kafkaConnect"]["internalTopics"]["replicationFactor"] = replication
    data = render(chart, values).get("ConfigMap", f"{RELEASE}-connect").obj["data"]
    for topic in ("CONFIG", "OFFSET", "STATUS"):
        assert data[f"CONNECT_{topic}_STORAGE_REPLICATION_FACTOR"] == str(replication)


def test_connect_defaults_to_replicated_internal_topics(chart: Path) -> None:
    data = render(chart, {}).get("ConfigMap", f"{RELEASE}-connect").obj["data"]
    assert data["CONNECT_OFFSET_STORAGE_REPLICATION_FACTOR"] == "3"


def test_external_managed_kafka_with_sasl(chart: Path) -> None:
    values, out = rendered_ci(chart, "kafka-external-sasl-values.yaml")
    g = values["global"]
    assert not out.of_kind("StatefulSet"), "kafka.enabled=false still rendered a broker"
    assert f"{RELEASE}-kafka" not in out.names("Service")
    data = out.get("ConfigMap", f"{RELEASE}-connect").obj["data"]
    assert data["CONNECT_BOOTSTRAP_SERVERS"] == g["kafka"]["externalBootstrapServers"]
    for prefix in ("", "PRODUCER_", "CONSUMER_", "ADMIN_"):
        assert data[f"CONNECT_{prefix}SECURITY_PROTOCOL"] == "SASL_SSL"
        assert data[f"CONNECT_{prefix}SASL_MECHANISM"] == "PLAIN"
    assert data["CONNECT_VALUE_CONVERTER_SCHEMA_REGISTRY_URL"] == g["schemaRegistry"]["externalUrl"]
    (c,) = containers(out.get("Deployment", f"{RELEASE}-connect"))
    env = env_of(c)
    for prefix in ("", "PRODUCER_", "CONSUMER_", "ADMIN_"):
        ref = env[f"CONNECT_{prefix}SASL_JAAS_CONFIG"]["valueFrom"]["secretKeyRef"]
        assert ref == {
            "name": g["kafka"]["sasl"]["existingSecret"],
            "key": "CONNECT_SASL_JAAS_CONFIG",
        }
    ref = env["CONNECT_VALUE_CONVERTER_BASIC_AUTH_USER_INFO"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == g["schemaRegistry"]["basicAuthSecret"]
    assert not any("JAAS" in k or "USER_INFO" in k for k in data), "credentials in a ConfigMap"

    config = out.get("ConfigMap", f"{RELEASE}-customers-cdc-config")
    kafka = yaml.safe_load(config.obj["data"]["platform.yaml"])["kafka"]
    assert kafka["bootstrap_servers"] == g["kafka"]["externalBootstrapServers"]
    assert kafka["security_protocol"] == "SASL_SSL"
    assert kafka["auth_mechanism"] == "sasl_plain"
    assert kafka["sasl_username"] == "${CDC_KAFKA_SASL_USERNAME}"
    assert kafka["sasl_password"] == "${CDC_KAFKA_SASL_PASSWORD}"
    (ingest,) = containers(out.get("Deployment", f"{RELEASE}-customers-cdc-ingest"))
    env = env_of(ingest)
    assert (
        env["CDC_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
        == g["kafka"]["sasl"]["existingSecret"]
    )
    # The ingest NetworkPolicy allows the managed cluster's port and the registry's HTTPS port.
    egress = out.get("NetworkPolicy", f"{RELEASE}-customers-cdc-ingest").obj["spec"]["egress"]
    rules = {
        (peer.get("ipBlock", {}).get("cidr"), port["port"])
        for r in egress
        for peer in r.get("to", [{}])
        for port in r["ports"]
    }
    assert ("0.0.0.0/0", 9092) in rules and ("0.0.0.0/0", 443) in rules
    assert ("10.20.0.0/16", 3306) in rules


@pytest.mark.parametrize(
    "values_file", ["pubsub-values.yaml", "kinesis-values.yaml", "direct-values.yaml"]
)
def test_non_kafka_transports_render_nothing_kafka_related(chart: Path, values_file: str) -> None:
    values, out = rendered_ci(chart, values_file)
    mode = transport(values)
    assert not out.of_kind("StatefulSet")
    for m in out.manifests:
        assert not KAFKA_WORDS.search(m.name), f"{m.kind}/{m.name}"
        for text in iter_strings(m.obj):
            assert not KAFKA_WORDS.search(text), f"{m.kind}/{m.name} mentions {text!r}"
    assert not KAFKA_WORDS.search(out.all_text)
    for config in out.of_kind("ConfigMap"):
        if "platform.yaml" not in config.obj["data"]:
            continue  # the Grafana dashboard
        platform_yaml = yaml.safe_load(config.obj["data"]["platform.yaml"])
        assert platform_yaml["transport_mode"] == mode
        assert "kafka" not in platform_yaml and "connector" not in platform_yaml


def test_pubsub_uses_workload_identity_and_project(chart: Path) -> None:
    _values, out = rendered_ci(chart, "pubsub-values.yaml")
    sa = out.get("ServiceAccount", f"{RELEASE}-customers-cdc")
    assert sa.obj["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    platform_yaml = yaml.safe_load(
        out.get("ConfigMap", f"{RELEASE}-customers-cdc-config").obj["data"]["platform.yaml"]
    )
    assert platform_yaml["pubsub"]["project_id"] == "my-gcp-project"
    assert platform_yaml["wal_reader"]["batch_size"] == 100


def test_kinesis_uses_irsa(chart: Path) -> None:
    _, out = rendered_ci(chart, "kinesis-values.yaml")
    sa = out.get("ServiceAccount", f"{RELEASE}-payments-cdc")
    assert sa.obj["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )
    platform_yaml = yaml.safe_load(
        out.get("ConfigMap", f"{RELEASE}-payments-cdc-config").obj["data"]["platform.yaml"]
    )
    assert platform_yaml["kinesis"]["region"] == "us-east-1"


def test_two_pipelines_three_sinks_one_platform(chart: Path) -> None:
    _values, out = rendered_ci(chart, "multi-pipeline-values.yaml")
    assert len(out.names("ConfigMap") - {f"{RELEASE}-connect"}) == 2
    assert out.names("PodDisruptionBudget") == {f"{RELEASE}-orders-cdc", f"{RELEASE}-customers-cdc"}
    assert f"{RELEASE}-orders-cdc-sink-audit-archive" not in out.names(
        "Deployment"
    )  # enabled: false
    # Per-sink size override and per-pipeline size.
    (lake,) = containers(out.get("Deployment", f"{RELEASE}-orders-cdc-sink-iceberg-lake"))
    (hook,) = containers(out.get("Deployment", f"{RELEASE}-orders-cdc-sink-fulfilment-hook"))
    (customers,) = containers(out.get("Deployment", f"{RELEASE}-customers-cdc-ingest"))
    assert lake["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert hook["resources"]["requests"] == {"cpu": "250m", "memory": "256Mi"}
    assert customers["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert pod_spec(out.get("Deployment", f"{RELEASE}-customers-cdc-ingest"))["nodeSelector"] == {
        "workload": "cdc"
    }
    # Each pipeline consumes with its own group; shared platform settings reach both.
    groups = set()
    for name in ("orders-cdc", "customers-cdc"):
        platform_yaml = yaml.safe_load(
            out.get("ConfigMap", f"{RELEASE}-{name}-config").obj["data"]["platform.yaml"]
        )
        assert platform_yaml["max_buffered_messages"] == 5000
        groups.add(platform_yaml["kafka"]["group_id"])
    assert len(groups) == 2
    # sinkEgress switches the sinks' egress on (DNS + the listed rules).
    policy = out.get("NetworkPolicy", f"{RELEASE}-orders-cdc-sinks").obj["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert {p["port"] for r in policy["egress"] for p in r["ports"]} == {53, 443, 5432}
    # The shared secret and the pipeline's own both reach the pods, shared first.
    assert [r["secretRef"]["name"] for r in lake["envFrom"]] == [
        "cdc-shared-secrets",
        "orders-cdc-secrets",
    ]


def test_no_secret_objects_and_no_literal_credentials(chart: Path) -> None:
    for path in ci_values_files():
        _, out = rendered_ci(chart, path.name)
        assert not out.of_kind("Secret"), f"{path.name}: the chart must only reference Secrets"
        for config in out.of_kind("ConfigMap"):
            for key, text in config.obj["data"].items():
                for line in text.splitlines():
                    if re.search(r"(password|secret|token|jaas)\w*\s*[:=]", line, re.I):
                        assert re.search(r"\$\{[A-Z_][A-Z0-9_]*\}", line), (
                            f"{path.name} {config.name}/{key}: {line}"
                        )


def test_release_name_flows_into_every_address(chart: Path) -> None:
    out = render(chart, load_values(CI_DIR / "kafka-bundled-values.yaml"), release="cdc")
    platform_yaml = yaml.safe_load(
        out.get("ConfigMap", "cdc-orders-cdc-config").obj["data"]["platform.yaml"]
    )
    assert platform_yaml["kafka"]["bootstrap_servers"] == "cdc-kafka:9092"
    assert platform_yaml["connector"]["connect_url"] == "http://cdc-connect:8083"
    assert {"cdc-kafka", "cdc-schema-registry", "cdc-connect"} <= out.names("Service")


# --------------------------------------------------------------------------- observability

DASHBOARD = CHART_DIR / "dashboards" / "cdc-pipeline.json"


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [
        t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []) if "expr" in t
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_queries_only_metrics_the_stages_define() -> None:
    from services.metrics import IngestMetrics, SinkMetrics, sample_names

    dashboard = json.loads(DASHBOARD.read_text())
    queries = _dashboard_queries(dashboard)
    used = {name for q in queries for name in re.findall(r"\b(cdc_[a-z_]+)\b", q)}
    defined = sample_names(IngestMetrics("p").registry) | sample_names(
        SinkMetrics("p", "s").registry
    )
    assert used and used <= defined, sorted(used - defined)
    # the panels the issue asks for: lag, throughput, end-to-end p50/p99, dead letters
    text = "\n".join(queries)
    assert "cdc_source_slot_lag_bytes" in used
    assert "cdc_sink_events_total" in used and "cdc_ingest_events_read_total" in used
    for q in ("0.5", "0.99"):
        assert f"histogram_quantile({q}, sum by (pipeline, sink, le) (rate(" in text
    assert "cdc_sink_end_to_end_latency_seconds_bucket" in used
    assert "cdc_sink_dead_letters_total" in used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_dashboard_configmap_is_optional_and_carries_the_file(chart: Path) -> None:
    assert not [m for m in render(chart, {}).of_kind("ConfigMap") if "dashboard" in m.name]
    values, out = rendered_ci(chart, "direct-values.yaml")
    cm = out.get("ConfigMap", f"{RELEASE}-grafana-dashboard")
    assert cm.labels["grafana_dashboard"] == "1"
    assert cm.obj["metadata"]["annotations"] == values["grafanaDashboard"]["annotations"]
    assert json.loads(cm.obj["data"]["cdc-pipeline.json"]) == json.loads(DASHBOARD.read_text())
    assert validate_manifests([cm]) == []
    elsewhere = render(chart, {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    moved = elsewhere.get("ConfigMap", f"{RELEASE}-grafana-dashboard")
    assert moved.obj["metadata"]["namespace"] == "monitoring"


def test_grafana_dashboard_values_are_schema_checked(chart: Path) -> None:
    with pytest.raises(Exception, match=r"(?i)schema|additional"):
        render(chart, {"grafanaDashboard": {"enabled": True, "folder": "CDC"}})


def test_jaeger_is_off_by_default_and_when_on_every_stage_exports_to_it(chart: Path) -> None:
    values = load_values(CI_DIR / "direct-values.yaml")
    off = render(chart, values)
    assert not [m for m in off.of_kind("Deployment") if "jaeger" in m.name]
    for workload in off.of_kind("Deployment"):
        for c in containers(workload):
            assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_of(c)

    values["global"].setdefault("tracing", {})["jaeger"] = {"enabled": True}
    on = render(chart, values)
    jaeger = on.get("Deployment", f"{RELEASE}-jaeger")
    ports = {
        p["name"]: p["port"] for p in on.get("Service", f"{RELEASE}-jaeger").obj["spec"]["ports"]
    }
    assert ports["otlp-grpc"] == 4317 and ports["ui"] == 16686
    assert validate_manifests([jaeger]) == []
    stages = [
        d
        for d in on.of_kind("Deployment")
        if d.labels.get("app.kubernetes.io/component") in ("ingest", "sink")
    ]
    assert {d.labels["app.kubernetes.io/component"] for d in stages} == {"ingest", "sink"}
    for stage in stages:
        (c,) = containers(stage)
        assert env_of(c)["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{RELEASE}-jaeger:4317"
    # the ingest may reach it (its egress policy names the collector's port)
    policy = on.get("NetworkPolicy", f"{RELEASE}-inventory-cdc-ingest")
    assert any(
        {"port": 4317, "protocol": "TCP"} in rule.get("ports", [])
        for rule in policy.obj["spec"]["egress"]
    ), policy.obj["spec"]["egress"]


@pytest.mark.parametrize(("grace", "budget"), [(None, 50), (30, 20), (5, 2)])
def test_the_shutdown_budget_fits_the_grace_period(
    chart: Path, grace: int | None, budget: int
) -> None:
    """Stages stop on their own (exit 0, or 3 with unacked batches) before the kubelet's
    SIGKILL: shutdown_timeout_seconds is the grace period minus 10 s."""
    values = load_values(CI_DIR / "direct-values.yaml")
    if grace is not None:
        values["pipeline"]["terminationGracePeriodSeconds"] = grace
    out = render(chart, values)
    configs = [c for c in out.of_kind("ConfigMap") if "platform.yaml" in c.obj["data"]]
    assert configs
    for config in configs:
        platform_yaml = yaml.safe_load(config.obj["data"]["platform.yaml"])
        assert platform_yaml["shutdown_timeout_seconds"] == budget
    stages = [d for d in out.of_kind("Deployment") if "-cdc" in d.name]
    assert stages
    for deployment in stages:
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] == (grace or 60)


@pytest.mark.parametrize(
    "values_file", ["pubsub-values.yaml", "kinesis-values.yaml", "direct-values.yaml"]
)
def test_capture_stage_is_its_own_deployment_for_pubsub_and_kinesis(
    chart: Path, values_file: str
) -> None:
    values, out = rendered_ci(chart, values_file)
    pipelines = pipelines_of(values)
    captures = {
        m.name: m
        for m in out.of_kind("Deployment")
        if m.labels.get("app.kubernetes.io/component") == "capture"
    }
    if transport(values) not in ("pubsub", "kinesis"):
        assert not captures  # direct: the ingest reads the slot itself
        return
    assert set(captures) == {f"{RELEASE}-{name}-capture" for name in pipelines}
    for name in pipelines:
        capture = captures[f"{RELEASE}-{name}-capture"]
        assert capture.obj["spec"]["replicas"] == 1
        assert capture.obj["spec"]["strategy"] == {"type": "Recreate"}  # one slot reader
        (container,) = containers(capture)
        assert container["args"][:2] == ["capture", "/config/pipeline.yaml"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        policy = out.get("NetworkPolicy", f"{RELEASE}-{name}-capture")
        ports = {p["port"] for rule in policy.obj["spec"]["egress"] for p in rule.get("ports", [])}
        assert 443 in ports and 53 in ports
