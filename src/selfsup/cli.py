"""Command line: ``selfsup {pretrain,evaluate,predict,embed,export,report,compare,demo,methods}``. Thin: parses arguments, calls the API."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .config import ConfigError, merge, parse_overrides, recipe, recipes
from .configure import build_config
from .data import DATASET_NAMES, DataError

log = logging.getLogger("selfsup")


def _parser() -> argparse.ArgumentParser:
    from .evaluate import PROTOCOLS
    from .methods import METHODS

    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised visual representation learning: "
                                "pretrain a backbone on unlabeled images, evaluate it on labeled ones.")
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pt = sub.add_parser("pretrain", help="pretrain a backbone with a self-supervised method",
                        description="Pretrain a backbone. Options not listed here are set as key=value "
                        "overrides of the config, e.g. optim.lr=0.3 train.ckpt_every=200 "
                        "params.temperature=0.5 (see RUN_DIR/config.yaml for every key).")
    pt.add_argument("--method", choices=list(METHODS), help="the method (required unless --resume or --recipe)")
    pt.add_argument("--recipe", choices=recipes(), help="a method with settings chosen for a goal, over its preset "
                    "(src/selfsup/presets/recipes/NAME.yaml; fast: the best features in minutes, whitened patches "
                    "without training; fast_vicreg: the best trained network in a short --time)")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="PATH", help="image folder (recursive; sub-folders are classes), or a "
                     "cifar-10-batches-py / cifar-100-python / stl10_binary / MNIST IDX folder, or 'digits'")
    src.add_argument("--dataset", metavar="NAME", choices=DATASET_NAMES,
                     help=f"a named dataset, downloaded if missing: {', '.join(DATASET_NAMES)}")
    pt.add_argument("--split", help="split to pretrain on (default train; e.g. unlabeled, train+unlabeled)")
    pt.add_argument("--epochs", type=int)
    pt.add_argument("--time", metavar="DURATION", help="time budget for the whole run, e.g. 90s, 20m, 2h: the run "
                    "measures its throughput, fixes its length to end within it (replaces --epochs) and prints the plan")
    pt.add_argument("--batch-size", type=int)
    pt.add_argument("--image-size", type=int, help="side of the (square) training images; default: from the "
                    "images (tiny ones at their own size, photos at 96 px on a CPU and 224 on a GPU; the "
                    "choice is logged)")
    pt.add_argument("--backbone", help="resnet18 | resnet50 | convnet | airbench | vit_tiny | vit_small | "
                    "torchvision:NAME | timm:NAME (needs timm)")
    pt.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    pt.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<method>-<time>)")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pt.add_argument("--no-progress", action="store_true", help="no progress bars (plain progress lines, every "
                    "train.log_seconds, are written whenever no bar is shown)")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    ev = sub.add_parser("evaluate", help="evaluate a pretrained (or random) backbone on labeled data")
    ev.add_argument("run", metavar="RUN_DIR", help="a run directory, random:BACKBONE for the untrained baseline, or "
                    "pretrained:torchvision:NAME / pretrained:timm:NAME (off-the-shelf weights from the local cache)")
    ev.add_argument("--protocol", required=True, choices=PROTOCOLS)
    ev.add_argument("--train", required=True, metavar="PATH", help="labeled training data: its train/ split, or the "
                    "whole folder when it has no split sub-folders")
    ev.add_argument("--test", metavar="PATH", help="labeled test data: its test/ split, else val/ (or valid/, "
                    "validation/), or the whole folder when it has no split sub-folders")
    ev.add_argument("--test-split", metavar="NAME", help="the split of --test to test on (default: test, else val)")
    ev.add_argument("--test-fraction", type=float, metavar="F", help="no --test: hold out this fraction of each "
                    "class of --train's images as the test set (stratified, seeded by --seed)")
    ev.add_argument("--out", metavar="DIR", help="where <protocol>.json goes (default RUN_DIR/eval; "
                    "<protocol>_<fraction>.json for finetune/pseudolabel/fixmatch)")
    ev.add_argument("--labels-per-class", type=int, help="train on this many labels per class (fixed seed)")
    ev.add_argument("--image-size", type=int, help="for random:BACKBONE: input size (default 32)")
    ev.add_argument("--k", type=int, default=200, help="kNN: neighbours (default 200)")
    ev.add_argument("--temperature", type=float, default=0.1, help="kNN: vote temperature (default 0.1)")
    ev.add_argument("--fraction", type=float, help="finetune/pseudolabel/fixmatch: fraction of the training "
                    "labels, class-balanced, fixed seed, e.g. 0.01, 0.1, 1.0 (default 1.0)")
    ev.add_argument("--epochs", type=int, help="finetune/pseudolabel/fixmatch: passes over the labeled (finetune) "
                    "or unlabeled images (default 30, but 500 to 10,000 steps)")
    ev.add_argument("--steps", type=int, help="finetune/pseudolabel/fixmatch: optimizer steps (overrides --epochs)")
    ev.add_argument("--batch-size", type=int, help="finetune/pseudolabel/fixmatch: labeled batch (default 64)")
    ev.add_argument("--lr", type=float, help="finetune/pseudolabel/fixmatch: the head's SGD lr (default 0.03; "
                    "a pretrained backbone gets 0.1x)")
    ev.add_argument("--mu", type=int, help="pseudolabel/fixmatch: unlabeled images per labeled one in a batch "
                    "(default 7)")
    ev.add_argument("--threshold", type=float, help="fixmatch: confidence threshold of pseudo-labels (default 0.95)")
    ev.add_argument("--finetune", action="store_true", help="segment: train the backbone with the head "
                    "(default: frozen backbone, linear head per pixel)")
    ev.add_argument("--ignore-index", type=int, help="segment: the mask id left out of the loss and the scores "
                    "(default: classes.txt's 'unlabelled', else 255; CamVid: 11)")
    ev.add_argument("--no-precise-bn", action="store_true", help="frozen protocols: keep the checkpoint's BatchNorm "
                    "statistics (default: re-estimate them on the training images' evaluation views, no labels)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0, help="seeds random:BACKBONE's initialisation, the images of "
                    "precise BN, label subsets and held-out splits, and the probes' training (default 0)")
    ev.add_argument("--no-progress", action="store_true")

    de = sub.add_parser("demo", help="offline tour: pretrain rotation and SimCLR briefly, evaluate, print a table")
    de.add_argument("--data", metavar="PATH", help="a labeled folder with train/ and test/ (default: embedded digits)")
    de.add_argument("--out", default="runs/demo", metavar="DIR", help="where the runs go (default runs/demo)")
    de.add_argument("--epochs", type=int, help="pretraining epochs for each method (default: rotation 8, simclr 15)")
    de.add_argument("--device", default="auto")
    de.add_argument("--no-progress", action="store_true")

    em = sub.add_parser("embed", help="write the embeddings of a folder of images (npy + file list)")
    em.add_argument("run", metavar="RUN_DIR", help="a run directory (or checkpoint)")
    em.add_argument("--data", required=True, metavar="PATH", help="images to embed (folder or dataset)")
    em.add_argument("--out", required=True, metavar="FILE", help="FILE.npy; FILE.files.txt lists the images "
                    "row by row (and FILE.labels.npy holds labels when the folder has class sub-folders)")
    em.add_argument("--split", default="train", help="which split of PATH (default train; a plain folder is "
                    "taken whole)")
    em.add_argument("--device", default="auto")
    em.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("predict", help="classify a folder of images with a classifier that evaluate kept "
                        "(linear, finetune, ...): a CSV of file, class, confidence, top-k")
    pr.add_argument("run", metavar="RUN_DIR", help="a run directory (its eval/ folder), an evaluation --out folder, "
                    "or a .classifier.safetensors file")
    pr.add_argument("--data", required=True, metavar="PATH", help="images to classify (folder or dataset)")
    pr.add_argument("--classifier", metavar="NAME", help="which kept classifier, e.g. linear or finetune_0.1 "
                    "(default: the only one, else linear)")
    pr.add_argument("--out", metavar="FILE", help="the CSV (default RUN_DIR/predictions.csv)")
    pr.add_argument("--split", default="train", help="which split of PATH (default train; a plain folder is "
                    "taken whole)")
    pr.add_argument("--top-k", type=int, default=5, help="classes listed per image with their probabilities (5)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--no-progress", action="store_true")

    ex = sub.add_parser("export", help="write the trained backbone alone (safetensors or torchvision)")
    ex.add_argument("run", metavar="RUN_DIR", help="a run directory (or checkpoint)")
    ex.add_argument("--format", default="safetensors", choices=["safetensors", "torchvision"],
                    help="safetensors: selfsup layout + metadata; torchvision: a resnet state dict + json")
    ex.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/export)")

    rp = sub.add_parser("report", help="write RUN_DIR/report.html: curves, views, filters, t-SNE, neighbours, "
                        "the method's pictures, evaluations")
    rp.add_argument("run", metavar="RUN_DIR")
    rp.add_argument("--data", metavar="PATH", help="labeled data for the embedding pictures (test split = queries, "
                    "train split = gallery); default: the run's training data")
    rp.add_argument("--out", metavar="FILE", help="default RUN_DIR/report.html")
    rp.add_argument("--device", default="auto")

    cp = sub.add_parser("compare", help="one table (markdown, CSV, HTML) and pictures side by side across runs")
    cp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or evaluation-only directories, "
                    "e.g. the --out of `selfsup evaluate random:BACKBONE`)")
    cp.add_argument("--protocols", nargs="+", help="columns to keep (e.g. knn linear finetune); default all found")
    cp.add_argument("--out", default="runs/compare", metavar="DIR", help="where compare.{md,csv,html} go")
    cp.add_argument("--data", metavar="PATH", help="labeled data for the embedding pictures (as for report)")
    cp.add_argument("--no-pictures", action="store_true", help="tables only")
    cp.add_argument("--device", default="auto")

    sub.add_parser("methods", help="list the methods, one line each")
    return p


def _pretrain(args) -> int:
    from .configure import resume_config
    from .train import pretrain

    cli = {"train": {}, "data": {}, "model": {}}
    for key, section, name in (("epochs", "train", "epochs"), ("batch_size", "train", "batch_size"),
                               ("device", "train", "device"), ("image_size", "data", "image_size"),
                               ("split", "data", "split"), ("backbone", "model", "backbone"),
                               ("time", "train", "time_budget")):
        if getattr(args, key) is not None:
            cli[section][name] = getattr(args, key)
    if args.data is not None:
        cli["data"]["path"] = args.data
    if args.dataset is not None:
        cli["data"].update(path=args.dataset, download=True)
    overrides = parse_overrides(args.overrides)
    for section, values in cli.items():
        overrides.setdefault(section, {}).update(values)
    overrides = {k: v for k, v in overrides.items() if v != {}}

    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        cfg = resume_config(args.out, overrides)
        if args.method and args.method != cfg.method:
            raise ConfigError(f"{args.out} is a {cfg.method} run, not {args.method}")
        out = args.out
    else:
        method = args.method
        if args.recipe:
            method, base = recipe(args.recipe)
            if args.method and args.method != method:
                raise ConfigError(f"recipe {args.recipe} is a {method} recipe; drop --method {args.method}")
            overrides = merge(base, overrides)
        if not method:
            raise ConfigError("--method (or --recipe) is required (see `selfsup methods`)")
        cfg = build_config(method, overrides)
        if not cfg.data.path:
            raise ConfigError("no training data: pass --data PATH or --dataset NAME")
        from .distributed import launched_with_torchrun

        if launched_with_torchrun() and not args.out:
            raise ConfigError("under torchrun, pass --out RUN_DIR (every process must agree on the run directory)")
        out = args.out or f"runs/{args.recipe or method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = pretrain(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(f"done: {run_dir} (checkpoint {Path(run_dir) / 'checkpoints' / 'last.pt'})")
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate, result_name
    from .run import eval_dir

    r = evaluate(args.run, args.protocol, args.train, args.test, out=args.out,
                 labels_per_class=args.labels_per_class, image_size=args.image_size, k=args.k,
                 temperature=args.temperature, device=args.device, seed=args.seed, progress=not args.no_progress,
                 fraction=args.fraction, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mu=args.mu,
                 threshold=args.threshold, steps=args.steps, precise_bn_stats=not args.no_precise_bn,
                 test_split=args.test_split, test_fraction=args.test_fraction, finetune=args.finetune,
                 ignore_index=args.ignore_index)
    dest = Path(args.out) if args.out else eval_dir(args.run)
    if args.protocol == "segment":
        name = "segment_finetune.json" if args.finetune else "segment.json"
        print(f"segment mIoU: {r['miou']:.4f}, pixel accuracy {r['pixel_acc']:.4f}  ({r['n_train']} train / "
              f"{r['n_test']} test frames, {r['num_classes']} classes; written to {dest / name})")
        return 0
    n_train = f"{r['n_labeled']} labeled" if "n_labeled" in r else str(r["n_train"])
    print(f"{args.protocol} top-1: {r['top1']:.4f}  ({n_train} train / {r['n_test']} test images; "
          f"written to {dest / result_name(args.protocol, args.fraction)})")
    return 0


def _embed(args) -> int:
    from .evaluate.features import write_embeddings

    r = write_embeddings(args.run, args.data, args.out, split=args.split, device=args.device,
                         progress=not args.no_progress)
    print(f"wrote {r['n']} x {r['dim']} embeddings to {r['features']} (files: {r['files']})")
    return 0


def _predict(args) -> int:
    from .evaluate.classifier import find_classifier, predict_folder

    path = find_classifier(args.run, args.classifier)
    where = Path(args.run)
    out = args.out or ((where if where.is_dir() else where.parent) / "predictions.csv")
    r = predict_folder(path, args.data, out, split=args.split, device=args.device, top_k=args.top_k,
                       progress=not args.no_progress)
    acc = f"; top-1 {r['top1']:.4f} against the folder's labels" if "top1" in r else ""
    print(f"predicted {r['n']} images with {path} ({r['classes']} classes){acc}; written to {r['csv']}")
    return 0


def _export(args) -> int:
    from .export import export

    path = export(args.run, args.format, args.out)
    print(f"wrote {path}; load it with selfsup.load_backbone('{path}')")
    return 0


def _report(args) -> int:
    from .report import write_report

    path = write_report(args.run, data=args.data, out=args.out, device=args.device)
    print(f"wrote {path}")
    return 0


def _compare(args) -> int:
    from .report import compare

    paths = compare(args.runs, args.out, protocols=args.protocols, data=args.data, pictures=not args.no_pictures,
                    device=args.device)
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['html']}")
    return 0


def _methods(args) -> int:
    from .methods import METHODS

    width = max(len(n) for n in METHODS)
    fam = max(len(m.family) for m in METHODS.values()) + 2
    for name, m in METHODS.items():
        print(f"{name:<{width}}  {'[' + m.family + ']':<{fam}}  {m.summary}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(data=args.data, out=args.out, epochs=args.epochs, device=args.device, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .train import NonFiniteLoss, TrainingInterrupted

    logging.basicConfig(format="selfsup: %(message)s", level=logging.INFO)
    args = _parser().parse_args(argv)
    handlers = {"pretrain": _pretrain, "evaluate": _evaluate, "demo": _demo, "methods": _methods,
                "embed": _embed, "predict": _predict, "export": _export, "report": _report, "compare": _compare}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError) as e:
        print(f"selfsup {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"selfsup {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"selfsup {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
