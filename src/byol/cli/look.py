"""`byol neighbors` and `byol map`: look at what an encoder learned, on a folder of images.

    byol neighbors runs/demo images/ --out neighbors.png   # queries + top-k cosine neighbours (+ .json)
    byol map runs/demo images/ --out map.png               # PCA of the representations (+ .json)
"""
from __future__ import annotations

import argparse

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "neighbors": "example:\n  byol neighbors runs/demo /data/images --out neighbors.png   # + neighbors.json\n"
                 "  byol neighbors encoder.safetensors /data/images --queries a.jpg b.jpg --k 5 --out nn.png",
    "map": "example:\n  byol map runs/demo /data/images --out map.png                # + map.json\n"
           "  byol map encoder.safetensors /data/images --thumbnails --out map.png",
}


def _common(p) -> None:
    p.add_argument("encoder", metavar="ENCODER|RUN_DIR", help="exported .safetensors / .pkl, or a run dir / checkpoint")
    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively; class subfolders "
                                                    "give labels)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--no-progress", action="store_true")


def _tail(out: dict) -> None:
    print(f"picture: {out['out']}\njson: {out['json']}")
    if out["skipped"]:
        print(f"skipped {len(out['skipped'])} unreadable files, e.g. {out['skipped'][0][0]}: {out['skipped'][0][1]}")


def cmd_neighbors(args) -> int:
    from byol.eval.pictures import neighbors_picture

    out = neighbors_picture(args.encoder, args.folder, args.out, queries=args.queries, n_queries=args.n_queries,
                            k=args.k, seed=args.seed, batch_size=args.batch_size, device=args.device,
                            workers=args.workers, cache=not args.no_cache, progress=not args.no_progress)
    cached = " (features from the cache)" if out["hit"] else ""
    print(f"{len(out['queries'])} queries x {out['k']} neighbours among {out['n']} images{cached}")
    _tail(out)
    return 0


def cmd_map(args) -> int:
    from byol.eval.pictures import map_picture

    out = map_picture(args.encoder, args.folder, args.out, thumbnails=args.thumbnails, seed=args.seed,
                      batch_size=args.batch_size, device=args.device, workers=args.workers,
                      cache=not args.no_cache, progress=not args.no_progress)
    cached = " (features from the cache)" if out["hit"] else ""
    classes = f", {len(out['classes'])} classes" if out["classes"] else ""
    print(f"map of {out['n']} images ({out['method']}{classes}){cached}")
    _tail(out)
    return 0


def add_look_parsers(sub) -> None:
    n = sub.add_parser("neighbors", help="query images and their nearest neighbours in a folder -> .png",
                       epilog=EXAMPLES["neighbors"], formatter_class=FMT,
                       description="A grid: one row per query image, then its k nearest images in FOLDER by "
                                   "cosine similarity of the representations y (printed under each; green / "
                                   "red: same / other class when FOLDER has class subfolders). A query is "
                                   "never its own neighbour. FILE.json beside --out lists queries, neighbours "
                                   "and similarities. Features are cached like byol eval's.")
    _common(n)
    n.add_argument("--out", required=True, metavar="FILE.png")
    n.add_argument("--queries", nargs="+", metavar="FILE", default=None,
                   help="query images (inside FOLDER or not); default: --n-queries drawn with --seed")
    n.add_argument("--n-queries", type=int, default=8)
    n.add_argument("--k", type=int, default=8, help="neighbours per query (default 8)")
    n.add_argument("--seed", type=int, default=0, help="which random queries (default 0)")
    n.set_defaults(func=cmd_neighbors)

    m = sub.add_parser("map", help="2-D map (PCA) of a folder's representations -> .png",
                       epilog=EXAMPLES["map"], formatter_class=FMT,
                       description="Every image of FOLDER as a point at the first two principal components "
                                   "of its L2-normalised representation y, coloured by class when FOLDER has "
                                   "class subfolders. PCA only (numpy; no extra dependency). FILE.json beside "
                                   "--out holds the 2-D point of every file.")
    _common(m)
    m.add_argument("--out", required=True, metavar="FILE.png")
    m.add_argument("--thumbnails", action="store_true",
                   help="draw small images (up to 250, drawn with --seed) instead of only points")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_map)
