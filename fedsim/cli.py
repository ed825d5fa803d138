"""The ``fedsim`` command: ``run``, ``validate``, ``report``, ``sweep`` and ``deploy``.

Exit codes: 0 success, 1 the run failed, 2 bad input (scenario, flags, paths), 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from rich.console import Console

from fedsim import __version__
from fedsim.deploy.cli import add_deploy_parser, run_deploy
from fedsim.progress import format_duration
from fedsim.sweep.cli import add_sweep_parser, run_sweep_command

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsim", description="Federated learning and privacy simulation on Flower.")
    p.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the federation a scenario describes")
    run.add_argument("scenario", help="path to a scenario YAML file")
    run.add_argument("--out", help="run directory (default: output.dir, else runs/<name>-<timestamp>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a scenario value, e.g. --set federation.rounds=3 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress output, only the final line")
    run.add_argument("--overwrite", action="store_true", help="reuse a run directory that already holds a run")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest intact checkpoint (the same scenario only)")
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue even if the scenario, partition or fedsim version changed")
    val = sub.add_parser("validate", help="check scenario files without running them")
    val.add_argument("scenario", nargs="+")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    rep = sub.add_parser("report", help="compare finished runs side by side")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--plot", default=None,
                     help="where to write the comparison plot (default: comparison.png beside the runs)")
    rep.add_argument("--json", action="store_true", help="print the table as JSON")
    add_sweep_parser(sub)
    add_deploy_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script."""
    args = _parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)   # never hard-wrap: messages carry commands and paths
    try:
        return {"run": _run, "validate": _validate, "report": _report,
                "sweep": run_sweep_command, "deploy": run_deploy}[args.command](args, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED


def console_main() -> None:
    """The ``fedsim`` console script: :func:`main`, then exit without the interpreter's teardown.

    Every result file is written and closed by the time ``main`` returns, and every process the
    run started has been stopped; tearing down torch's and matplotlib's modules would only add
    about a second before the shell prompt comes back.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _load(path: str, overrides: list[str], console: Console):
    from fedsim.scenario import ScenarioError, load_scenario
    try:
        return load_scenario(path, overrides)
    except ScenarioError as exc:
        console.print(str(exc), highlight=False, markup=False)
        return None


def _validate(args: argparse.Namespace, console: Console) -> int:
    """The schema, then what needs the data: the partition, the cohort size and the model on the
    data's shapes (skipped, with a note, where the data set is not available here)."""
    from fedsim.builder import build
    from fedsim.data import DataUnavailableError
    from fedsim.federation import Federation
    from fedsim.scenario import ScenarioError

    bad = 0
    for path in args.scenario:
        scn = _load(path, args.overrides, console)
        if scn is None:
            bad += 1
            continue
        try:
            fed = Federation(scn)
            build(scn, fed)                  # the algorithms' checks (Krum's f, DP's delta, explorers, ...)
        except DataUnavailableError as exc:
            console.print(f"{path}: schema ok ({scn.name}); partition and model not checked, the data set is not "
                          f"available here: {exc}", highlight=False, markup=False)
            continue
        except ScenarioError as exc:
            console.print(f"{path}: {exc}", highlight=False, markup=False)
            bad += 1
            continue
        console.print(f"{path}: ok ({scn.name})", highlight=False)
        for note in fed.notes:
            console.print(f"  note: {note}", highlight=False, markup=False)
    return EXIT_USAGE if bad else 0


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run (the same scenario, overrides and directory)."""
    words = ["fedsim", "run", args.scenario, *[w for o in args.overrides for w in ("--set", o)], "--out", str(out),
             "--resume"]
    return shlex.join(words)


def _check_out(args: argparse.Namespace, out: Path) -> str | None:
    """Why ``out`` cannot take this run (None: it can). Nothing is written or removed here."""
    from fedsim.results.checkpoint import round_checkpoints

    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a directory; choose a directory path"
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"--out {out}: {probe} is a file, so the run directory cannot be created under it"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"--out {out}: {probe} is not writable by this user; choose a writable place"
    if args.resume or args.overwrite or not out.is_dir():
        return None
    if (out / "metrics.jsonl").exists() or round_checkpoints(out):
        if not (out / "summary.json").exists() and round_checkpoints(out):
            return (f"{out} holds an interrupted run (checkpoints, no summary.json). Continue it with:\n"
                    f"  {_resume_command(args, out)}\nor start again with --overwrite, or choose another --out")
        return f"{out} already holds a run; choose another --out or pass --overwrite"
    entries = sorted(e.name for e in out.iterdir())
    if entries:
        return (f"{out} is not empty and holds no fedsim run ({len(entries)} entries, e.g. {entries[0]!r}); "
                f"fedsim would write its files among them. Choose a new or empty --out, or pass --overwrite "
                f"to write there anyway (only fedsim's own files are replaced)")
    return None


def _out_dir(args: argparse.Namespace, scn) -> Path:
    if args.out:
        return Path(args.out)
    if scn.output.dir:
        return Path(scn.output.dir)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scn.name}-{stamp}"


def _run(args: argparse.Namespace, console: Console) -> int:
    from fedsim.data import DataUnavailableError
    from fedsim.engine import run_scenario
    from fedsim.errors import ResumeError, RunError
    from fedsim.scenario import ScenarioError

    scn = _load(args.scenario, args.overrides, console)
    if scn is None:
        return EXIT_USAGE
    out = _out_dir(args, scn)
    if args.resume and not args.out and not scn.output.dir:
        console.print("--resume needs the run directory: pass --out DIR", highlight=False)
        return EXIT_USAGE
    if args.force and not args.resume:
        console.print("--force only applies with --resume", highlight=False)
        return EXIT_USAGE
    problem = _check_out(args, out)
    if problem:
        console.print(problem, highlight=False, markup=False)
        return EXIT_USAGE
    if args.overwrite:
        clear_run_dir(out)
    try:
        summary = run_scenario(scn, out, progress="none" if args.quiet else "auto", resume=args.resume,
                               force=args.force)
    except KeyboardInterrupt:
        from fedsim.results.checkpoint import round_checkpoints
        if round_checkpoints(out):
            console.print(f"[yellow]interrupted[/yellow]; continue from the last checkpoint with:\n  "
                          f"{_resume_command(args, out)}", highlight=False, soft_wrap=True)
        else:
            console.print("[yellow]interrupted[/yellow]; the run left no checkpoint to resume from (set "
                          "output.checkpoint_every: N to make a run resumable)", highlight=False)
        return EXIT_INTERRUPTED
    except OSError as exc:          # the run directory or a result file could not be written
        console.print(f"run failed: cannot write {exc.filename or out}: {exc.strerror or exc}", highlight=False,
                      markup=False)
        return EXIT_FAILED
    except DataUnavailableError as exc:
        console.print(f"data set unavailable: {exc}", highlight=False, markup=False)
        return EXIT_USAGE
    except ScenarioError as exc:     # found only once the data is loaded (sizes, natural ids, devices)
        console.print(str(exc), highlight=False, markup=False)
        return EXIT_USAGE
    except ResumeError as exc:
        console.print(str(exc), highlight=False, markup=False)
        return EXIT_USAGE
    except RunError as exc:
        from fedsim.results.checkpoint import round_checkpoints
        console.print(f"run failed: {exc}", highlight=False, markup=False)
        if round_checkpoints(out) and not (out / "summary.json").exists():
            console.print(f"once fixed, continue from the last checkpoint with:\n  {_resume_command(args, out)}",
                          highlight=False, markup=False, soft_wrap=True)
        return EXIT_FAILED
    acc = summary.get("final_accuracy")
    acc_text = f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"
    print(f"{scn.name}: {summary.get('rounds_completed')} rounds, final accuracy {acc_text}, "
          f"{format_duration(summary.get('wall_s', 0))} -> {out}")
    return 0


def clear_run_dir(out: Path) -> None:
    """Remove what a previous run left (results, checkpoints, client state, logs), nothing else."""
    for name in ("metrics.jsonl", "metrics.csv", "clients.jsonl", "summary.json", "model.safetensors",
                 "partition.json", "config.yaml", "privacy.json", "pruning.json"):
        (out / name).unlink(missing_ok=True)
    for sub in ("checkpoints", "client_state", "plots", "logs", "flwr"):
        shutil.rmtree(out / sub, ignore_errors=True)


def _report(args: argparse.Namespace, console: Console) -> int:
    from fedsim.results import compare_runs, plot_comparison, render_table
    try:
        rows = compare_runs(args.run_dirs)
    except (ValueError, OSError) as exc:
        console.print(f"report: {exc}", highlight=False, markup=False)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=200)      # files and pipes: do not squeeze the table into 80 columns
        out.print(render_table(rows))
    plot = Path(args.plot) if args.plot else _beside(args.run_dirs) / "comparison.png"
    try:
        path = plot_comparison(args.run_dirs, plot, [r["config"] for r in rows])
    except ValueError as exc:
        console.print(f"report: no plot: {exc}", highlight=False, markup=False)
        return EXIT_USAGE
    except OSError as exc:
        console.print(f"report: cannot write the plot to {plot}: {exc.strerror or exc}; pass --plot PATH to write it "
                      "elsewhere", highlight=False, markup=False)
        return EXIT_USAGE
    console.print(f"comparison plot: {path}", highlight=False)
    return 0


def _beside(run_dirs: list[str]) -> Path:
    """The folder the runs share (their common parent), where the comparison plot goes by default."""
    parents = [str(Path(d).resolve().parent) for d in run_dirs]
    return Path(os.path.commonpath(parents))


if __name__ == "__main__":
    console_main()
