"""Command line: ``freeshap-ray {run,kernel,shapley,clean,reagent,show-config} [CONFIG] [--set key=value ...]``,
``freeshap-ray report OUT_DIR`` and ``freeshap-ray explain OUT_DIR --text TEXT``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from .config import JobConfig, config_to_dict, load_config
from .errors import FreeShapError

__all__ = ["main", "build_parser"]

_EPILOG = """\
CONFIG is a YAML job config (see configs/); without it the embedded quickstart config is used.
Override any key with --set, e.g.  --set shapley.n_permutations=50 --set data.max_examples=100
Outputs go to the directory or URI (s3://, gs://, file://, ...) named by the `output` key (see README: "Outputs").
Connects to RAY_ADDRESS (or --address / ray.address) if set; otherwise starts an embedded local Ray on 127.0.0.1.
"""

_COMMANDS = {
    "run": "run the whole job: data -> kernel -> Shapley values (values.parquet)",
    "kernel": "compute the eNTK kernel only (writes train/test examples and kernel tiles)",
    "shapley": "compute Shapley values from the kernel a previous `kernel` run wrote to the same output",
    "show-config": "print the fully resolved config (defaults + file + --set) as YAML and exit",
    "clean": "rank training points by how suspicious their label is (suspects.parquet), removal/selection "
             "curves and baselines; with clean.noise_fraction > 0 also the label-noise detection evaluation",
    "reagent": "ReAGent token attribution of a causal LM over a file of prompts (attributions.parquet); "
               "CONFIG is a ReAGent job config (see freeshap_ray/configs/reagent_example.yaml)",
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
    rep = sub.add_parser("report", help="write a self-contained HTML report (OUT_DIR/report.html) of a finished run",
                         description="Write a self-contained HTML report of the run in OUT_DIR: value distribution, "
                                     "detection and removal curves, sign robustness, most helpful/harmful examples.")
    rep.add_argument("out_dir", metavar="OUT_DIR", help="the run's output directory (the `output` config key)")
    rep.add_argument("--output", default=None, help="report file (default OUT_DIR/report.html)")
    rep.add_argument("--top-k", type=int, default=10, help="examples per table (default 10)")
    _explain_parser(sub)
    return parser


def _explain_parser(sub) -> None:
    text = ("explain the run's prediction on new texts: the Shapley value of every training example for the "
            "surrogate's output on each text (OUT_DIR/explanations.parquet)")
    ex = sub.add_parser("explain", help=text, description=text + ". Runs in this process; with --address or "
                        "RAY_ADDRESS the kernel rows and permutations run on that Ray cluster.")
    ex.add_argument("out_dir", metavar="OUT_DIR", help="a finished run's output directory (the `output` config key)")
    ex.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to explain (repeatable)")
    ex.add_argument("--texts", default=None, metavar="FILE",
                    help="texts to explain: .txt (one per line), .csv, .tsv, .jsonl or .parquet (column --text-column)")
    ex.add_argument("--text-column", default=None, help="column of --texts (default: the run's data.text_column)")
    ex.add_argument("--label", default=None, help="explain this class (name or index; 'why not X?') instead of "
                    "the predicted one (explain.label)")
    ex.add_argument("--utility", default=None, help="prob (default) or margin of the explained class (explain.utility)")
    ex.add_argument("--n-permutations", type=int, default=None, help="permutations per text (explain.n_permutations, "
                    "default 200)")
    ex.add_argument("--truncation-tol", type=float, default=None, help="TMC truncation tolerance; 0 disables "
                    "(explain.truncation_tol, default 0.05)")
    ex.add_argument("--sampler", default=None, help="tmc (default), permutation or antithetic (explain.sampler)")
    ex.add_argument("--seed", type=int, default=None, help="permutation seed (explain.seed, default 0)")
    ex.add_argument("--top", type=int, default=None, help="helpful / harmful examples printed per text (default 10)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace stored explanations of these texts made with other settings; recompute invalid cached "
                    "training gradients")
    ex.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS; none: no Ray)")
    ex.add_argument("--no-progress", action="store_true", help="disable progress bars")


def _runtime(cfg, address: str | None):
    """The Ray runtime of a job config (FreeShap or ReAGent): its ``ray`` section, ``--address`` first."""
    from .distributed import ray_runtime

    return ray_runtime(cfg.ray, address)


def _dispatch_reagent(args: argparse.Namespace) -> int:
    from .config import load_reagent_config

    if args.config is None:
        raise FreeShapError("reagent: give a ReAGent job CONFIG (YAML with prompts.path, model, reagent, output)")
    cfg = load_reagent_config(args.config, args.overrides)
    from .distributed.reagent_job import run_reagent_job
    from .io.remote import display, local_root

    if local_root(cfg.output) != Path(cfg.output):  # an output URI: work in its staging copy (io.remote)
        cfg = dataclasses.replace(cfg, output=str(local_root(cfg.output)))

    with _runtime(cfg, args.address):
        s = run_reagent_job(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"reagent: {s['targets']} target tokens of {s['prompts']} prompts ({s['converged_targets']} converged), "
          f"{s['forward_rows']} forward rows, {s['seconds']['total']:.1f} s -> {display(Path(cfg.output) / 'attributions.parquet')}")
    for method, m in s.get("metrics_mean", {}).items():
        print(f"  {method:22s} ln(Soft-NS/random) {m['log_soft_ns']:+.3f}   ln(Soft-NC/random) {m['log_soft_nc']:+.3f}")
    return 0


def _dispatch_report(args: argparse.Namespace) -> int:
    from .apps.report import write_report

    if args.top_k < 1:
        raise FreeShapError(f"--top-k: must be >= 1, got {args.top_k}")
    from .io.remote import display, local_root

    path = write_report(local_root(args.out_dir), args.output, top_k=args.top_k)  # a URI: its staging copy
    print(f"report: {display(path)}")
    return 0


_EXPLAIN_FLAGS = {"label": "label", "utility": "utility", "n_permutations": "n_permutations",
                  "truncation_tol": "truncation_tol", "sampler": "sampler", "seed": "seed", "top": "top"}


def _dispatch_explain(args: argparse.Namespace) -> int:
    import os

    from .config import ExplainConfig, build_section
    from .io import Layout, RunManifest
    from .io.remote import display, local_root

    config = build_section(ExplainConfig, {key: getattr(args, flag) for flag, key in _EXPLAIN_FLAGS.items()
                                           if getattr(args, flag) is not None}, "explain.")
    out_dir = local_root(args.out_dir)
    texts = list(args.text)
    if args.texts is not None:
        from .data.texts import load_texts

        data = RunManifest.read(Layout.of(out_dir).manifest).config.get("data", {})
        texts += load_texts(args.texts, text_column=args.text_column or data.get("text_column") or "text",
                            encoding=data.get("encoding"))
    if not texts:
        raise FreeShapError("explain: give --text TEXT (repeatable) or --texts FILE")
    from .apps.explain import Explainer, run_explain_stage, summary_lines

    def go() -> None:
        with Explainer(out_dir, num_actors=config.num_actors, overwrite=args.overwrite,
                       progress=not args.no_progress) as ex:
            expl = run_explain_stage(ex, texts, config, overwrite=args.overwrite, progress=not args.no_progress)
            sec = expl.info["seconds"]
            print(f"explain: {len(texts)} text(s) against {ex.n} training examples; "
                  f"run {ex.seconds['read_run']:.1f} s, model {ex.seconds.get('load_model', 0):.1f} s, "
                  f"training gradients "
                  f"{ex.seconds.get('train_features', 0):.1f} s, kernel rows {sec['rows']:.2f} s, "
                  f"values {sec['values']:.2f} s ({len(expl.info['reused'])} reused) -> "
                  f"{display(Layout.of(out_dir).explanations)}")
            print("\n".join(summary_lines(expl, config.top)))

    if args.address or os.environ.get("RAY_ADDRESS"):
        from .config import RayConfig
        from .distributed import ray_runtime

        with ray_runtime(RayConfig(), args.address):
            go()
    else:
        go()
    return 0


def _dispatch_clean(cfg: JobConfig, args: argparse.Namespace) -> int:
    from .apps.cleaning import prepare_clean, run_clean

    inputs = prepare_clean(cfg, overwrite=args.overwrite)  # validates before Ray starts or anything is written
    if cfg.clean.noise_fraction > 0 or cfg.clean.finetune:  # the Shapley engine / fine-tuning tasks run on Ray
        with _runtime(cfg, args.address):
            s = run_clean(cfg, overwrite=args.overwrite, progress=not args.no_progress, inputs=inputs)
    else:
        s = run_clean(cfg, overwrite=args.overwrite, progress=not args.no_progress, inputs=inputs)
    from .apps.cleaning import summary_lines

    print("\n".join(summary_lines(s, cfg.output)))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "report":
        return _dispatch_report(args)
    if args.command == "reagent":
        return _dispatch_reagent(args)
    if args.command == "explain":
        return _dispatch_explain(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "show-config":
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.command == "clean":
        return _dispatch_clean(cfg, args)
    from . import pipeline
    from .io import Layout
    from .io.remote import display

    progress = not args.no_progress

    def report(stage: str, info: dict) -> None:
        layout = Layout.of(cfg.output)
        if stage == "kernel":
            if "data_summary" in info:
                d = info["data_summary"]
                dropped = (f"; data.dedupe={d['dedupe']['mode']} dropped {d['dedupe']['train_dropped']} repeated and "
                           f"{d['dedupe']['test_dropped']} test-in-train texts" if "dedupe" in d else "")
                print(f"data: {d['n_train']} training and {d['n_test']} test texts{dropped}; repeated training texts: "
                      f"{d['train_repeats']}, test texts also in training (leakage): {d['test_in_train']}")
            how = "reused the finished kernel" if info.get("reused") else f"in {info['seconds']['total']:.1f} s"
            if info.get("representation") == "features":
                print(f"kernel: projected features of {info['n_train']} + {info['n_test']} texts, D = "
                      f"{info['projection']['dim']:,} ({info['kind']}, {info['n_params']:,} parameters; nothing "
                      f"n×n) {how} -> {display(layout.root / 'features')}")
            else:
                print(f"kernel: {info['n_train']}x{info['n_train']} + {info['n_test']}x{info['n_train']} "
                      f"({info['kind']}, {info['n_params']:,} parameters) {how} -> {display(layout.kernel_dir)}")
            return
        print(f"shapley: {info['n_permutations']} permutations, v(N)={info['v_full']:.4f}, "
              f"v(empty)={info['v_empty']:.4f}, {info['seconds']:.1f} s -> {display(layout.values)}")
        print(f"shapley: {info['n_resumed']} resumed + {info['n_new']} new; stopped on {info['stop_reason']}; "
              f"sign agreement between halves {info['sign_agreement_halves']:.3f}; split-half Spearman "
              f"{info.get('stability_spearman', float('nan')):.3f} ({info.get('estimator', 'tmc')}, seed "
              f"{cfg.shapley.seed}{'; other seeds stored: ' + ', '.join(info['seed_spearman']) if info.get('seed_spearman') else ''})")
        if (auto := info.get("solver_auto")) is not None:
            print(f"shapley: solver auto -> {auto['solver']} (samples add ~{auto['expected_prefix_len']:,} points: "
                  f"{auto['expected_prefix_from']}; est. cost dual {auto['dual_time']:.3g} vs primal "
                  f"{auto['primal_time']:.3g} flops)")
        print(pipeline.summary(layout.values))

    if args.command == "run":
        pipeline.run_job(cfg, overwrite=args.overwrite, progress=progress, address=args.address, on_stage=report)
    elif args.command == "kernel":
        stage = pipeline.prepare_kernel_stage(cfg, overwrite=args.overwrite)
        with _runtime(cfg, args.address):
            report("kernel", pipeline.run_kernel_stage(stage, progress=progress))
    else:
        inputs = pipeline.prepare_shapley_stage(cfg, overwrite=args.overwrite)  # validates before Ray starts
        with _runtime(cfg, args.address):
            report("shapley", pipeline.run_shapley_stage(cfg, overwrite=args.overwrite, progress=progress,
                                                         inputs=inputs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``freeshap-ray`` console script. Exit 0 on success, 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .io.remote import close_all

    try:
        return _dispatch(args)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        print(f"freeshap-ray: error: {cause}", file=sys.stderr)
        return 2
    finally:
        close_all()  # an output URI: final upload of anything not yet mirrored; staging copy removed


def _user_error(err: BaseException | None) -> FreeShapError | None:
    """``err`` if it is a FreeShapError, or the FreeShapError a Ray task/actor raised that ``err`` wraps
    (Ray re-raises it wrapped, with the remote traceback in its message); else None."""
    for _ in range(8):
        if err is None:
            return None
        inner = getattr(err, "cause", None)
        if isinstance(inner, FreeShapError):
            err = inner
            continue
        if isinstance(err, FreeShapError):
            return err
        err = inner if isinstance(inner, BaseException) else None
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
