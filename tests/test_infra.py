"""The deployment files of `infra/` hold together and agree with the code: NATS configs the
server accepts, the local cluster `just cluster` runs, Kubernetes manifests whose names meet
(Deployments, Services, ConfigMap, KEDA ScaledObjects on the consumers jetspool creates), Helm
values for the NATS chart that honour `nats.replicas: 3`, the compose file and the image."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from jetspool import cli, cluster
from jetspool.domain import names
from jetspool.domain.errors import ConfigError
from jetspool.embedded import EmbeddedNats, server_binary
from jetspool.settings import Settings, validate
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
NATS_CONFIGS = [*sorted((INFRA / "nats").rglob("*.conf")), INFRA / "compose" / "nats.conf"]
_HELM_RELEASE = "nats"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    return [doc for resource in kustomization["resources"] for doc in _documents(K8S / resource)]


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _manifests() if doc["kind"] == kind}


def _settings_in(text: str) -> Settings:
    return validate(yaml.safe_load(text))


def _cluster_settings() -> Settings:
    return _settings_in(_of_kind("ConfigMap")["jetspool-config"]["data"]["jetspool.yaml"])


def _helm_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((INFRA / "helm" / "nats-values.yaml").read_text(encoding="utf-8"))
    return values


def _cli_accepts(args: list[str]) -> None:
    """`jetspool ARGS` parses (a wrong command or flag exits with a usage error)."""
    cli._parser().parse_args(args)  # noqa: SLF001 - the real parser, not a copy of it


@pytest.mark.parametrize("config", NATS_CONFIGS, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_nats_config_is_one_the_server_accepts(config: Path) -> None:
    checked = subprocess.run(
        [str(server_binary()), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "SERVER_NAME": "nats-1"},
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("node", range(cluster.SIZE))
def test_the_cluster_node_configs_are_the_nodes_just_cluster_starts(node: int) -> None:
    text = (INFRA / "nats" / "cluster" / f"node-{node + 1}.conf").read_text(encoding="utf-8")
    started = cluster.LocalCluster(ROOT / "jetspool-cluster").nodes[node]

    assert f"listen: 127.0.0.1:{cluster.CLIENT_PORTS[node]}\n" in text
    assert f"server_name: {started.server_name}\n" in text
    assert cluster.route_block(cluster.ROUTE_PORTS[node], cluster.ROUTE_PORTS) in text
    assert cluster.route_block(cluster.ROUTE_PORTS[node], cluster.ROUTE_PORTS) in started.config()
    assert f'store_dir: "./jetspool-cluster/node-{node + 1}/jetstream"' in text
    assert "sync_interval: always" in text


def test_just_cluster_runs_the_local_cluster_module() -> None:
    justfile = (ROOT / "justfile").read_text(encoding="utf-8")
    recipe = re.search(r"^cluster.*:\n((?:    .*\n)+)", justfile, re.MULTILINE)
    assert recipe is not None, "a `cluster` recipe"
    assert "-m jetspool.cluster" in recipe.group(1)


def test_the_kustomization_lists_every_manifest_and_each_has_what_kubernetes_requires() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == files
    for doc in _manifests():
        assert doc["apiVersion"]
        assert doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert kustomization["namespace"] in _of_kind("Namespace")


@pytest.mark.parametrize("name", ["jetspool-gateway", "jetspool-worker", "echo"])
def test_each_deployment_selects_its_pods_runs_a_real_command_and_mounts_the_config(name: str) -> None:
    deployment = _of_kind("Deployment")[name]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]

    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert container["image"] == "jetspool", "the image the kustomization sets"
    _cli_accepts(container["args"])
    if "--config" in container["args"]:
        config_path = Path(container["args"][container["args"].index("--config") + 1])
        (mount,) = container["volumeMounts"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert Path(mount["mountPath"]) / config_path.name == config_path
        assert config_path.name in _of_kind("ConfigMap")[volume["configMap"]["name"]]["data"]


def test_each_service_reaches_a_port_of_the_pods_it_selects() -> None:
    templates = [d["spec"]["template"] for d in _of_kind("Deployment").values()]
    for service in _of_kind("Service").values():
        selector = service["spec"]["selector"]
        (pod,) = [t["spec"] for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        ports = {port["name"] for container in pod["containers"] for port in container["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports


def test_the_cluster_config_is_valid_and_lists_every_nats_node_of_the_helm_release() -> None:
    settings = _cluster_settings()
    nodes = _helm_values()["config"]["cluster"]["replicas"]

    assert settings.nats.replicas == 3
    assert nodes >= settings.nats.replicas
    assert settings.nats.servers == [f"nats://{_HELM_RELEASE}-{i}.{_HELM_RELEASE}-headless:4222" for i in range(nodes)]
    gateway_port = _of_kind("Deployment")["jetspool-gateway"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert [p["containerPort"] for p in gateway_port] == [settings.gateway.port]
    assert settings.gateway.host == "0.0.0.0"


def test_the_helm_values_make_a_three_node_jetstream_cluster_on_disk_fsyncing_every_write() -> None:
    config = _helm_values()["config"]

    assert config["cluster"]["enabled"] is True
    assert config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert config["jetstream"]["merge"]["sync_interval"] == "always"
    assert config["monitor"]["enabled"] is True


def _triggers(scaled: dict[str, Any]) -> list[dict[str, str]]:
    return [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "nats-jetstream"]


def test_each_function_scales_with_its_consumers_lag_and_so_do_the_workers() -> None:
    scaled = _of_kind("ScaledObject")
    deployments = _of_kind("Deployment")
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))["namespace"]
    monitor = f"{_HELM_RELEASE}-headless.{namespace}.svc.cluster.local:{_helm_values()['config']['monitor']['port']}"
    functions = _cluster_settings().functions
    consumers = {f.name: {names.queue_consumer(f.name, p) for p in names.PRIORITIES} for f in functions}

    for function in functions:
        own = scaled[function.name]
        assert own["spec"]["scaleTargetRef"]["name"] in deployments
        assert {t["consumer"] for t in _triggers(own)} == consumers[function.name]
    workers = scaled["jetspool-worker"]
    assert workers["spec"]["scaleTargetRef"]["name"] == "jetspool-worker"
    assert workers["spec"]["minReplicaCount"] >= 1, "a worker also delivers callbacks"
    assert {t["consumer"] for t in _triggers(workers)} == set().union(*consumers.values())
    for trigger in [t for s in scaled.values() for t in _triggers(s)]:
        assert trigger["stream"] == names.QUEUE_STREAM
        assert trigger["account"] == "$G"
        assert trigger["natsServerMonitoringEndpoint"] == monitor
        assert int(trigger["lagThreshold"]) > 0


def test_the_compose_file_runs_a_three_node_cluster_and_jetspool_on_it() -> None:
    compose = yaml.safe_load((INFRA / "compose" / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    nats_nodes = sorted(name for name in services if name.startswith("nats-"))
    settings = _settings_in((INFRA / "compose" / "jetspool.yaml").read_text(encoding="utf-8"))
    routes = re.search(r"routes: \[(.*)\]", (INFRA / "compose" / "nats.conf").read_text(encoding="utf-8"))

    assert nats_nodes == ["nats-1", "nats-2", "nats-3"]
    assert routes is not None
    assert routes.group(1).split(", ") == [f"nats-route://{node}:6222" for node in nats_nodes]
    assert settings.nats.servers == [f"nats://{node}:4222" for node in nats_nodes]
    assert settings.nats.replicas == 3
    for name in ("gateway", "worker", "echo"):
        _cli_accepts(services[name]["command"])
        assert (ROOT / services[name]["build"]["context"].removeprefix("../../")).is_dir()
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    assert services["gateway"]["ports"] == [f"127.0.0.1:{settings.gateway.port}:{settings.gateway.port}"]


def test_the_image_installs_jetspool_and_runs_it_unprivileged() -> None:
    lines = [
        line
        for line in (INFRA / "Containerfile").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    instructions = [line.split(maxsplit=1) for line in lines if line[0].isupper()]
    by_kind: dict[str, list[str]] = {}
    for kind, rest in instructions:
        by_kind.setdefault(kind, []).append(rest)

    assert all(re.fullmatch(r"python:3\.1[1-9]-slim( AS \w+)?", base) for base in by_kind["FROM"])
    for source in [s for copy in by_kind["COPY"] if "--from" not in copy for s in shlex.split(copy)[:-1]]:
        assert (ROOT / source).exists(), source
    assert any("pip install" in run for run in by_kind["RUN"])
    assert int(by_kind["USER"][-1]) != 0
    assert by_kind["ENTRYPOINT"] == ['["jetspool"]']
    assert by_kind["EXPOSE"] == [str(Settings().gateway.port)]
    _cli_accepts(yaml.safe_load(by_kind["CMD"][-1]))


def test_an_embedded_server_holds_its_data_dir_for_as_long_as_it_runs(tmp_path: Path) -> None:
    """One server per store: a second is refused while the first runs, even once the first's
    owner is gone (the lock lives with the server process), and starts once the first is killed."""
    first = EmbeddedNats(tmp_path / "data", port=free_port())
    second = EmbeddedNats(tmp_path / "data", port=free_port())
    first.start()
    try:
        with pytest.raises(ConfigError, match="is in use by another nats-server"):
            second.start()
        first.kill()  # SIGKILL: no clean-up of ours runs
        second.start()
        assert second.url
    finally:
        first.stop()
        second.stop()


def test_the_nats_chart_is_installed_at_one_pinned_version() -> None:
    """The values follow one chart's keys: an unpinned install takes whatever chart is newest."""
    installs = [
        line
        for path in (ROOT / "docs" / "deployment.md", INFRA / "helm" / "nats-values.yaml")
        for line in path.read_text(encoding="utf-8").splitlines()
        if "helm install" in line
    ]
    versions = {found.group(1) if (found := re.search(r"--version (\S+)", line)) else None for line in installs}

    assert len(installs) == 2
    assert len(versions) == 1
    assert None not in versions
