"""`byol export`, `byol import-official` and `byol embed`: an encoder outside training.

    byol export RUN_DIR --out encoder.safetensors          # the online encoder + encoder.json
    byol export RUN_DIR --format onnx --out encoder.onnx   # or torchvision / timm: a plain state dict
    byol import-official pretrain_res50x1.pkl --out res50x1.safetensors   # DeepMind's released weights
    byol embed encoder.safetensors IMAGES --out emb.npy    # features of a folder (+ emb.files.txt)
"""
from __future__ import annotations

import argparse

FMT = argparse.RawDescriptionHelpFormatter

EXAMPLES = {
    "export": "example:\n  byol export runs/demo --out encoder.safetensors   # + encoder.json\n"
              "  python -c \"import byol; f = byol.load_encoder('encoder.safetensors')\"\n"
              "  byol export runs/demo --format torchvision --out resnet50.pth # torchvision.models.resnet50()\n"
              "  byol export runs/vit --format timm --out vit.safetensors    # timm.create_model(NAME, num_classes=0)\n"
              "  byol export runs/demo --format onnx --out encoder.onnx      # images [N,3,S,S] -> features [N,D]",
    "import-official": "example:\n  byol import-official pretrain_res50x1.pkl --out res50x1.safetensors\n"
                       "  byol eval knn res50x1.safetensors --train /data/train --test /data/test\n"
                       "  byol embed res50x1.safetensors /data/images --out emb.npy",
    "embed": "example:\n  byol embed encoder.safetensors /data/images --out emb.npy  # + emb.files.txt\n"
             "  byol embed runs/demo /data/images --out emb.npy",
}


def _report(verb: str, out: dict) -> None:
    """Two lines for an encoder written by ``byol export`` or ``byol import-official``."""
    padding = f", padding={out['padding']}" if out.get("padding", "symmetric") != "symmetric" else ""
    width = f" x{out['width']:g}" if "/" not in out["backbone"] else ""
    fmt = f" as {out['export_format']}" if out.get("export_format", "byol") != "byol" else ""
    print(f"{verb} the {out['which']} encoder ({out['backbone']}{width}, D={out['feature_dim']}"
          f"{padding}, step {out['step']}) of {out['source_checkpoint']}{fmt}")
    print(f"encoder: {out['out']}\narchitecture: {out['sidecar']}")


def cmd_export(args) -> int:
    from byol.export import export_encoder

    _report("exported", export_encoder(args.run, args.out, which=args.which, force=args.force,
                                       format=args.format))
    return 0


def cmd_import_official(args) -> int:
    from byol.export import import_official

    _report("imported", import_official(args.checkpoint, args.out, which=args.which, force=args.force))
    return 0


def cmd_embed(args) -> int:
    from byol.embed import embed_folder

    out = embed_folder(args.encoder, args.images, args.out, batch_size=args.batch_size,
                       device=args.device, workers=args.workers, progress=not args.no_progress,
                       resume=not args.no_resume)
    print(f"embedded {out['n']} images: [{out['n']}, {out['dim']}] float32")
    print(f"features: {out['out']}\nfiles: {out['files']}")
    if out["labels"]:
        print(f"labels: {out['labels']}")
    if out["skipped"]:
        print(f"skipped {len(out['skipped'])} unreadable files, e.g. {out['skipped'][0][0]}: "
              f"{out['skipped'][0][1]}")
    return 0


def _which_and_force(parser, which_help: str) -> None:
    """The options every command writing an encoder file shares."""
    parser.add_argument("--which", choices=("online", "target"), default="online", help=which_help)
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def add_encoder_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a run's encoder as safetensors + json",
                       epilog=EXAMPLES["export"], formatter_class=FMT,
                       description="The online encoder f only (no heads, no target), as safetensors "
                                   "(loading never runs code) with its architecture in FILE.json; "
                                   "load it with byol.load_encoder(FILE).")
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--format", choices=("byol", "torchvision", "timm", "onnx"), default="byol",
                   help="byol (default: safetensors + json for byol.load_encoder); torchvision / timm: "
                        "a state dict (.pth, or .safetensors) for torchvision.models.NAME() (strict=False: "
                        "only the classifier missing) / timm.create_model(NAME, num_classes=0); onnx: "
                        "images [batch, 3, S, S] -> features [batch, D], dynamic batch (byol[onnx])")
    _which_and_force(p, "online encoder f_theta (default) or the EMA target f_xi")
    p.set_defaults(func=cmd_export)

    o = sub.add_parser("import-official", help="DeepMind's released BYOL checkpoint (.pkl) -> an encoder export",
                       epilog=EXAMPLES["import-official"], formatter_class=FMT,
                       description="Convert a checkpoint of DeepMind's BYOL release (pretrain_res50x1.pkl, "
                                   "pretrain_res200x2.pkl) into the format of `byol export`: its encoder as "
                                   "our ResNet with TensorFlow \"SAME\" padding (the release's numerics), "
                                   "for byol.load_encoder, byol embed and byol eval. The pickle is read by a "
                                   "restricted unpickler: arrays and records only; anything else is refused "
                                   "without running it.")
    o.add_argument("checkpoint", metavar="FILE.pkl")
    o.add_argument("--out", required=True, metavar="FILE.safetensors")
    _which_and_force(o, "online encoder f_theta (default; what the release evaluates) or the EMA target f_xi")
    o.set_defaults(func=cmd_import_official)

    e = sub.add_parser("embed", help="features of every image in a folder -> .npy",
                       epilog=EXAMPLES["embed"], formatter_class=FMT,
                       description="Representations y of every image under IMAGES (recursive), in "
                                   "batches, as float32 [N, D]; FILE.files.txt lists the images in row order. "
                                   "Rows are written as they come (FILE.npy.partial + FILE.npy.progress.json); "
                                   "a stopped run, called again, resumes where it stopped.")
    e.add_argument("encoder", metavar="ENCODER", help="exported .safetensors, or a run dir / checkpoint")
    e.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively)")
    e.add_argument("--out", required=True, metavar="FILE.npy")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--no-resume", action="store_true",
                   help="start over even if FILE.npy.partial holds a stopped run of the same command")
    e.set_defaults(func=cmd_embed)
