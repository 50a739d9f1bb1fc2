"""Kubernetes, offline: the k8s/ manifests are the rendering of deployments/, validate against the
KubeRay CRD and Ray's Serve schema, and broken ones fail with messages that name file and field."""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
from pathlib import Path

import pytest
import ray
import yaml

from sedac_ray.cli import main
from sedac_ray.deploy.cli import CRD_ENV
from sedac_ray.deploy.render import TARGETS, render
from sedac_ray.deploy.validate import documents_problems, file_problems, load_crd_schema

REPO = Path(__file__).resolve().parents[1]
# The vendored KubeRay CRD (k8s/crd/README.md says where it comes from), unless the env var names another.
CRD = Path(os.environ.get(CRD_ENV) or REPO / "k8s" / "crd" / "ray.io_rayservices.yaml")
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
WHERE = "k8s/rayservice-cpu.yaml"


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    if not CRD.is_file():
        pytest.fail(f"KubeRay RayService CRD not found at {CRD}; set {CRD_ENV} to a RayService CRD file")
    return load_crd_schema(CRD)


def _documents(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def _cpu_manifest() -> list[dict]:
    return _documents(REPO / TARGETS["cpu"].output)


def test_every_target_has_a_committed_manifest():
    assert sorted(REPO / t.output for t in TARGETS.values()) == MANIFESTS


@pytest.mark.parametrize("target", TARGETS.values(), ids=lambda t: t.name)
def test_committed_manifests_are_the_rendering_of_deployments(target):
    committed = (REPO / target.output).read_text()
    assert committed == render(target, REPO), (
        f"{target.output} differs from {target.sources()}: run `sedac k8s render {target.name}`"
    )
    # One source of truth: serveConfigV2 is the deployments/ Serve config itself.
    rayservice = _documents(REPO / target.output)[0]
    serve_config = yaml.safe_load((REPO / target.serve_config).read_text())
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == serve_config


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_crd_and_serve_schema(path, crd_schema):
    problems = file_problems(path, crd_schema, name=f"k8s/{path.name}")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_scale_each_stage_on_its_own(path):
    rayservice, service = _documents(path)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    stages = sorted((d for d in app["deployments"] if d["name"].startswith("Stage")), key=lambda d: d["name"])
    maxima = [stage["autoscaling_config"]["max_replicas"] for stage in stages]
    assert len(stages) >= 3 and maxima == sorted(maxima, reverse=True) and maxima[-1] < maxima[0], maxima
    for group in cluster["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
            resources["limits"]
        )
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 9000, "name": "serve-grpc"} in head["ports"]
    assert service["kind"] == "Service" and {p["name"] for p in service["spec"]["ports"]} == {
        "serve",
        "serve-grpc",
    }


def test_image_versions_agree():
    dockerfile = (REPO / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert ray_version == ray.__version__, "the image's Ray must be the Ray the tests ran"
    assert re.search(r"^EXPOSE 8000 9000$", dockerfile, re.M)
    version = importlib.metadata.version("sedac-ray")
    for target in TARGETS.values():
        cluster = _documents(REPO / target.output)[0]["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == ray_version
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        images = {group["template"]["spec"]["containers"][0]["image"] for group in groups}
        assert images == {f"sedac-ray:{version}-{target.name}"}


def test_kubernetes_int_or_string_maps_to_integer_or_string(crd_schema):
    limits = crd_schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["headGroupSpec"]
    limits = limits["properties"]["template"]["properties"]["spec"]["properties"]["containers"]["items"]
    quantity = limits["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert {"type": "integer"} in quantity["anyOf"] and {"type": "string"} in quantity["anyOf"]
    assert "x-kubernetes-int-or-string" not in quantity


# ---- a broken manifest fails, and says where -----------------------------------------------------


def _break_cluster(path: str, value) -> callable:
    """Set ``path`` (dots, list indices as numbers) under spec.rayClusterConfig to ``value``."""

    def apply(rayservice: dict) -> None:
        node = rayservice["spec"]["rayClusterConfig"]
        *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
        for part in parents:
            node = node[part]
        node[last] = value

    return apply


def _break_serve(change: callable) -> callable:
    def apply(rayservice: dict) -> None:
        serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        change(serve)
        rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(serve, sort_keys=False)

    return apply


def _problems_after(break_it: callable, crd_schema: dict | None) -> list[str]:
    documents = _cpu_manifest()
    assert documents_problems(documents, WHERE, crd_schema) == []
    broken = copy.deepcopy(documents)
    break_it(broken[0])
    return documents_problems(broken, WHERE, crd_schema)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            _break_cluster("workerGroupSpecs.0.maxReplicas", "three"),
            "spec.rayClusterConfig.workerGroupSpecs[cpu].maxReplicas: 'three' is not of type 'integer'",
        ),
        (
            _break_cluster("enableInTreeAutoScaling", True),
            "spec.rayClusterConfig: Additional properties are not allowed ('enableInTreeAutoScaling' was "
            "unexpected)",
        ),
        (
            _break_cluster("headGroupSpec.template.spec.containers.0.ports.4.containerPort", "9000"),
            "spec.rayClusterConfig.headGroupSpec.template.spec.containers[ray-head].ports[serve-grpc]"
            ".containerPort: '9000' is not of type 'integer'",
        ),
        (
            _break_cluster("headGroupSpec.rayStartParams.num-cpus", 0),
            "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'",
        ),
    ],
    ids=["wrong-type", "unknown-field", "port-type", "start-param-type"],
)
def test_crd_violations_name_the_field(break_it, message, crd_schema):
    problems = _problems_after(break_it, crd_schema)
    assert f"{WHERE}: RayService sedac-cpu: {message}" in problems, problems


SERVE = f"{WHERE}: RayService sedac-cpu: spec.serveConfigV2"


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            _break_serve(lambda s: s["grpc_options"].update(grpc_port=9001)),
            f"{SERVE}: grpc_options.grpc_port: unknown key (Ray would ignore it silently); "
            "did you mean 'port'? known: enable_reflection, grpc_servicer_functions, port, request_timeout_s",
        ),
        (
            _break_serve(
                lambda s: s["applications"][0].update(import_path="sedac_ray.serving.app:build_app")
            ),
            f"{SERVE}: applications[sedac].import_path: cannot import module 'sedac_ray.serving.app' "
            "(ModuleNotFoundError: No module named 'sedac_ray.serving')",
        ),
        (
            _break_serve(
                lambda s: s["applications"][0]["deployments"][2]["autoscaling_config"].update(
                    max_replicas="x"
                )
            ),
            f"{SERVE}: applications[sedac].deployments[Stage1].autoscaling_config.max_replicas: "
            "Input should be a valid integer, unable to parse string as an integer (got 'x')",
        ),
        (
            _break_serve(lambda s: s["http_options"].update(host="127.0.0.1")),
            f"{SERVE}: http_options.host is '127.0.0.1'; a proxy in a pod must bind 0.0.0.0 or no Service "
            "reaches it",
        ),
        (
            _break_serve(lambda s: s["grpc_options"].update(port=9100)),
            f"{WHERE}: RayService sedac-cpu: spec.rayClusterConfig.headGroupSpec.template.spec"
            ".containers[ray-head].ports: the Ray container of head needs a port named 'serve-grpc' = 9100 "
            "(the Serve config's), has 9000",
        ),
        (
            _break_cluster("enableInTreeAutoscaling", False),
            f"{WHERE}: RayService sedac-cpu: spec.rayClusterConfig.enableInTreeAutoscaling must be true: "
            "Stage0, Stage1, Stage2, LMHead autoscale, and without Ray's autoscaler no pod is added for "
            "their new replicas",
        ),
        (
            _break_serve(
                lambda s: s["applications"][0]["deployments"][1]["ray_actor_options"].update(num_cpus=3)
            ),
            f"{SERVE}: applications[sedac].deployments[Stage0].ray_actor_options: asks 3 CPU and 0 GPU per "
            "replica, more than any pod offers (head: 0 CPU and 0 GPU, cpu: 2 CPU and 0 GPU)",
        ),
        (
            _break_serve(
                lambda s: s["applications"][0]["deployments"][1]["autoscaling_config"].update(max_replicas=9)
            ),
            f"{WHERE}: RayService sedac-cpu: spec.rayClusterConfig.workerGroupSpecs: at their max_replicas "
            "the deployments ask 7.7 CPU, but the pods at their maxReplicas hold 6 "
            "(head: 1 x 0, cpu: 3 x 2); raise a worker group's maxReplicas or lower a deployment's "
            "max_replicas",
        ),
    ],
    ids=[
        "grpc-key",
        "import-path",
        "autoscaling-type",
        "loopback",
        "grpc-port",
        "no-autoscaler",
        "fits-no-pod",
        "too-few-pods",
    ],
)
def test_serve_and_cluster_problems_name_the_field(break_it, message):
    problems = _problems_after(break_it, crd_schema=None)  # these need no CRD
    assert message in problems, problems


def test_a_service_that_selects_no_pod_is_reported():
    rayservice, service = _cpu_manifest()
    service["spec"]["selector"]["app.kubernetes.io/instance"] = "sedac-gpu"
    assert documents_problems([rayservice, service], WHERE) == [
        f"{WHERE}: Service sedac-cpu-api: spec.selector: no pod template of the RayServices in this file "
        "carries app.kubernetes.io/instance=sedac-gpu"
    ]


# ---- the commands ------------------------------------------------------------------------------


def test_validate_command_prints_problems_and_fails(tmp_path, capsys, crd_schema):
    rayservice, service = _cpu_manifest()
    _break_cluster("workerGroupSpecs.0.minReplicas", "one")(rayservice)
    _break_serve(lambda s: s["grpc_options"].update(prot=9000))(rayservice)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all([rayservice, service]))
    assert main(["k8s", "validate", "--crd", str(CRD), str(broken), str(MANIFESTS[0])]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{broken}: RayService sedac-cpu: spec.rayClusterConfig.workerGroupSpecs[cpu].minReplicas: "
        "'one' is not of type 'integer'",
        f"{broken}: RayService sedac-cpu: spec.serveConfigV2: grpc_options.prot: unknown key "
        "(Ray would ignore it silently); did you mean 'port'? "
        "known: enable_reflection, grpc_servicer_functions, port, request_timeout_s",
        f"ok: {MANIFESTS[0]}",
    ]


def test_render_check_and_stdout(tmp_path, capsys):
    assert main(["k8s", "render", "--check", "--root", str(REPO)]) == 0
    assert (
        main(["k8s", "render", "cpu", "--stdout", "--image", "example/sedac-ray:dev", "--root", str(REPO)])
        == 0
    )
    rayservice, _ = yaml.safe_load_all(capsys.readouterr().out)
    groups = [
        rayservice["spec"]["rayClusterConfig"]["headGroupSpec"],
        *rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]
    assert {g["template"]["spec"]["containers"][0]["image"] for g in groups} == {"example/sedac-ray:dev"}
    # A stale manifest is named, with the command that regenerates it.
    for relative in ["deployments", "k8s/templates"]:
        (tmp_path / relative).mkdir(parents=True)
    for target in TARGETS.values():
        for relative in (target.serve_config, target.cluster, target.output):
            (tmp_path / relative).write_text((REPO / relative).read_text())
    stale = tmp_path / TARGETS["gpu"].serve_config
    stale.write_text(stale.read_text().replace("max_replicas: 4", "max_replicas: 5"))
    assert main(["k8s", "render", "--check", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "k8s/rayservice-gpu.yaml is not the rendering of deployments/gpu.yaml and k8s/templates/gpu.yaml: "
        "run `sedac k8s render gpu`"
    )


def test_image_copies_what_the_package_build_reads():
    # pyproject's `readme` and `license-files` must be in the image, or `pip install .` fails there.
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {project["readme"], *project["license-files"]}
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(part for part in line.split()[1:-1] if not part.startswith("--"))
    assert needed <= copied, f"Dockerfile does not COPY {sorted(needed - copied)}"
