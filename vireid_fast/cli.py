"""``vireid-fast``: train, eval, make-synthetic, bench.

    vireid-fast train                                   # the demo: DCL on the synthetic set (generated once)
    vireid-fast train --config configs/dcl_sysu.yaml --data-root /data/SYSU-MM01 train.epochs=40
    vireid-fast train --config configs/dcl_sysu.yaml --resume     # continue from output_dir/checkpoint.pt
    torchrun --nproc_per_node 4 -m vireid_fast.cli train --config configs/dcl_sysu.yaml --data-root ...
    vireid-fast eval --checkpoint runs/dcl_sysu/checkpoint.pt --data-root /data/SYSU-MM01
    vireid-fast make-synthetic --out data/synthetic --size small
    vireid-fast pretrain --ari                          # synthetic identity pretraining of the demo encoder
    vireid-fast bench
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The demo config ships with the source tree (configs/ next to the package); `make demo` runs from a checkout.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dcl_synthetic.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vireid-fast", description="Unsupervised visible-infrared ReID: train, "
                                     "evaluate, generate synthetic data, benchmark.")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="train a method (no arguments: the demo on the synthetic dataset)")
    train.add_argument("--config", help="YAML config (default: the demo config, DCL on the synthetic dataset)")
    train.add_argument("--data-root", help="dataset folder (overrides data.root)")
    train.add_argument("--output-dir", help="run folder (overrides experiment.output_dir)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                       help="continue from CKPT (default: <output_dir>/checkpoint.pt)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. train.epochs=5 cluster.eps=0.5 method.temp=0.05")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test protocol")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data-root", help="dataset folder (default: the one in the checkpoint's config)")
    ev.add_argument("--trials", type=int, default=None, help="gallery samplings (SYSU) / ignored for RegDB")
    ev.add_argument("--cmfp", type=int, default=None, metavar="K",
                    help="SALCR cross-modality feature propagation over query+gallery with K neighbours")
    ev.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")

    syn = sub.add_parser("make-synthetic", help="write the synthetic visible-infrared dataset (SYSU-MM01 layout)")
    syn.add_argument("--out", help="output folder (default: the cache folder the demo uses)")
    syn.add_argument("--size", default="small", choices=("tiny", "small", "medium", "large"))
    syn.add_argument("--ids", type=int, default=0, help="identities (0 = the preset's)")
    syn.add_argument("--seed", type=int, default=0)

    pre = sub.add_parser("pretrain", help="supervised identity pretraining on a disjoint synthetic pool (the "
                         "ImageNet analogue; cached by content hash, model.pretrained=synthetic uses it)")
    pre.add_argument("--out", metavar="PATH", help="also copy the weights to PATH (.pth) and the record to PATH.json")
    pre.add_argument("--ari", action="store_true", help="then measure the first-epoch pseudo-label ARI per "
                     "modality of --target's training set started from the weights")
    pre.add_argument("--target", metavar="CONFIG", default=DEMO_CONFIG,
                     help="training config whose data and clustering --ari uses (default: the demo config)")
    pre.add_argument("--print-config", action="store_true", help="print the resolved pretraining config and exit")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="pretraining settings, e.g. epochs=20 ids=300 channel_augmentation=exchange channel_p=0.5")

    bench = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark, from a source checkout)")
    bench.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    return parser


def cmd_train(args) -> int:
    from .config import ConfigError, load_config
    from .engine import Trainer

    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume train.epochs=60`: argparse took the override for the optional CKPT argument
        args.overrides.insert(0, args.resume)
        args.resume = True
    path = args.config or DEMO_CONFIG
    if args.config is None and not os.path.isfile(DEMO_CONFIG):
        print(f"the demo config {DEMO_CONFIG} is missing: run from a source checkout or pass --config", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"experiment.output_dir={args.output_dir}")
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml())
        return 0
    start = time.perf_counter()
    trainer = Trainer(config, data_root=args.data_root, resume=args.resume,
                      progress=False if args.no_progress else None)
    trainer.fit()
    if trainer.is_main:
        print()
        print(trainer.report())
        print(f"\nmetrics: {trainer.metrics.path}\ncurves: {os.path.join(trainer.output_dir, 'curves.png')}\n"
              f"checkpoint: {os.path.join(trainer.output_dir, 'checkpoint.pt')}\n"
              f"wall time (this command): {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval(args) -> int:
    from .config import from_dict
    from .engine import Trainer, load_checkpoint

    if args.cmfp is not None and args.rerank:
        print("eval: choose one of --cmfp K and --rerank", file=sys.stderr)
        return 2
    if args.cmfp is not None and args.cmfp < 1:
        print(f"eval: --cmfp K needs K >= 1, got {args.cmfp}", file=sys.stderr)
        return 2
    state = load_checkpoint(args.checkpoint)
    raw = state["config"]
    raw["eval"]["eval_untrained"] = False
    if args.trials:
        raw["eval"]["trials"] = args.trials
    raw["experiment"]["output_dir"] = os.path.dirname(os.path.abspath(args.checkpoint))
    config = from_dict(raw)
    trainer = Trainer(config, data_root=args.data_root, resume=args.checkpoint)
    result = trainer.evaluate(rerank=args.rerank, cmfp_k=args.cmfp)
    setting = " with CMFP" if args.cmfp is not None else (" with re-ranking" if args.rerank else "")
    print(f"{args.checkpoint} (epoch {state['epoch']}){setting}: " + "  ".join(
        f"{k} {result[k]:.2f}" for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")))
    return 0


def cmd_make_synthetic(args) -> int:
    from .engine.data import ensure_synthetic, synthetic_root

    out = args.out or synthetic_root(args.size, args.ids, args.seed)
    root = ensure_synthetic(os.path.abspath(out), args.size, args.ids, args.seed)
    print(root)
    return 0


def cmd_pretrain(args) -> int:
    from .engine.pretrain import PretrainConfigError, first_epoch_ari, make_config, pretrain

    try:
        config = make_config(args.overrides)
    except PretrainConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    result = pretrain(config, out=args.out, progress=False if args.no_progress else None,
                      command=config.command(args.out))
    print(f"weights: {result.path}\nconfig hash: {result.record['config_hash']}  sha256: {result.record['sha256']}")
    if args.ari:
        from .config import ConfigError, load_config

        try:
            target = load_config(args.target, [])
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            return 2
        first_epoch_ari(target, result.path)
    return 0


def cmd_bench(args) -> int:
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "benchmarks")
    if not os.path.isdir(bench_dir):
        print(f"no benchmarks folder at {bench_dir}: run from a source checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", *args.pytest_args],
                           cwd=here)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:
        argv = ["train"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"train": cmd_train, "eval": cmd_eval, "make-synthetic": cmd_make_synthetic,
            "pretrain": cmd_pretrain, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
