"""Offline checks of deploy configs, without a cluster: Serve configs (``deployments/*.yaml``) and
KubeRay ``RayService`` manifests (``k8s/*.yaml``).

Every check returns problems as text that names the file and the field, e.g.
``k8s/rayservice-cpu.yaml: RayService sedac-cpu: spec.serveConfigV2: grpc_options.prot: unknown key ...``;
an empty list means the config passed. ``sedac k8s validate FILE...`` prints them.

What is checked, and why by hand where Ray or Kubernetes would not say it:

- Serve configs: Ray's own ``ServeDeploySchema``; keys Ray's schema does not know (Ray ignores them
  silently, so a misspelled ``grpc_options`` key would just vanish); ``autoscaling_config`` against
  ``AutoscalingConfig`` (the schema accepts any dict there); that every ``import_path`` and gRPC
  servicer function imports and is callable here; sedac-ray's own app args and deployment names.
- RayService manifests: the KubeRay CRD's openAPIV3Schema, strict about unknown fields as
  ``kubectl apply`` is; ``serveConfigV2`` as a Serve config; what only shows up on a running cluster:
  a proxy bound to 127.0.0.1, Serve ports the pods do not name, autoscaling without the Ray autoscaler,
  replicas that fit no pod, maxima the worker groups cannot hold.
- Services shipped beside a RayService: their selector must match the RayService's pods.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

RAYSERVICE_API_VERSION = "ray.io/v1"
HTTP_PORT_NAME = "serve"  # KubeRay's serve Service and worker readiness probes look for this name
GRPC_PORT_NAME = "serve-grpc"
SEDAC_IMPORT_PATH = "sedac_ray.serve.app:build_app"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB: libyaml is 10x faster


# ---- field paths ---------------------------------------------------------------------------------


def field_path(parts: typing.Iterable[Any], data: Any = None) -> str:
    """``('applications', 0, 'deployments', 1, 'num_replicas')`` -> ``applications[sedac].
    deployments[Stage0].num_replicas``: list items are named by their ``name``/``groupName`` when
    ``data`` (the document the path walks) has one, else by index."""
    text = ""
    node = data
    for part in parts:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
            label = (item.get("name") or item.get("groupName")) if isinstance(item, dict) else None
            text += f"[{label or part}]"
            node = item
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text or "(top level)"


def _problem(where: str, parts: typing.Iterable[Any], data: Any, what: str) -> str:
    return f"{where}: {field_path(parts, data)}: {what}"


def _pydantic_problems(err: ValidationError, where: str, parts: tuple, data: Any) -> list[str]:
    """One problem per pydantic error, at its field under ``parts``, with the offending value."""
    problems = []
    for error in err.errors():
        scalar = not isinstance(error["input"], (dict, list))
        what = f"{error['msg']} (got {error['input']!r})" if scalar else error["msg"]
        problems.append(_problem(where, (*parts, *error["loc"]), data, what))
    return problems


# ---- Serve configs -------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The pydantic models a field's annotation holds, each with whether it sits in a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, typing.List):  # noqa: UP006 (Ray's schema spells it typing.List)
        return [(model, True) for arg in args for model, _ in _models_in(arg)]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [found for arg in args for found in _models_in(arg)]
    return []


def _unknown_keys(data: Any, model: type[BaseModel], parts: tuple) -> list[tuple[tuple, str]]:
    """Keys of ``data`` that ``model`` (and the models nested in it) does not declare."""
    if not isinstance(data, dict):
        return []
    found = []
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(fields))
            found.append(((*parts, key), f"unknown key (Ray would ignore it silently); {hint}known: {known}"))
            continue
        for nested, in_list in _models_in(fields[key].annotation):
            if in_list and isinstance(value, list):
                for index, item in enumerate(value):
                    found += _unknown_keys(item, nested, (*parts, key, index))
            elif not in_list:
                found += _unknown_keys(value, nested, (*parts, key))
    return found


def _import_problem(dotted: str) -> str | None:
    """Why ``module:attr`` or ``module.attr`` does not import to a callable here, or None."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not module_name or not attr:
        return f"{dotted!r} is not of the form module:attribute or module.attribute"
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure is the finding, whatever its type
        return f"cannot import module {module_name!r} ({type(err).__name__}: {err})"
    if not hasattr(module, attr):
        return f"module {module_name!r} has no attribute {attr!r}"
    if not callable(getattr(module, attr)):
        return f"{dotted!r} is not callable"
    return None


def _sedac_app_problems(app: dict, index: int, where: str, config: dict) -> list[str]:
    """sedac-ray's own app args, and deployment names that exist in the app it builds."""
    from sedac_ray.serve.config import PipelineConfig

    try:
        pipeline = PipelineConfig.from_args(app.get("args"))
    except (TypeError, ValueError) as err:
        return [_problem(where, ("applications", index, "args"), config, str(err))]
    expected = {"FrontDoor", "LMHead"} | {f"Stage{i}" for i in range(pipeline.num_stages)}
    return [
        _problem(
            where,
            ("applications", index, "deployments", position, "name"),
            config,
            f"no deployment {deployment.get('name')!r} in this app; it has {', '.join(sorted(expected))}",
        )
        for position, deployment in enumerate(app.get("deployments") or [])
        if isinstance(deployment, dict) and deployment.get("name") not in expected
    ]


def serve_config_problems(config: Any, where: str) -> list[str]:
    """Problems of one Serve config (the dict ``serve run`` or ``serveConfigV2`` holds)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return [
            f"{where}: expected a Serve config (a mapping with `applications`), got {type(config).__name__}"
        ]
    problems = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        problems += _pydantic_problems(err, where, (), config)
    problems += [
        _problem(where, parts, config, what) for parts, what in _unknown_keys(config, ServeDeploySchema, ())
    ]
    grpc = config.get("grpc_options") if isinstance(config.get("grpc_options"), dict) else {}
    functions = grpc.get("grpc_servicer_functions")
    for position, function in enumerate(functions if isinstance(functions, list) else []):
        failure = _import_problem(str(function))
        if failure:
            problems.append(
                _problem(where, ("grpc_options", "grpc_servicer_functions", position), config, failure)
            )
    applications = config.get("applications")
    for index, app in enumerate(applications if isinstance(applications, list) else []):
        if not isinstance(app, dict):
            continue  # Serve's schema has said what is wrong
        failure = _import_problem(str(app.get("import_path", "")))
        if failure:
            problems.append(_problem(where, ("applications", index, "import_path"), config, failure))
        elif app.get("import_path") == SEDAC_IMPORT_PATH:
            problems += _sedac_app_problems(app, index, where, config)
        deployments = app.get("deployments")
        for position, deployment in enumerate(deployments if isinstance(deployments, list) else []):
            autoscaling = deployment.get("autoscaling_config") if isinstance(deployment, dict) else None
            if not isinstance(autoscaling, dict):
                continue
            try:  # Serve's schema takes any dict here and checks it only when it deploys
                AutoscalingConfig.model_validate(autoscaling)
            except ValidationError as err:
                parts = ("applications", index, "deployments", position, "autoscaling_config")
                problems += _pydantic_problems(err, where, parts, config)
    return problems


# ---- RayService manifests ------------------------------------------------------------------------


def _kubernetes_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 as Kubernetes writes it -> JSON Schema: int-or-string becomes integer-or-string, and
    objects that declare their properties reject others (kubectl's default strict field validation)."""
    if isinstance(node, list):
        return [_kubernetes_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _kubernetes_to_jsonschema(value) for key, value in node.items()}
    if node.pop("x-kubernetes-int-or-string", False) and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    return node


@functools.lru_cache(maxsize=4)
def _load_crd_schema(path: str) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=_YAML_LOADER)
    group = crd.get("spec", {}).get("group")
    for version in crd.get("spec", {}).get("versions", []):
        if f"{group}/{version.get('name')}" == RAYSERVICE_API_VERSION:
            return _kubernetes_to_jsonschema(version["schema"]["openAPIV3Schema"])
    raise ValueError(f"{path} holds no {RAYSERVICE_API_VERSION} RayService schema")


def load_crd_schema(path: Path | str) -> dict:
    """The RayService CRD file's ``ray.io/v1`` openAPIV3Schema, as JSON Schema (cached per path)."""
    return copy.deepcopy(_load_crd_schema(str(Path(path).resolve())))


def _crd_problems(manifest: dict, where: str, crd_schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path])
    return [_problem(where, error.absolute_path, manifest, error.message) for error in errors]


def _quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity: 2, "2", "500m", "1.5"."""
    text = str(value).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_groups(cluster: dict) -> list[tuple[str, dict, Any]]:
    """(name, group spec, most pods) for the head and each worker group."""
    groups = [("head", cluster.get("headGroupSpec") or {}, 1)]
    for worker in cluster.get("workerGroupSpecs") or []:
        groups.append((str(worker.get("groupName")), worker, worker.get("maxReplicas", 0)))
    return groups


def _ray_container(group: dict) -> dict:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]  # KubeRay runs Ray in the first container


def _pod_resources(group: dict) -> dict[str, float]:
    """The CPUs and GPUs Ray sees in one pod of ``group``: rayStartParams, else what KubeRay derives
    from the container's limits (requests for CPU), rounded up as Kubernetes' Quantity.Value() does."""
    params = group.get("rayStartParams") or {}
    resources = _ray_container(group).get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpu = params.get("num-gpus", next((v for k, v in limits.items() if str(k).endswith("gpu")), 0))
    return {"CPU": math.ceil(_quantity(cpu)), "GPU": math.ceil(_quantity(gpu))}


def _replica_demand(deployment: dict) -> tuple[dict[str, float], int] | None:
    """(CPU and GPU per replica, most replicas) of one Serve deployment, None where not fixed."""
    options = deployment.get("ray_actor_options") or {}
    per_replica = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
    autoscaling = deployment.get("autoscaling_config")
    most = (
        autoscaling.get("max_replicas", 1)
        if isinstance(autoscaling, dict)
        else deployment.get("num_replicas", 1)
    )
    return (per_replica, most) if isinstance(most, int) else None


def _describe(resources: dict[str, float]) -> str:
    return " and ".join(f"{amount:g} {name}" for name, amount in resources.items())


def _capacity_problems(serve: dict, cluster: dict, where: str) -> list[str]:
    """Every replica fits some pod, and the deployments at their maxima fit the groups at theirs
    (a lower bound: it ignores how replicas pack into pods)."""
    groups = [(name, _pod_resources(group), int(most)) for name, group, most in _pod_groups(cluster)]
    offered = ", ".join(f"{name}: {_describe(pod)}" for name, pod, _ in groups)
    problems = []
    total = {"CPU": 0.0, "GPU": 0.0}
    for index, app in enumerate(serve.get("applications") or []):
        for position, deployment in enumerate(app.get("deployments") or []):
            demand = _replica_demand(deployment)
            if demand is None:
                continue
            per_replica, most = demand
            if not any(all(pod[r] >= per_replica[r] for r in pod) for _, pod, _ in groups):
                parts = ("applications", index, "deployments", position, "ray_actor_options")
                what = f"asks {_describe(per_replica)} per replica, more than any pod offers ({offered})"
                problems.append(_problem(f"{where}: spec.serveConfigV2", parts, serve, what))
            for resource in total:
                total[resource] += per_replica[resource] * most
    for resource, asked in total.items():
        held = sum(pod[resource] * most for _, pod, most in groups)
        if asked > held:
            room = ", ".join(f"{name}: {most} x {pod[resource]:g}" for name, pod, most in groups)
            problems.append(
                f"{where}: spec.rayClusterConfig.workerGroupSpecs: at their max_replicas the deployments ask "
                f"{asked:g} {resource}, but the pods at their maxReplicas hold {held:g} ({room}); raise a "
                "worker group's maxReplicas or lower a deployment's max_replicas"
            )
    return problems


def _port_problems(serve: dict, cluster: dict, where: str, manifest: dict) -> list[str]:
    """The Serve ports must be named on the Ray containers where proxies run (KubeRay's Services and
    readiness probes find them by name), and the proxy must listen beyond the pod's loopback."""
    problems = []
    http = serve.get("http_options") or {}
    if http.get("host") not in ("0.0.0.0", "::"):
        problems.append(
            f"{where}: spec.serveConfigV2: http_options.host is {http.get('host')!r}; a proxy in a pod must "
            "bind 0.0.0.0 or no Service reaches it"
        )
    wanted = {HTTP_PORT_NAME: http.get("port", 8000)}
    grpc = serve.get("grpc_options") or {}
    if grpc.get("grpc_servicer_functions"):
        wanted[GRPC_PORT_NAME] = grpc.get("port", 9000)
    groups = _pod_groups(cluster)
    if serve.get("proxy_location") == "HeadOnly":
        groups = groups[:1]
    for position, (name, group, _) in enumerate(groups):
        ports = {p.get("name"): p.get("containerPort") for p in _ray_container(group).get("ports") or []}
        base = (
            ("spec", "rayClusterConfig", "headGroupSpec")
            if position == 0
            else ("spec", "rayClusterConfig", "workerGroupSpecs", position - 1)
        )
        for port_name, number in wanted.items():
            if ports.get(port_name) != number:
                parts = (*base, "template", "spec", "containers", 0, "ports")
                problems.append(
                    _problem(
                        where,
                        parts,
                        manifest,
                        f"the Ray container of {name} needs a port named {port_name!r} = {number} (the Serve "
                        f"config's), has {ports.get(port_name)!r}",
                    )
                )
    return problems


def rayservice_problems(manifest: dict, where: str, crd_schema: dict | None = None) -> list[str]:
    """Problems of one RayService manifest; the CRD schema check runs when ``crd_schema`` is given."""
    name = (manifest.get("metadata") or {}).get("name")
    where = f"{where}: RayService {name}"
    problems = []
    if manifest.get("apiVersion") != RAYSERVICE_API_VERSION:
        problems.append(
            f"{where}: apiVersion is {manifest.get('apiVersion')!r}, expected {RAYSERVICE_API_VERSION!r}"
        )
    if crd_schema is not None:
        problems += _crd_problems(manifest, where, crd_schema)
    spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
    cluster = spec.get("rayClusterConfig") if isinstance(spec.get("rayClusterConfig"), dict) else {}
    text = spec.get("serveConfigV2")
    if not isinstance(text, str):
        return [*problems, f"{where}: spec.serveConfigV2: missing; it holds the Serve config as YAML text"]
    try:
        serve = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [*problems, f"{where}: spec.serveConfigV2: not YAML: {err}"]
    serve_problems = serve_config_problems(serve, f"{where}: spec.serveConfigV2")
    if serve_problems or problems:  # the cluster checks below assume well-formed documents
        return problems + serve_problems
    autoscaled = [
        d.get("name")
        for app in serve["applications"]
        for d in app.get("deployments") or []
        if d.get("autoscaling_config")
    ]
    if autoscaled and cluster.get("enableInTreeAutoscaling") is not True:
        problems.append(
            f"{where}: spec.rayClusterConfig.enableInTreeAutoscaling must be true: {', '.join(autoscaled)} "
            "autoscale, and without Ray's autoscaler no pod is added for their new replicas"
        )
    try:
        return (
            problems
            + _port_problems(serve, cluster, where, manifest)
            + _capacity_problems(serve, cluster, where)
        )
    except (AttributeError, TypeError, ValueError) as err:  # malformed pods; the CRD check says where
        return [
            *problems,
            f"{where}: spec.rayClusterConfig: cannot read the pods ({err}); validate with the CRD",
        ]


def _pod_labels(manifest: dict) -> list[dict]:
    cluster = (manifest.get("spec") or {}).get("rayClusterConfig") or {}
    return [
        ((group.get("template") or {}).get("metadata") or {}).get("labels") or {}
        for _, group, _ in _pod_groups(cluster)
    ]


def service_problems(service: dict, rayservices: list[dict], where: str) -> list[str]:
    """A Service shipped with RayServices must select their pods (``ray.io/`` labels are KubeRay's to set)."""
    where = f"{where}: Service {(service.get('metadata') or {}).get('name')}"
    selector = (service.get("spec") or {}).get("selector") or {}
    ours = {key: value for key, value in selector.items() if not str(key).startswith("ray.io/")}
    if not ours:
        return []
    for manifest in rayservices:
        if any(ours.items() <= labels.items() for labels in _pod_labels(manifest)):
            return []
    wanted = ", ".join(f"{key}={value}" for key, value in ours.items())
    return [f"{where}: spec.selector: no pod template of the RayServices in this file carries {wanted}"]


# ---- files ---------------------------------------------------------------------------------------


def documents_problems(documents: list, where: str, crd_schema: dict | None = None) -> list[str]:
    """Problems of the YAML documents of one file: RayServices, Services, or one Serve config."""
    documents = [document for document in documents if document is not None]
    rayservices = [d for d in documents if isinstance(d, dict) and d.get("kind") == "RayService"]
    problems = []
    for document in documents:
        kind = document.get("kind") if isinstance(document, dict) else None
        if kind == "RayService":
            problems += rayservice_problems(document, where, crd_schema)
        elif kind == "Service":
            problems += service_problems(document, rayservices, where)
        elif kind is None and isinstance(document, dict) and "applications" in document:
            problems += serve_config_problems(document, where)
        else:
            problems.append(f"{where}: a {kind or type(document).__name__} document, not one this checks")
    return problems or ([] if documents else [f"{where}: no YAML documents"])


def file_problems(path: Path | str, crd_schema: dict | None = None, name: str | None = None) -> list[str]:
    """Problems of one file, named ``name`` (default: the path) in the messages."""
    path = Path(path)
    where = name or str(path)
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except OSError as err:
        return [f"{where}: cannot read: {err}"]
    except yaml.YAMLError as err:
        return [f"{where}: not YAML: {err}"]
    return documents_problems(documents, where, crd_schema)
