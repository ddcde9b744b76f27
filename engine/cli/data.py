"""``lance backbones`` and ``lance datasets``: what exists, what is available here, how to get the rest."""
from __future__ import annotations

import argparse
import json
import sys

from engine.data import available_datasets, data_roots, dataset_status, download
from engine.models import SPECS, weight_files, weights_available
from engine.models.weights import weights_dir as resolve


def register(subparsers) -> None:
    p = subparsers.add_parser("backbones", help="list backbones, whether their weights are here, how to get them",
                              description="List every backbone: resolution, normalisation, parameters, and whether "
                                          "its ImageNet weights are available here (local folder or torch cache).")
    p.add_argument("--weights-dir", default=None, help="local weights folder (default: $LANCE_WEIGHTS_DIR or "
                                                       "$LANCE_HOME/weights)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_backbones)

    d = subparsers.add_parser("datasets", help="list datasets, whether they are here, how to get them",
                              description="List every dataset and whether it is present in the data roots; "
                                          "--download NAME fetches one with torchvision (needs a network).")
    d.add_argument("--data-root", default=None, help="dataset folder(s), os.pathsep-separated (default: "
                                                     "$LANCE_DATA_ROOT or $LANCE_HOME/datasets)")
    d.add_argument("--download", metavar="NAME", default=None, help="download NAME into the first data root")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=run_datasets)


def backbone_rows(weights_dir=None) -> list[dict]:
    folder = resolve(weights_dir)
    rows = []
    for name, spec in SPECS.items():
        row = {"name": name, "family": spec.family, "description": spec.description, "resolution": spec.resolution,
               "mean": list(spec.mean), "std": list(spec.std), "linear_input": spec.linear_input,
               "num_params": spec.num_params, "macs": spec.macs, "pretrained": spec.pretrained,
               "weights_dir": str(folder), "sha256": spec.weights.sha256 if spec.weights else None}
        if spec.pretrained:
            path = weights_available(name, weights_dir)
            row["imagenet_weights"] = str(path) if path else None
            row["available"] = path is not None
            files, url = weight_files(name)
            row["weight_files"], row["url"] = files, url
            row["how_to_get"] = (None if path else
                                 f"put {files[0]} ({url}) in {folder}/{name}/ (online: it downloads on first "
                                 f"use), or run with --weights none / --weights PATH")
        else:
            row.update(imagenet_weights=None, available=True, how_to_get=None)
        rows.append(row)
    return rows


def run_backbones(args: argparse.Namespace) -> int:
    rows = backbone_rows(args.weights_dir)
    if args.json:
        json.dump({"backbones": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'backbone':18} {'res':>4} {'params':>7}  {'weights':10} {'linear in':9}  description")
    for r in rows:
        state = ("here" if r["available"] else "MISSING") if r["pretrained"] else "random"
        print(f"{r['name']:18} {r['resolution']:>4} {r['num_params'] / 1e6:>6.2f}M  {state:10} {r['linear_input']:9}"
              f"  {r['description']}")
        if r["imagenet_weights"]:
            print(f"{'':44}weights: {r['imagenet_weights']}")
        if r["how_to_get"]:
            print(f"{'':44}how: {r['how_to_get']}")
    print("\n--weights imagenet|none|PATH; LANCE_WEIGHTS_DIR=DIR for a local weights folder.")
    return 0


def run_datasets(args: argparse.Namespace) -> int:
    if args.download:
        try:
            path = download(args.download, args.data_root)
        except Exception as error:  # network errors come in many types; report and fail
            print(f"download of {args.download} failed: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        print(f"{args.download}: ready at {path}")
        return 0
    rows = [dataset_status(name, args.data_root) for name in available_datasets()]
    roots = [str(p) for p in data_roots(args.data_root)]
    if args.json:
        json.dump({"data_roots": roots, "datasets": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"data roots: {', '.join(roots)}")
    print(f"{'dataset':14} {'classes':>7}  {'status':8} description")
    for r in rows:
        status = "here" if r["available"] else "MISSING"
        print(f"{r['name']:14} {r['classes'] or '?':>7}  {status:8} {r['description']}")
        if r["available"]:
            print(f"{'':32}at: {r['path']}")
        else:
            print(f"{'':32}how: {r['how_to_get']}")
    print("\nAlso: imagefolder:PATH for any PATH/{train,test}/<class>/<image> (or PATH/<class>/<image>) folder.")
    return 0
