"""The `edgecc` command line: parses arguments and calls the library, nothing more.

Exit codes: 0 success, 1 a budget does not hold, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

import edgecc
from edgecc.errors import EdgeccError
from edgecc.progress import Reporter

T = TypeVar("T")
EXIT_BUDGET, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130

app = typer.Typer(
    help="edgecc: compress Keras transformers into fully-int8 TFLite models that fit edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"edgecc: error: {message}", markup=False, soft_wrap=True)
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
) -> None:
    """edgecc: compress Keras transformers into fully-int8 TFLite models that fit edge devices."""


@app.command()
def build(
    target: Annotated[str, typer.Option("--target", "-t", help="Target profile name (see `edgecc targets`) or a profile TOML file.")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe TOML file; the built-in digits recipe when omitted.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory [default: build/<target>].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")] = False,
) -> None:
    """Train (or load), compress to full int8 by the recipe's stages, evaluate, and write model.tflite,
    manifest.json, report.md.

    Exits 1 when a budget of the recipe does not hold (the artifacts are still written), 2 on bad input.
    """
    from edgecc.build import build as run_build

    result = _run(lambda: run_build(target, recipe, out, Reporter(quiet=quiet or as_json)))
    if as_json:
        stdout.print_json(json.dumps(result.manifest))
    elif not quiet:
        metrics = result.manifest["metrics"]
        stdout.print(
            f"accuracy float {metrics['float_accuracy']:.4f}, int8 {metrics['int8_accuracy']:.4f}; "
            f"int8 file {metrics['int8_tflite_bytes']:,} bytes ({metrics['size_ratio']:.2f}x smaller than float)"
        )
        stdout.print(f"wrote {result.out}/model.tflite, manifest.json, report.md")
    for budget in result.failed_budgets:
        Console(stderr=True, highlight=False).print(
            f"edgecc: budget not met: {budget['name']} is {budget['value']} {budget['unit']}".rstrip()
            + f", limit {budget['limit']}", markup=False)
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
        stdout.print_json(json.dumps([asdict(p) for p in profiles]))
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
    record: Annotated[Path, typer.Argument(help="Calibration record written by `edgecc bench --record`.", show_default=False)],
    model: Annotated[Path, typer.Argument(help="The .tflite model that record measured.", show_default=False)],
    target: Annotated[str, typer.Option("--target", "-t", help="The profile to fit (name or TOML file).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the calibrated profile TOML.")],
    name: Annotated[str | None, typer.Option("--name", help="Name of the new profile [default: <target>-calibrated].")] = None,
) -> None:
    """Write a profile whose latency estimates match what `edgecc bench` measured on the board."""
    from edgecc.calibrate import calibrate, write_profile
    from edgecc.targets import load_target

    def work() -> tuple[Any, float]:
        try:
            data = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EdgeccError(f"{record} is not a readable bench record: {err}") from None
        if not model.is_file():
            raise EdgeccError(f"{model} does not exist")
        profile, factor = calibrate(data, model.read_bytes(), load_target(target), name)
        write_profile(profile, out)
        return profile, factor

    profile, factor = _run(work)
    stdout.print(f"wrote {out}: {profile.name}, rates scaled by 1/{factor:.3g}; use it with --target {out}")


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
                record.write_text(json.dumps(result.to_json(), indent=2) + "\n")
            except OSError as err:
                raise EdgeccError(f"cannot write {record}: {err.strerror}") from None
        return result

    result = _run(work)
    if as_json:
        stdout.print_json(json.dumps(result.to_json()))
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


def _assess(model: Path, target: str, latency_ms: float | None) -> Any:
    from edgecc.check import assess, read_model

    def work() -> Any:
        content, build_budget = read_model(model)
        return assess(content, target, latency_ms if latency_ms is not None else build_budget)

    return _run(work)


def _figure(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1024:,.1f} KiB" if value < 2**20 else f"{value / 2**20:,.2f} MiB"
    if unit == "ms":
        return f"{value:,.3g} ms"
    return f"{value:g} {unit}"


@app.command()
def check(
    model: ModelArg,
    target: TargetOpt,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", min=0.0, help="Latency budget in ms [default: the build's recipe, else the target's].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON.")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="Also write the verdicts as a JUnit XML file for CI.")] = None,
) -> None:
    """Check that a model fits a target: operators, RAM (tensor arena), flash, latency.

    Exit 0 when every budget holds, 1 when any is exceeded, 2 on bad input.
    """
    result = _assess(model, target, latency_ms)
    if junit is not None:
        from edgecc.report import junit_xml

        _run(lambda: junit_xml(result, junit))
    if as_json:
        stdout.print_json(json.dumps(result.to_json()))
    else:
        table = Table("budget", "figure", "limit", "verdict", "how it was found", title=f"{model} on {result.target.name}")
        for b in result.budgets:
            verdict = "[green]holds[/green]" if b.ok else "[red]EXCEEDED[/red]"
            table.add_row(b.name, _figure(b.value, b.unit), _figure(b.limit, b.unit), verdict, b.detail)
        stdout.print(table)
        stdout.print("[green]fits[/green]" if result.ok else
                     "[red]does not fit[/red]: " + ", ".join(b.name for b in result.budgets if not b.ok))
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
        stdout.print_json(json.dumps({**result.to_json(), "operators": rows}))
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
    if result.edgetpu is not None:
        stdout.print(f"Edge TPU ({result.edgetpu.method}): {sum(result.edgetpu.on_tpu)} of {len(rows)} operators "
                     f"in {result.edgetpu.segments} segment(s)")
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
        "and optional integer labels `y` (then each model's accuracy is reported too)."))],
    log: Annotated[Path, typer.Option("--log", help="Append-only audit log (JSON Lines, one record per input).")] = Path("shadow-audit.jsonl"),
    max_disagreement: Annotated[float, typer.Option("--max-disagreement", min=0.0, max=1.0, help="Exit 1 when the share of inputs whose predicted classes differ is above this.")] = 0.01,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Shadow mode (the pilot): run a candidate beside the baseline on every input and log where they disagree.

    Exit 0 when the disagreement rate is at most --max-disagreement, 1 when above, 2 on bad input.
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
        stdout.print_json(json.dumps(summary.to_json()))
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


@app.command()
def verify(
    build_dir: Annotated[Path, typer.Argument(help="An edgecc build directory (with its manifest.json).", show_default=False)],
) -> None:
    """Check every artifact of a build against the sha256 its manifest.json recorded.

    Exit 0 when all match, 1 when any changed or is missing, 2 when there is no readable manifest.json.
    """
    from edgecc.verify import verify as run_verify

    result = _run(lambda: run_verify(build_dir))
    for name in result.changed:
        stdout.print(f"changed: {name} (its sha256 is not the one in manifest.json)", markup=False)
    for name in result.missing:
        stdout.print(f"missing: {name}", markup=False)
    if not result.ok:
        raise typer.Exit(EXIT_BUDGET)
    stdout.print(f"all {len(result.matched)} artifacts match {build_dir / 'manifest.json'}", markup=False)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point; SIGTERM unwinds like Ctrl-C so partial output is removed."""
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="edgecc")


if __name__ == "__main__":
    sys.exit(main())
