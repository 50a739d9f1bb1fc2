"""``sedac k8s render`` and ``sedac k8s validate`` (wired into ``sedac_ray.cli``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

CRD_ENV = "SEDAC_KUBERAY_CRD"


def cmd_render(args) -> int:
    from sedac_ray.deploy.render import TARGETS, render, stale_outputs

    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown render targets {unknown}; known: {sorted(TARGETS)}")
    targets = [TARGETS[name] for name in args.targets or TARGETS]
    root = Path(args.root)
    if args.image and not args.stdout:
        raise ValueError("--image goes with --stdout: the committed k8s/ files keep the default image")
    if args.check:
        stale = stale_outputs(root, targets)
        for line in stale:
            print(line, file=sys.stderr)
        return 1 if stale else 0
    for target in targets:
        text = render(target, root, image=args.image)
        if args.stdout:
            sys.stdout.write(text)
        else:
            (root / target.output).write_text(text)
            print(f"wrote {target.output} (from {target.sources()})", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from sedac_ray.deploy.validate import file_problems, load_crd_schema

    crd_path = args.crd or os.environ.get(CRD_ENV)
    if crd_path and not Path(crd_path).is_file():
        raise FileNotFoundError(f"RayService CRD {crd_path} does not exist")
    if crd_path and importlib.util.find_spec("jsonschema") is None:
        raise ValueError(
            "checking against the CRD needs jsonschema: pip install jsonschema (or the [test] extra)"
        )
    schema = load_crd_schema(crd_path) if crd_path else None
    if schema is None:
        print(
            "note: RayService manifests are not checked against the KubeRay CRD (pass --crd FILE or set "
            f"{CRD_ENV}; `kubectl get crd rayservices.ray.io -o yaml` writes the one your cluster runs)",
            file=sys.stderr,
        )
    failed = 0
    for path in args.files:
        problems = file_problems(path, schema)
        failed += bool(problems)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"ok: {path}")
    return 1 if failed else 0


def add_k8s_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``k8s render`` and ``k8s validate`` under the top-level ``commands``."""
    k8s = commands.add_parser("k8s", help="Kubernetes: render and validate the KubeRay manifests")
    actions = k8s.add_subparsers(dest="k8s_command", required=True)

    render = actions.add_parser(
        "render", help="write k8s/rayservice-*.yaml from deployments/*.yaml and k8s/templates/*.yaml"
    )
    render.add_argument("targets", nargs="*", help="cpu, gpu (default: all)")
    render.add_argument("--root", default=".", help="the repository root (default: .)")
    render.add_argument("--stdout", action="store_true", help="print the manifests instead of writing them")
    render.add_argument("--image", help="container image for every Ray pod (with --stdout)")
    render.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 where a committed manifest is stale"
    )
    render.set_defaults(func=cmd_render)

    validate = actions.add_parser(
        "validate", help="check RayService manifests and Serve configs offline; exit 1 on problems"
    )
    validate.add_argument("files", nargs="+", help="k8s/*.yaml manifests or deployments/*.yaml Serve configs")
    validate.add_argument("--crd", help=f"the KubeRay RayService CRD YAML (default: ${CRD_ENV})")
    validate.set_defaults(func=cmd_validate)
