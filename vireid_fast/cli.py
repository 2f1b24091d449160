"""``vireid-fast``: train, eval, make-synthetic, bench.

    vireid-fast train                                   # the demo: DCL on the synthetic set (generated once)
    vireid-fast train --config configs/dcl_sysu.yaml --data-root /data/SYSU-MM01 train.epochs=40
    vireid-fast train --config configs/dcl_sysu.yaml --resume     # continue from output_dir/checkpoint.pt
    torchrun --nproc_per_node 4 -m vireid_fast.cli train --config configs/dcl_sysu.yaml --data-root ...
    vireid-fast eval --checkpoint runs/dcl_sysu/checkpoint.pt --data-root /data/SYSU-MM01
    vireid-fast compare --methods dcl,supervised --seeds 0,1 --jobs 2    # the comparison table (results.md)
    vireid-fast make-synthetic --out data/synthetic --size small
    vireid-fast pretrain --ari                          # synthetic identity pretraining of the demo encoder
    vireid-fast bench

A user error (invalid config or argument, dataset problem, unreadable image, missing or corrupt checkpoint, device,
output folder, file system) prints one line ``error: ...`` on stderr and exits with status 2; ``--debug`` (or the
environment variable ``VIREID_DEBUG=1``) prints the traceback first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

# The demo config ships with the source tree (configs/ next to the package); `make demo` runs from a checkout.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dcl_synthetic.yaml")


class UsageError(Exception):
    """A command-line argument is invalid; the message names it, the value and the fix."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix (shown as one line); anything else is a bug and keeps its traceback."""
    from .config import ConfigError
    from .data import BadImageError, DatasetError
    from .engine.checkpoint import CheckpointError

    return UsageError, ConfigError, DatasetError, CheckpointError, BadImageError, OSError


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (multi-line messages, e.g. a DatasetError's problem list, joined)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    rest = [line[2:] if line.startswith("- ") else line for line in lines[1:]]
    return " ".join([lines[0], "; ".join(rest)]) if rest else lines[0]


def run_command(command, args, debug: bool = False) -> int:
    """Run ``command(args)``; a user error becomes one line ``error: ...`` on stderr and exit status 2."""
    try:
        return command(args)
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other user error (subparsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vireid-fast", description="Unsupervised visible-infrared ReID: train, "
                                     "evaluate, generate synthetic data, benchmark.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (also: VIREID_DEBUG=1)")
    # Also accepted after the command; SUPPRESS keeps a subcommand's default from overwriting the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors (also: VIREID_DEBUG=1)")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", parents=[common],
                           help="train a method (no arguments: the demo on the synthetic dataset)")
    train.add_argument("--config", help="YAML config (default: the demo config, DCL on the synthetic dataset)")
    train.add_argument("--data-root", help="dataset folder (overrides data.root)")
    train.add_argument("--output-dir", help="run folder (overrides experiment.output_dir)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                       help="continue from CKPT (default: <output_dir>/checkpoint.pt)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. train.epochs=5 cluster.eps=0.5 method.temp=0.05")

    ev = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint on its dataset's test protocol")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data-root", help="dataset folder (default: the one in the checkpoint's config)")
    ev.add_argument("--trials", type=int, default=None, help="gallery samplings (SYSU) / ignored for RegDB")
    ev.add_argument("--cmfp", type=int, default=None, metavar="K",
                    help="SALCR cross-modality feature propagation over query+gallery with K neighbours")
    ev.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")

    cmp = sub.add_parser("compare", parents=[common], help="train several methods on the same data, seeds and "
                         "budget; write results.md/json/png")
    cmp.add_argument("--methods", default="dcl,supervised", help="comma-separated registered methods")
    cmp.add_argument("--seeds", default="0,1", help="comma-separated experiment seeds (mean ± std over them)")
    cmp.add_argument("--config", help="base config for data, model, schedule (default: the demo config)")
    cmp.add_argument("--data-root", help="dataset folder (overrides data.root)")
    cmp.add_argument("--output-dir", default="runs/compare", help="folder for the runs and the results")
    cmp.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (one process each)")
    cmp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")

    syn = sub.add_parser("make-synthetic", parents=[common],
                         help="write the synthetic visible-infrared dataset (SYSU-MM01 layout)")
    syn.add_argument("--out", help="output folder (default: the cache folder the demo uses)")
    syn.add_argument("--size", default="small", choices=("tiny", "small", "medium", "large"))
    syn.add_argument("--ids", type=int, default=0, help="identities (0 = the preset's)")
    syn.add_argument("--seed", type=int, default=0)

    pre = sub.add_parser("pretrain", parents=[common],
                         help="supervised identity pretraining on a disjoint synthetic pool (the ImageNet analogue; "
                              "cached by content hash, model.pretrained=synthetic uses it)")
    pre.add_argument("--out", metavar="PATH", help="also copy the weights to PATH (.pth) and the record to PATH.json")
    pre.add_argument("--ari", action="store_true", help="then measure the first-epoch pseudo-label ARI per "
                     "modality of --target's training set started from the weights")
    pre.add_argument("--target", metavar="CONFIG", default=DEMO_CONFIG,
                     help="training config whose data and clustering --ari uses (default: the demo config)")
    pre.add_argument("--print-config", action="store_true", help="print the resolved pretraining config and exit")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="pretraining settings, e.g. epochs=20 ids=300 channel_augmentation=exchange channel_p=0.5")

    bench = sub.add_parser("bench", parents=[common],
                           help="run the benchmark suite (pytest-benchmark, from a source checkout)")
    bench.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    return parser


def cmd_train(args) -> int:
    from .config import load_config
    from .engine import Trainer

    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume train.epochs=60`: argparse took the override for the optional CKPT argument
        args.overrides.insert(0, args.resume)
        args.resume = True
    path = args.config or DEMO_CONFIG
    if args.config is None and not os.path.isfile(DEMO_CONFIG):
        raise UsageError(f"the demo config {DEMO_CONFIG} is missing: run from a source checkout or pass --config")
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"experiment.output_dir={args.output_dir}")
    config = load_config(path, overrides)
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
    from .config import ConfigError, from_dict, merge
    from .engine import CheckpointError, Trainer, load_checkpoint

    if args.cmfp is not None and args.rerank:
        raise UsageError("eval: --cmfp K and --rerank exclude each other; choose one")
    if args.cmfp is not None and args.cmfp < 1:
        raise UsageError(f"eval --cmfp: K must be >= 1, got {args.cmfp}")
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"eval --trials: must be >= 1, got {args.trials}")
    state = load_checkpoint(args.checkpoint, required=("config", "epoch"))
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint {args.checkpoint}: 'config' must be a mapping of sections, got "
                              f"{type(state['config']).__name__}")
    extra = {"eval": {"eval_untrained": False, **({"trials": args.trials} if args.trials is not None else {})},
             "experiment": {"output_dir": os.path.dirname(os.path.abspath(args.checkpoint))}}
    try:
        config = from_dict(merge(state["config"], extra))
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {args.checkpoint}: its config does not validate ({error}); it was "
                              "written by another version") from None
    trainer = Trainer(config, data_root=args.data_root, resume=args.checkpoint)
    result = trainer.evaluate(rerank=args.rerank, cmfp_k=args.cmfp)
    setting = " with CMFP" if args.cmfp is not None else (" with re-ranking" if args.rerank else "")
    print(f"{args.checkpoint} (epoch {state['epoch']}){setting}: " + "  ".join(
        f"{k} {result[k]:.2f}" for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")))
    return 0


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r} (e.g. {flag} 0,1)") from None


def cmd_compare(args) -> int:
    from .engine.compare import RunFailedError, compare

    seeds = _int_list("--seeds", args.seeds)
    if args.jobs < 1:
        raise UsageError(f"compare --jobs: must be >= 1, got {args.jobs}")
    try:
        result = compare([m.strip() for m in args.methods.split(",") if m.strip()], seeds,
                         base_config=args.config or DEMO_CONFIG, overrides=list(args.overrides),
                         output_dir=args.output_dir, data_root=args.data_root, jobs=args.jobs)
    except RunFailedError as error:  # not a usage error: a run itself failed; its log says why
        print(f"error: {error}", file=sys.stderr)
        return 1
    print()
    print(result["markdown"])
    print(f"results: {os.path.join(args.output_dir, 'results.md')} (and results.json, results.png)")
    return 0


def cmd_make_synthetic(args) -> int:
    from .engine.data import ensure_synthetic, synthetic_root

    if args.ids < 0:
        raise UsageError(f"make-synthetic --ids: must be >= 0 (0 = the preset's), got {args.ids}")
    if args.seed < 0:
        raise UsageError(f"make-synthetic --seed: must be >= 0, got {args.seed}")
    out = args.out or synthetic_root(args.size, args.ids, args.seed)
    root = ensure_synthetic(os.path.abspath(out), args.size, args.ids, args.seed)
    print(root)
    return 0


def cmd_pretrain(args) -> int:
    from .config import load_config
    from .engine.pretrain import first_epoch_ari, make_config, pretrain

    config = make_config(args.overrides)  # PretrainConfigError is a ConfigError: one line, exit 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    result = pretrain(config, out=args.out, progress=False if args.no_progress else None,
                      command=config.command(args.out))
    print(f"weights: {result.path}\nconfig hash: {result.record['config_hash']}  sha256: {result.record['sha256']}")
    if args.ari:
        first_epoch_ari(load_config(args.target, []), result.path)
    return 0


def cmd_bench(args) -> int:
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "benchmarks")
    if not os.path.isdir(bench_dir):
        raise UsageError(f"no benchmarks folder at {bench_dir}: run from a source checkout")
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
    debug = args.debug or os.environ.get("VIREID_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    command = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "make-synthetic": cmd_make_synthetic,
               "pretrain": cmd_pretrain, "bench": cmd_bench}
    return run_command(command[args.command], args, debug)


if __name__ == "__main__":
    raise SystemExit(main())
