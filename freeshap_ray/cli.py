"""Command line: ``freeshap-ray {run,kernel,shapley,show-config} [CONFIG] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import yaml

from .config import JobConfig, config_to_dict, load_config
from .errors import FreeShapError

__all__ = ["main", "build_parser"]

_EPILOG = """\
CONFIG is a YAML job config (see configs/); without it the embedded quickstart config is used.
Override any key with --set, e.g.  --set shapley.n_permutations=50 --set data.max_examples=100
Outputs go to the directory named by the `output` key (see README: "Outputs").
Connects to RAY_ADDRESS (or --address / ray.address) if set; otherwise starts an embedded local Ray on 127.0.0.1.
"""

_COMMANDS = {
    "run": "run the whole job: data -> kernel -> Shapley values (values.parquet)",
    "kernel": "compute the eNTK kernel only (writes train/test examples and kernel tiles)",
    "shapley": "compute Shapley values from the kernel a previous `kernel` run wrote to the same output",
    "show-config": "print the fully resolved config (defaults + file + --set) as YAML and exit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeshap-ray",
        description="Fine-tuning-free Shapley attribution of training examples for language models, on Ray.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", default=None, help="YAML job config (default: embedded quickstart)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (dotted), repeatable")
        if name != "show-config":
            p.add_argument("--overwrite", action="store_true", help="replace existing results in the output directory")
            p.add_argument("--address", default=None, help="Ray cluster address (overrides ray.address and RAY_ADDRESS)")
            p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return parser


def _runtime(cfg: JobConfig, address: str | None):
    from .distributed import ray_runtime

    return ray_runtime(address or cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard)


def _dispatch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "show-config":
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from . import pipeline

    progress = not args.no_progress
    if args.command in ("run", "kernel"):
        stage = pipeline.prepare_kernel_stage(cfg, overwrite=args.overwrite)
        with _runtime(cfg, args.address):
            info = pipeline.run_kernel_stage(stage, progress=progress)
            print(f"kernel: {info['n_train']}x{info['n_train']} + {info['n_test']}x{info['n_train']} "
                  f"({info['kind']}, {info['n_params']:,} parameters) in {info['seconds']['total']:.1f} s -> {stage.layout.kernel_dir}")
            if args.command == "run":
                s = pipeline.run_shapley_stage(cfg, overwrite=True, progress=progress)
    else:
        with _runtime(cfg, args.address):
            s = pipeline.run_shapley_stage(cfg, overwrite=args.overwrite, progress=progress)
    if args.command in ("run", "shapley"):
        from .io import Layout

        path = Layout.of(cfg.output).values
        print(f"shapley: {s['n_permutations']} permutations, v(N)={s['v_full']:.4f}, v(empty)={s['v_empty']:.4f}, "
              f"{s['seconds']:.1f} s -> {path}")
        print(pipeline.summary(path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``freeshap-ray`` console script. Exit 0 on success, 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except FreeShapError as err:
        print(f"freeshap-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
