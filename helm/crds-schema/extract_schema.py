"""Write the openAPIV3Schema of one version of a CustomResourceDefinition as a JSON file, for validating
rendered objects offline (tests/deploy/test_chart.py).

    python helm/crds-schema/extract_schema.py CRD.yaml v1 OUT.json --source "KubeRay v1.7.0, ..."

Descriptions are dropped (the files stay small; the schema is the same). The `$comment` records where the
CRD came from: update it with the file.
"""
from __future__ import annotations

import argparse
import json

import yaml


def strip_descriptions(node):
    """Drop `description` strings of schema nodes (a property that is *named* description stays)."""
    if isinstance(node, list):
        return [strip_descriptions(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "description" and isinstance(v, str):
            continue
        if k in ("properties", "patternProperties", "definitions") and isinstance(v, dict):
            out[k] = {name: strip_descriptions(sub) for name, sub in v.items()}
        else:
            out[k] = strip_descriptions(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("crd")
    ap.add_argument("version", help="the CRD version whose schema to take, e.g. v1")
    ap.add_argument("out")
    ap.add_argument("--source", required=True, help="where the CRD came from (project, release, path)")
    args = ap.parse_args()
    with open(args.crd) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == args.version)
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    doc = {"$comment": f"openAPIV3Schema of {crd['metadata']['name']} {args.version} from {args.source}; "
                       f"regenerate with helm/crds-schema/extract_schema.py",
           "x-kubernetes-group-version-kind": {"group": crd["spec"]["group"], "version": args.version,
                                               "kind": crd["spec"]["names"]["kind"]},
           **schema}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


if __name__ == "__main__":
    main()
