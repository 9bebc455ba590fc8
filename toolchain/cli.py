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
    """Train (or load), quantize to full int8, evaluate, and write model.tflite, manifest.json, report.md.

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
            f"edgecc: budget not met: {budget['name']} is {budget['value']}, limit {budget['limit']}", markup=False)
    if result.failed_budgets:
        raise typer.Exit(EXIT_BUDGET)


@app.command()
def targets(
    as_json: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False,
) -> None:
    """List the built-in target profiles."""
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


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point; SIGTERM unwinds like Ctrl-C so partial output is removed."""
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="edgecc")


if __name__ == "__main__":
    sys.exit(main())
