"""The `edgecc` command line: parses arguments and calls the library, nothing more.

Exit codes, so that CI can tell a verdict from a crash: 0 success (every budget holds),
1 a budget does not hold, 2 bad input (one line naming the field or file), 3 internal error
(one line; the traceback goes to a log file in the temp directory, and to stderr with
`edgecc --debug`), 130 interrupted (Ctrl-C or SIGTERM). `main` guarantees them: nothing
leaves as a Python traceback with exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
import typer.rich_utils
from rich.console import Console
from rich.table import Table

import edgecc
from edgecc.emit import dumps, loads, write_json
from edgecc.errors import EdgeccError, one_line
from edgecc.progress import Reporter

if TYPE_CHECKING:
    from edgecc.verify import Verification

T = TypeVar("T")
EXIT_BUDGET, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
HELP = ("edgecc: compress Keras transformers into fully-int8 TFLite models that fit edge devices.\n\n"
        "Exit codes: 0 done (every budget holds), 1 a budget is exceeded, 2 bad input, 3 internal error "
        "(a bug: the traceback is saved to the file named on stderr, --debug also prints it), 130 interrupted.")
DEFAULT_CACHE = Path("build") / "cache"  # beside the default output, build/<target>
debug = False  # set by the global --debug option; read by main() after the command has ended

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _say(line: str) -> None:
    """One line on stderr, never wrapped, so CI logs and tests see the whole message on one line."""
    Console(stderr=True, highlight=False).print(line, markup=False, soft_wrap=True)


class _Stdout(Console):
    """The console for results on stdout."""

    def on_broken_pipe(self) -> None:
        """The reader went away (`edgecc check --json | head -1`): exit 3, not rich's exit 1, a budget verdict."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _say("edgecc: error: standard output was closed before edgecc finished writing")
        raise typer.Exit(EXIT_INTERNAL)


stdout = _Stdout(highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    _say(f"edgecc: error: {message}")
    raise typer.Exit(code)


def _run(work: Callable[[], T]) -> T:
    """Run library code, turning user errors and interrupts into one line and an exit code."""
    try:
        return work()
    except EdgeccError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", EXIT_INTERRUPTED)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"edgecc {edgecc.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug_option: Annotated[bool, typer.Option("--debug", help=(
        "On an internal error (exit 3), also print the full traceback (it is always saved to a file)."))] = False,
) -> None:
    """Options for every command (the app's help text is HELP)."""
    global debug
    debug = debug_option


@app.command()
def build(
    target: Annotated[str, typer.Option("--target", "-t", help="Target profile name (see `edgecc targets`) or a profile TOML file.")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe TOML file; the built-in digits recipe when omitted.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory [default: build/<target>].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")] = False,
    sign_key: Annotated[Path | None, typer.Option("--sign-key", help="Sign the build with this Ed25519 private key (edgecc keygen): writes manifest.sig.", show_default=False)] = None,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="A trained float teacher you already have (.keras file or SavedModel folder, loaded in safe mode): no training.", show_default=False)] = None,
    cache: Annotated[Path, typer.Option("--cache", help="Folder that keeps trained teachers, keyed by the recipe's model/data/task/train sections, seed, data and versions: a rebuild reuses them, an interrupted training resumes.")] = DEFAULT_CACHE,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the teacher cache.")] = False,
) -> None:
    """Train (or load), compress to full int8 by the recipe's stages, evaluate, and write model.tflite,
    manifest.json, report.md.

    Exits 1 when a budget of the recipe does not hold (the artifacts are still written), 2 on bad input,
    3 on an internal error, 130 when interrupted (the previous output is kept).
    """
    from edgecc.build import build as run_build
    from edgecc.report import budget_line

    result = _run(lambda: run_build(target, recipe, out, Reporter(quiet=quiet or as_json), sign_key=sign_key,
                                    teacher_file=teacher, cache=None if no_cache else cache))
    if not result.written:  # a multi-worker build's non-chief worker: the chief prints and writes
        return
    if as_json:
        stdout.print_json(dumps(result.manifest))
    elif not quiet:
        metrics = result.manifest["metrics"]
        stdout.print(
            f"accuracy float {metrics['float_accuracy']:.4f}, int8 {metrics['int8_accuracy']:.4f}; "
            f"int8 file {metrics['int8_tflite_bytes']:,} bytes ({metrics['size_ratio']:.2f}x smaller than float)"
        )
        stdout.print(f"wrote {result.out}/model.tflite, manifest.json, report.md"
                     + (", manifest.sig" if sign_key else ""))
    for budget in result.failed_budgets:
        _say(f"edgecc: budget not met: {budget_line(budget)}")
    for warning in result.manifest["warnings"]:  # after the verdict lines, which scripts read first
        _say(f"edgecc: warning: {warning}")
    if result.failed_budgets:
        raise typer.Exit(EXIT_BUDGET)


targets_app = typer.Typer(help="Device profiles: list them, or fit one to a board's own measurement.",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(targets_app, name="targets")


@targets_app.callback()
def targets(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False,
) -> None:
    """List the built-in target profiles (every figure with its source in --json)."""
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import asdict

    from edgecc.targets import all_targets

    profiles = _run(all_targets)
    if as_json:
        stdout.print_json(dumps([asdict(p) for p in profiles]))
        return
    table = Table("target", "runtime", "processor", "RAM", "flash", "latency budget",
                  caption="`edgecc targets --json` gives every figure with its source.")
    for p in profiles:
        table.add_row(p.name, p.runtime,
                      f"{p.cpu.cores.value:g} x {p.cpu.core.split(' (')[0]} @ {p.cpu.clock_mhz.value:g} MHz",
                      _figure(p.memory.ram_bytes.value, "bytes"), _figure(p.memory.flash_bytes.value, "bytes"),
                      _figure(p.latency_budget_ms.value, "ms"))
    stdout.print(table)


@targets_app.command("calibrate")
def targets_calibrate(
    files: Annotated[list[Path], typer.Argument(help="Pairs of a record written by `edgecc bench --record` and the "
                                                "model it measured: REC MODEL [REC MODEL ...].", show_default=False)],
    target: Annotated[str, typer.Option("--target", "-t", help="The profile to fit (name or TOML file).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the calibrated profile TOML.")],
    name: Annotated[str | None, typer.Option("--name", help="Name of the new profile [default: <target>-calibrated].")] = None,
) -> None:
    """Write a profile whose latency estimates match what `edgecc bench` measured on the board (one or more models)."""
    from edgecc.calibrate import calibrate, write_profile
    from edgecc.targets import load_target

    def work() -> tuple[Any, tuple[float, float | None]]:
        if len(files) % 2:
            raise EdgeccError(f"{files[-1]}: records and models come in pairs (REC MODEL [REC MODEL ...])")
        pairs = []
        for record, model in zip(files[::2], files[1::2]):
            try:
                data = loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:  # ValueError: not JSON, NaN or Infinity, not UTF-8
                raise EdgeccError(f"{record} is not a readable bench record: {err}") from None
            if not model.is_file():
                raise EdgeccError(f"{model} does not exist")
            pairs.append((data, model.read_bytes()))
        profile, factors = calibrate(pairs, load_target(target), name)
        write_profile(profile, out)
        return profile, factors

    profile, (rest, mac) = _run(work)
    scaled = f"multiply-accumulates by {mac:.3g}, the rest by {rest:.3g}" if mac else f"by {rest:.3g}"
    stdout.print(f"wrote {out}: {profile.name}, estimates scaled {scaled}; use it with --target {out}")


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="A .tflite model.", show_default=False)],
    threads: Annotated[int, typer.Option("--threads", min=1, help="Interpreter threads.")] = 1,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs after the warm-up.")] = 200,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 20,
    record: Annotated[Path | None, typer.Option("--record", help="Write the calibration record (JSON) here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Measure a model on this machine (run it on the board): latency p50/p90/p99 and resident memory."""
    from edgecc.bench import bench as run_bench

    def work() -> Any:
        if not model.is_file():
            raise EdgeccError(f"{model} does not exist")
        result = run_bench(model, threads, runs, warmup, Reporter(quiet=quiet or as_json))
        if record is not None:
            try:
                write_json(record, result.to_json())
            except OSError as err:
                raise EdgeccError(f"cannot write {record}: {err.strerror}") from None
        return result

    result = _run(work)
    if as_json:
        stdout.print_json(dumps(result.to_json()))
        return
    if quiet:
        return
    stdout.print(f"{model.name}: p50 {result.p50_ms:.3f} ms, p90 {result.p90_ms:.3f} ms, p99 {result.p99_ms:.3f} ms "
                 f"({runs} runs, {threads} thread(s)); resident memory +{result.model_rss_bytes / 2**20:.1f} MiB "
                 f"(process {result.rss_after_bytes / 2**20:.1f} MiB)")
    if record is not None:
        stdout.print(f"calibration record: {record} (edgecc targets calibrate {record} {model} --target T --out FILE)")


ModelArg = Annotated[Path, typer.Argument(help="A .tflite model, or an edgecc build directory.", show_default=False)]
TargetOpt = Annotated[str, typer.Option("--target", "-t", help="Target profile name (see `edgecc targets`) or a profile TOML file.")]


def _assess(model: Path, target: str, latency_ms: float | None, uncertain_passes: bool = False) -> Any:
    from edgecc.check import assess, read_model

    def work() -> Any:
        content, build_budget = read_model(model)
        return assess(content, target, latency_ms if latency_ms is not None else build_budget,
                      uncertain_passes=uncertain_passes)

    return _run(work)


def _figure(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1024:,.1f} KiB" if value < 2**20 else f"{value / 2**20:,.2f} MiB"
    if unit == "ms":
        return f"{value:,.3g} ms"
    return f"{value:g} {unit}"


class Uncertain(str, Enum):
    """How `check` counts a latency limit inside the estimate's error band."""

    FAIL = "fail"
    PASS = "pass"


@app.command()
def check(
    model: ModelArg,
    target: TargetOpt,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", min=0.0, help="Latency budget in ms, `inf` for none [default: the build's recipe, else the target's].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON.")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="Also write the verdicts as a JUnit XML file for CI.")] = None,
    uncertain: Annotated[Uncertain, typer.Option("--uncertain", help=(
        "How a latency limit inside the estimate's error band counts: `fail` (exit 1 unless the model fits even "
        "at the band's slow end) or `pass` (exit 1 only when it is too slow even at the band's fast end)."))] = Uncertain.FAIL,
) -> None:
    """Check that a model fits a target: operators, RAM (tensor arena), flash, latency.

    The verdict is "fits", "does not fit", or "uncertain" when the latency limit lies inside the estimate's error
    band (published / estimated, held out). Exit 0 when every budget holds, 1 when any is exceeded (or uncertain,
    with --uncertain fail, the default), 2 on bad input, 3 on an internal error.
    """
    result = _assess(model, target, latency_ms, uncertain is Uncertain.PASS)
    if junit is not None:
        from edgecc.report import junit_xml

        _run(lambda: junit_xml(result, junit))
    if as_json:
        stdout.print_json(dumps(result.to_json()))
    else:
        table = Table("budget", "figure", "limit", "verdict", "how it was found", title=f"{model} on {result.target.name}")
        for b in result.budgets:
            verdict = ((f"[yellow]uncertain[/yellow] (counts as {uncertain.value})" if b.uncertain else "[green]holds[/green]")
                       if b.ok or b.uncertain else "[red]EXCEEDED[/red]")
            table.add_row(b.name, _figure(b.value, b.unit), _figure(b.limit, b.unit), verdict, b.detail)
        stdout.print(table)
        where = next((f"; {b.detail}" for b in result.budgets if b.name == "operators" and result.edgetpu), "")
        colour = {"fits": "green", "uncertain": "yellow", "does not fit": "red"}[result.verdict]
        named = ", ".join(b.name for b in result.budgets if not b.ok or b.uncertain)
        if result.arena_parts:
            from edgecc.check import arena_line

            stdout.print(arena_line(result.arena_parts), markup=False)
        stdout.print(f"[{colour}]{result.verdict}[/{colour}]" + (f": {named}" if named else "")
                     + (f" (counts as {uncertain.value}: --uncertain)" if result.verdict == "uncertain" else "") + where)
    if not result.ok:
        raise typer.Exit(EXIT_BUDGET)


@app.command()
def profile(
    model: ModelArg,
    target: TargetOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-operator profile as JSON.")] = False,
) -> None:
    """Per-operator profile on a target: MACs, estimated time, live memory, where each op runs."""
    result = _assess(model, target, None)
    rows = [{"index": o.index, "op": o.kind, "macs": o.macs, "bytes_moved": o.bytes_moved, "estimate_ms": o.ms,
             "live_activation_bytes": live, "runs_on": where}
            for o, live, where in zip(result.latency.ops, result.memory.live_bytes, result.placement)]
    if as_json:
        stdout.print_json(dumps({**result.to_json(), "operators": rows}))
        return
    table = Table("#", "op", "MACs", "bytes moved", "est. ms", "live KiB", "runs on",
                  title=f"{model} on {result.target.name} ({result.target.runtime})")
    for r in rows:
        table.add_row(str(r["index"]), r["op"], f"{r['macs']:,}", f"{r['bytes_moved']:,}", f"{r['estimate_ms']:.4f}",
                      f"{r['live_activation_bytes'] / 1024:,.1f}", r["runs_on"])
    stdout.print(table)
    lat = result.latency
    stdout.print(f"{len(rows)} operators, {result.total_macs:,} MACs; latency {lat.total_ms:.3g} ms "
                 f"(band {lat.low_ms:.3g}-{lat.high_ms:.3g} ms, {lat.method})")
    stdout.print(f"activations: lower bound {result.memory.lower_bound_bytes:,} B (at op {result.memory.peak_op}), "
                 f"greedy plan {result.memory.planned_bytes:,} B"
                 + (f"; TFLite Micro arena {result.arena.bytes:,} B (measured)" if result.arena else ""))
    if result.arena_parts:
        from edgecc.check import arena_line

        stdout.print(arena_line(result.arena_parts), markup=False)
    if result.pipeline is not None:
        from edgecc.check import pipeline_line

        stdout.print(f"Edge TPU ('runs on' above): {pipeline_line(result.pipeline)}")
    if result.edgetpu is not None:
        stdout.print(f"The file as one graph, what edgetpu_compiler alone does with it ({result.edgetpu.method}): "
                     f"{sum(result.edgetpu.on_tpu)} of {len(rows)} operators in {result.edgetpu.segments} segment(s)")
        following = [i for i, reason in result.edgetpu.reasons.items() if "maps nothing further" in reason]
        for index, reason in sorted(result.edgetpu.reasons.items()):
            if index not in following:
                stdout.print(f"  op {index}: {reason}")
        if following:
            stdout.print(f"  {len(following)} more operators run on the CPU only because they come after the first "
                         f"CPU operator (op {result.edgetpu.first_cpu_op})")
    if result.missing_ops:
        stdout.print(f"[red]{result.target.runtime} lacks[/red]: {', '.join(result.missing_ops)}")


@app.command()
def shadow(
    baseline: Annotated[Path, typer.Option("--baseline", help="The model in service now: .tflite, or .keras (needs TensorFlow, edgecc\\[train]).", show_default=False)],
    candidate: Annotated[Path, typer.Option("--candidate", help="The model on trial: .tflite or .keras.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", show_default=False, help=(
        "Float model inputs, as the float model takes them (a build's manifest.json gives the preprocessing; "
        "int8 models are quantized for you): a .npy of shape (N, *input_shape), or a .npz with that array as `x` "
        "and optional integer labels `y` (then each model's accuracy is reported too). Finite real numbers only: "
        "NaN, infinities and complex numbers are refused (exit 2)."))],
    log: Annotated[Path, typer.Option("--log", help="Append-only audit log (JSON Lines, one record per input).")] = Path("shadow-audit.jsonl"),
    max_disagreement: Annotated[float, typer.Option("--max-disagreement", min=0.0, max=1.0, help="Exit 1 when the share of inputs whose predicted classes differ is above this.")] = 0.01,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Shadow mode (the pilot): run a candidate beside the baseline on every input and log where they disagree.

    Exit 0 when the disagreement rate is at most --max-disagreement, 1 when above, 2 on bad input,
    3 on an internal error, 130 when interrupted (the audit log keeps every input compared so far).
    """
    from edgecc.shadow import Interrupted
    from edgecc.shadow import shadow as run_shadow

    def work() -> Any:
        try:
            return run_shadow(baseline, candidate, data, log, max_disagreement, Reporter(quiet=quiet or as_json))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {log} keeps a complete record of every input compared so far") from None

    summary = _run(work)
    if as_json:
        stdout.print_json(dumps(summary.to_json()))
    else:
        per_class = Table("baseline class", "inputs", "disagreements", "rate", title="disagreement by class")
        for cls, row in summary.per_class().items():
            per_class.add_row(str(cls), str(row["inputs"]), str(row["disagreements"]), f"{row['rate']:.2%}")
        classes = range(len(summary.confusion))
        confusion = Table("baseline \\ candidate", *map(str, classes), title="confusion (inputs)")
        for cls in classes:
            confusion.add_row(str(cls), *(str(n) if n else "." for n in summary.confusion[cls]))
        latency = Table("model", "p50 ms", "p90 ms", "p99 ms", *(["accuracy"] if summary.accuracy else []),
                        title="latency (this host, one example at a time)")
        for role, path in (("baseline", summary.baseline), ("candidate", summary.candidate)):
            lat = summary.latency[role]
            latency.add_row(f"{role} {path.name}", f"{lat.p50_ms:.3f}", f"{lat.p90_ms:.3f}", f"{lat.p99_ms:.3f}",
                            *([f"{summary.accuracy[role]:.4f}"] if summary.accuracy else []))
        for table in (per_class, confusion, latency):
            stdout.print(table)
        verdict = "[green]within[/green]" if summary.ok else "[red]ABOVE[/red]"
        stdout.print(f"{summary.inputs} inputs, {summary.disagreements} disagreements: rate "
                     f"{summary.disagreement_rate:.2%}, {verdict} the limit {summary.max_disagreement:.2%}; "
                     f"audit log {summary.log}")
    if not summary.ok:
        raise typer.Exit(EXIT_BUDGET)


pilot_app = typer.Typer(help="The rollout on the board: its audit log made into evidence.", no_args_is_help=True)
app.add_typer(pilot_app, name="pilot")


@pilot_app.command("report")
def pilot_report(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines) of the board service or of `edgecc shadow`.", show_default=False)],
    labels: Annotated[Path | None, typer.Option("--labels", help="Field labels joined by record id: CSV with the header id,label, or JSON Lines {\"id\", \"label\"}; a label is a class name or index.", show_default=False)] = None,
    ok_class: Annotated[str | None, typer.Option("--ok-class", help="The good class, for the defect miss rate and false-alarm rate \\[default: a class named ok, good, normal or none].", show_default=False)] = None,
    window: Annotated[str | None, typer.Option("--window", help="Disagreement over time in windows of N compared predictions (500) or of a duration (30s, 15m, 2h, 1d) \\[default: at most 50 equal windows of 20 or more].", show_default=False)] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML page with plots here.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the report here instead of standard output.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON instead of Markdown.")] = False,
    max_disagreement: Annotated[float | None, typer.Option("--max-disagreement", min=0.0, max=1.0, help="Exit 1 when the upper end of the 95% Wilson interval of the disagreement is above this.", show_default=False)] = None,
) -> None:
    """Report a rollout's audit log: disagreement over time with its bound, confusion, latency, gate decisions, field metrics.

    Exit 0 when done (and within --max-disagreement), 1 above it, 2 on bad input (nothing written), 3 on an internal error.
    Every file is written whole or not at all.
    """
    from edgecc.pilot import ReportOptions, check_output, report, write_atomic

    def work() -> Any:
        for target in (out, html):
            if target is not None:
                check_output(target, log, labels)
        result = report(log, ReportOptions(labels=labels, ok_class=ok_class, window=window,
                                           max_disagreement=max_disagreement))
        if html is not None:
            write_atomic(html, result.html())
        if out is not None:
            write_atomic(out, (dumps(result.to_json(), indent=2) + "\n") if as_json else result.markdown())
        return result

    result = _run(work)
    if out is None and as_json:
        stdout.print_json(dumps(result.to_json()))
    elif out is None:
        stdout.print(result.markdown(), markup=False, emoji=False, highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(EXIT_BUDGET)


@app.command()
def tune(
    target: TargetOpt,
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe TOML file; its \\[tune] table, if any, is the search space.", show_default=False)],
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="Trials to finish, resumed ones included \\[default: the recipe's tune.trials, 20].", show_default=False)] = None,
    time_budget: Annotated[float | None, typer.Option("--time-budget", min=0.0, help="Stop starting trials after this many seconds.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the study (study.sqlite3: run again to resume), trials/, pareto.md/.json/.html and best.toml.")] = Path("build") / "tune",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Run the trials on this Ray cluster (`local`: start one here); needs edgecc\\[scale].", show_default=False)] = None,
    cache: Annotated[Path, typer.Option("--cache", help="The build cache: the teacher is trained once and kept there, and each trial's stages too.")] = DEFAULT_CACHE,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print pareto.json on stdout.")] = False,
) -> None:
    """Search the recipe's compression space for the Pareto front of task metric against the target's estimated
    latency, flash and RAM, and write the chosen configuration as best.toml (needs edgecc\\[scale]). A new
    study's first trial is the recipe as written, so the search starts from it. The choice: the fastest trial that
    meets every budget; of trials as fast (within 2%) whose task metric the validation split cannot tell apart
    (one standard error), the smaller file.

    Exit 0 when a trial meets every budget, 1 when none does (the closest are listed), 2 on bad input,
    130 when interrupted (the study keeps every finished trial: run the same command to resume).
    """
    from edgecc.shadow import Interrupted
    from edgecc.tune import TuneOptions
    from edgecc.tune import tune as run_tune

    options = TuneOptions(target=target, recipe=recipe, out=out, cache=cache, trials=trials,
                          time_budget_s=time_budget, ray_address=ray_address)

    def work() -> Any:
        try:
            return run_tune(options, Reporter(quiet=quiet or as_json))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {out / 'study.sqlite3'} keeps every finished trial: run the same "
                              "command to resume") from None

    result = _run(work)
    if as_json:
        stdout.print_json(dumps(loads((out / "pareto.json").read_text(encoding="utf-8"))))
    elif not quiet:
        stdout.print(f"{len(result.rows)} trials, {len(result.front)} on the Pareto front; wrote {out}/pareto.md, "
                     "pareto.html, pareto.json" + (", best.toml" if result.chosen else ""), markup=False)
    if result.chosen is None:
        for row in result.closest:
            _say(f"edgecc: closest: trial {row['number']} fails {row['failed']} budget(s): "
                 + ", ".join(b["name"] for b in row["budgets"] if b["status"] != "pass"))
        _say("edgecc: budget not met: no trial meets every budget")
        raise typer.Exit(EXIT_BUDGET)
    if not quiet and not as_json:
        chosen = result.chosen
        stdout.print(f"chosen: trial {chosen['number']}: {chosen['task_metric']:.4f}, {chosen['latency_ms']:.3g} ms "
                     f"estimated; edgecc build --target {target} --recipe {out / 'best.toml'}", markup=False)


@app.command()
def verify(
    build_dir: Annotated[Path, typer.Argument(help="An edgecc build directory (with its manifest.json).", show_default=False)],
    public_key: Annotated[Path | None, typer.Option("--public-key", help="Check manifest.sig against this Ed25519 public key (edgecc-signing.pub) first.", show_default=False)] = None,
) -> None:
    """Check every artifact of a build against the sha256 its manifest.json recorded, reading nothing outside it.

    Exit 0 when all match, 1 when the signature is bad or missing (with --public-key), or any file changed, is
    missing, lies outside the build or is not in the manifest; 2 when there is no readable manifest.json or key.
    """
    from edgecc.verify import verify as run_verify

    result = _run(lambda: run_verify(build_dir, public_key=public_key))
    _print_findings(result)
    if result.ok:
        stdout.print(f"all {len(result.matched)} artifacts match {build_dir / 'manifest.json'}", markup=False)
    if result.authenticated:
        stdout.print(f"manifest.json is signed by {public_key}", markup=False)
    else:
        stdout.print("manifest.json's authenticity was not checked (no --public-key); it is "
                     + ("signed (manifest.sig)" if result.signed else "not signed"), markup=False)
    if not result.ok:
        raise typer.Exit(EXIT_BUDGET)


def _print_findings(result: Verification) -> None:
    """One line per artifact of a `Verification` that is not as the manifest says, and per unlisted file."""
    lines = [(result.tampered, "tampered: {} (outside the build folder; not opened)"),
             (result.changed, "changed: {} (its sha256 is not the one in manifest.json)"),
             (result.missing, "missing: {}"),
             (result.unlisted, "unlisted: {} (in the build folder, not in manifest.json)")]
    for names, line in lines:
        for name in names:
            stdout.print(line.format(name if name and name.isprintable() else json.dumps(name)), markup=False)


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for edgecc-signing.key (private, mode 0600) and edgecc-signing.pub.")],
) -> None:
    """Make an Ed25519 key pair for signing builds (never overwrites a key)."""
    from edgecc.sign import generate_keys

    private, public = _run(lambda: generate_keys(out))
    stdout.print(f"wrote {private} (keep it secret: edgecc sign BUILD --key {private}) and {public} "
                 f"(give it out: edgecc verify BUILD --public-key {public})", markup=False)


@app.command()
def sign(
    build_dir: Annotated[Path, typer.Argument(help="An edgecc build directory.", show_default=False)],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (edgecc-signing.key from edgecc keygen).", show_default=False)],
) -> None:
    """Sign an existing build: writes manifest.sig, after checking that every artifact matches its manifest.

    Exit 0 when signed, 1 when the build does not verify (nothing written), 2 on a bad key or build directory.
    """
    from edgecc.sign import load_private_key, sign_manifest
    from edgecc.verify import verify as run_verify

    signing_key = _run(lambda: load_private_key(key))
    result = _run(lambda: run_verify(build_dir))
    _print_findings(result)
    if not result.ok:
        stdout.print(f"not signed: {build_dir} does not match its manifest.json", markup=False)
        raise typer.Exit(EXIT_BUDGET)
    signature = _run(lambda: sign_manifest(build_dir, signing_key))
    stdout.print(f"wrote {signature}: manifest.json and its {len(result.matched)} artifacts signed", markup=False)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _internal_error(err: BaseException) -> int:
    """A bug (or a failure edgecc did not foresee): one line for the user, the traceback in a file for the report."""
    text = "".join(traceback.format_exception(err))
    if debug:
        sys.stderr.write(text)
    log = Path(tempfile.gettempdir()) / f"edgecc-internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text(f"edgecc {edgecc.__version__}\nargs: {sys.argv[1:]}\n\n{text}", encoding="utf-8")
        where = f"the traceback is in {log}"
    except OSError as write_err:
        where = f"the traceback could not be saved ({write_err.strerror}; run again with --debug to see it)"
    message = one_line(err) or "(no message)"
    _say(f"edgecc: internal error: {type(err).__name__}: {message}; {where}; please report it")
    return EXIT_INTERNAL


def _exit_code() -> int:
    """Run the app and map every way it can end to a documented exit code."""
    try:
        code = app(prog_name="edgecc", standalone_mode=False)  # typer.Exit comes back as its code
        sys.stdout.flush()  # a write that fails here (disk full) is an error, not Python's exit status 120
        return code if isinstance(code, int) else 0
    except typer.TyperException as err:  # click's usage errors, shown as typer shows them (exit 2)
        typer.rich_utils.rich_format_error(err)
        return err.exit_code
    except typer.Abort as err:  # typer turns an EOFError into Abort; edgecc never prompts, so that is a bug
        return _internal_error(err.__cause__) if isinstance(err.__cause__, EOFError) else EXIT_INTERRUPTED
    except EdgeccError as err:  # raised outside _run
        _say(f"edgecc: error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        return _internal_error(err)


def main() -> None:
    """Console-script entry point; SIGTERM unwinds like Ctrl-C so partial output is removed."""
    signal.signal(signal.SIGTERM, _terminate)
    code = _exit_code()
    try:
        sys.stdout.flush()
    except OSError:  # stdout is gone or full: drop what is left, or Python's exit would turn `code` into 120
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    main()
