"""The container and Kubernetes examples, linted against the configs they run.

No docker daemon or cluster is needed (nor used): the Dockerfile is parsed
instruction by instruction, the manifests with PyYAML, and the configs they
carry are loaded by wsproxy's own loader, so a probe on the wrong port, a
grace period shorter than the drain, or a COPY of a file that is not in the
tree fails here and not at ``docker build`` or ``kubectl apply`` time.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from wsproxy.edge.contexts import load_checked
from wsproxy.config.schema import Config

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "wsproxy.yaml"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        found.append((keyword.upper(), arguments.strip()))
    assert not pending, "a continuation line ends the file"
    return found


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(path):
        if keyword == "FROM":
            result.append([])
        assert result, f"{keyword} before FROM"
        result[-1].append((keyword, arguments))
    return result


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def image_config(tmp_path: Path) -> Config:
    """The config the image copies to /etc/wsproxy/wsproxy.yaml, loaded as the image would."""
    final = stages(DOCKERFILE)[-1]
    [source] = [a.split()[0] for k, a in final if k == "COPY" and a.split()[-1] == "/etc/wsproxy/wsproxy.yaml"]
    return load_checked(str(ROOT / source))


def test_the_image_runs_as_an_unprivileged_user_on_python_slim() -> None:
    final = stages(DOCKERFILE)[-1]
    assert final[0] == ("FROM", "python:3.11-slim")
    [user] = [a for k, a in final if k == "USER"]
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and (not uid.isdigit() or int(uid) >= 1000), user
    assert ("STOPSIGNAL", "SIGTERM") in final
    entry = exec_form(next(a for k, a in final if k == "ENTRYPOINT"))
    command = exec_form(next(a for k, a in final if k == "CMD"))
    assert entry == ["/opt/wsproxy/bin/wsproxy"] and command[:1] == ["run"]
    assert "/etc/wsproxy/wsproxy.yaml" in command
    assert any(k == "RUN" and "pip install" in a and "wsproxy-*.whl" in a for k, a in final)


def test_every_copy_source_exists_and_is_not_ignored() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for stage in stages(DOCKERFILE):
        for keyword, arguments in stage:
            if keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(arguments)
            if any(w.startswith("--from=") for w in words):
                continue  # from an earlier stage, not the build context
            sources = [w for w in words[:-1] if not w.startswith("--")]
            assert keyword == "COPY", "ADD fetches URLs and unpacks archives: use COPY"
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the tree"
                assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_the_health_check_asks_healthz_on_the_admin_listener_of_the_image_config(tmp_path: Path) -> None:
    final = stages(DOCKERFILE)[-1]
    [check] = [a for k, a in final if k == "HEALTHCHECK"]
    command = exec_form(check.split(" CMD ", 1)[1])
    assert command[0].startswith("/opt/wsproxy/bin/")
    [url] = re.findall(r"https?://[^'\"\s]+", " ".join(command))
    config = image_config(tmp_path)
    assert config.admin is not None
    assert url == f"http://{config.admin.bind}/healthz"
    assert not config.admin.health_needs_token  # the check sends no token
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert {listener.bind.port for listener in config.listeners} <= exposed


def test_the_image_config_drains_within_the_documented_stop_timeout(tmp_path: Path) -> None:
    config = image_config(tmp_path)
    match = re.search(r"--stop-timeout (\d+)", DOCKERFILE.read_text())
    assert match, "the Dockerfile's usage line gives docker run a --stop-timeout"
    assert int(match[1]) > config.shutdown.timeout_s + config.shutdown.spread_s


# --- Kubernetes ----------------------------------------------------------------------------


@pytest.fixture
def manifests() -> dict[str, dict]:  # type: ignore[type-arg]
    docs = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    by_name = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(by_name) == len(docs), "two objects of one kind with one name"
    return by_name


def mounted_config(manifests: dict[str, dict], tmp_path: Path) -> tuple[Config, dict]:  # type: ignore[type-arg]
    """The ConfigMap's wsproxy.yaml, at the path the container reads, loaded by wsproxy's loader.

    Files the config names under a Secret's mount point are written into
    ``tmp_path`` from the Secret, and the config is pointed at them.
    """
    pod = manifests["Deployment/wsproxy"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    config_path = args[args.index("-c") + 1]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    directory, name = config_path.rsplit("/", 1)
    config_map = manifests[f"ConfigMap/{mounts[directory]['configMap']['name']}"]
    text = config_map["data"][name]
    for mount_path, volume in mounts.items():
        if "secret" in volume:
            secret = manifests[f"Secret/{volume['secret']['secretName']}"]
            for key, value in secret["stringData"].items():
                (tmp_path / key).write_text(value)
                text = text.replace(f"{mount_path}/{key}", str(tmp_path / key))
    (tmp_path / name).write_text(text)
    return load_checked(str(tmp_path / name)), container


def test_the_pod_probes_ready_and_healthz_on_the_admin_port(manifests: dict[str, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    config, container = mounted_config(manifests, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.admin is not None and config.admin.bind.port == ports["admin"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == config.admin.bind.port
        assert "httpHeaders" not in container[probe]["httpGet"]  # probes carry no token...
    assert not config.admin.health_needs_token  # ...and need none
    # kubelet probes the pod IP: the admin listener must not be on loopback only
    assert config.admin.bind.host in ("0.0.0.0", "::")


def test_the_grace_period_outlasts_the_drain(manifests: dict[str, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    config, _ = mounted_config(manifests, tmp_path)
    grace = manifests["Deployment/wsproxy"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.shutdown.timeout_s + config.shutdown.spread_s


def test_the_services_reach_the_listener_and_the_backends(manifests: dict[str, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    config, container = mounted_config(manifests, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["ws"] in {listener.bind.port for listener in config.listeners}
    service = manifests["Service/wsproxy"]
    assert service["spec"]["selector"] == manifests["Deployment/wsproxy"]["spec"]["template"]["metadata"]["labels"]
    assert all(ports.get(p["targetPort"], p["targetPort"]) == ports["ws"] for p in service["spec"]["ports"])
    # Backends by the stable names a headless Service gives StatefulSet pods: NAME-i.SERVICE:PORT.
    headless = manifests["Service/echo"]
    assert headless["spec"]["clusterIP"] == "None"
    stateful = manifests["StatefulSet/echo"]["spec"]
    assert stateful["serviceName"] == "echo"
    expected = {f"echo-{i}.echo:{headless['spec']['ports'][0]['port']}" for i in range(stateful["replicas"])}
    assert {str(b.address) for pool in config.pools.values() for b in pool.backends} == expected


def test_the_pod_runs_as_the_image_user_without_privileges(manifests: dict[str, dict]) -> None:  # type: ignore[type-arg]
    pod = manifests["Deployment/wsproxy"]["spec"]["template"]["spec"]
    [user] = [a for k, a in stages(DOCKERFILE)[-1] if k == "USER"]
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
