"""Does a .tflite model fit a target? Arena/RAM, flash, latency and operators against the budgets.

Works on any TFLite model, not only edgecc's, and never imports TensorFlow, so
it runs on a CI runner or on the board itself.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgecc.arena import ArenaMeasurement, ArenaPart, abort_cause, arena_split, measure_arena
from edgecc.cost import op_costs
from edgecc.emit import loads
from edgecc.errors import EdgeccError
from edgecc.latency import ERROR_BAND, LatencyEstimate, estimate_latency
from edgecc.liveness import MemoryPlan, plan_memory
from edgecc.memplan import carried_plan_bytes
from edgecc.reader import Graph, read_graph
from edgecc.targets import Target, load_target

INT_TYPES = {"INT8", "UINT8", "INT16", "INT32", "INT64", "BOOL"}
SINGLE_GRAPH = "the file as one graph: what edgetpu_compiler alone does with it"
PIPELINE_SCOPE = ("the pipeline an edgecc bundle runs: the model lowered (edgecc.lower), its Edge TPU segments "
                  "co-compiled, its CPU islands on the host")


@dataclass(frozen=True)
class Budget:
    """One budget: the figure, its limit and whether it holds.

    An estimate whose error band holds the limit is `uncertain`: the model may or may not fit, and
    `ok` says how the caller chose to count it (assess's `uncertain_passes`).
    """

    name: str
    value: float
    limit: float
    unit: str
    ok: bool
    detail: str
    uncertain: bool = False

    @property
    def verdict(self) -> str:
        return "uncertain" if self.uncertain else "holds" if self.ok else "exceeded"


@dataclass(frozen=True)
class Assessment:
    target: Target
    model_bytes: int
    graph: Graph
    total_macs: int
    float_tensors: tuple[str, ...]
    missing_ops: tuple[str, ...]
    memory: MemoryPlan
    arena: ArenaMeasurement | None
    arena_failure: str | None  # why the TFLite Micro interpreter could not measure the arena (then it is planned)
    latency: LatencyEstimate
    placement: tuple[str, ...]  # per operator: "cpu", "edgetpu" or "npu"
    edgetpu: Any | None  # the file as one graph: what edgetpu_compiler alone does with it (edgecc.edgetpu)
    vela: Any | None
    budgets: tuple[Budget, ...]
    pipeline: Any | None = None  # Edge TPU targets: the segments the bundle runs, which the verdict judges (edgecc.lower)
    arena_parts: tuple[ArenaPart, ...] = ()  # the measured arena split: where the RAM goes (edgecc.arena)

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.budgets)

    @property
    def verdict(self) -> str:
        """'does not fit' when a budget is exceeded for certain, else 'uncertain' when an estimate's band holds
        a limit, else 'fits'."""
        if any(not b.ok and not b.uncertain for b in self.budgets):
            return "does not fit"
        return "uncertain" if any(b.uncertain for b in self.budgets) else "fits"

    def to_json(self) -> dict[str, Any]:
        lat = self.latency
        return {
            "target": self.target.name,
            "runtime": self.target.runtime,
            "ok": self.ok,
            "verdict": self.verdict,
            "budgets": [asdict(b) | {"verdict": b.verdict} for b in self.budgets],
            "model_bytes": self.model_bytes,
            "operators": len(self.graph.operators),
            "total_macs": self.total_macs,
            "ops": self.graph.op_counts(),
            "missing_ops": list(self.missing_ops),
            "activation_lower_bound_bytes": self.memory.lower_bound_bytes,
            "activation_plan_bytes": self.memory.planned_bytes,
            "arena": asdict(self.arena) if self.arena else None,
            "arena_failure": self.arena_failure,
            "arena_split": [asdict(p) for p in self.arena_parts],
            "latency": {"estimate_ms": lat.total_ms, "low_ms": lat.low_ms, "high_ms": lat.high_ms,
                        "method": lat.method},
            "edgetpu": edgetpu_json(self.edgetpu),
            "edgetpu_pipeline": pipeline_json(self.pipeline),
            "vela": {k: v for k, v in asdict(self.vela).items() if k != "model"} if self.vela else None,
        }


def edgetpu_json(plan: Any | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    data = {"scope": SINGLE_GRAPH, **asdict(plan)}
    data.pop("compiled_model")
    data["reasons"] = {str(k): v for k, v in plan.reasons.items()}
    return data


def pipeline_json(pipeline: Any | None) -> dict[str, Any] | None:
    """The pipeline's figures as pipeline.json has them, without the per-segment tensor indices."""
    if pipeline is None:
        return None
    data = {"scope": PIPELINE_SCOPE, **pipeline.to_json()}
    data["segments"] = [{k: v for k, v in s.items() if k not in ("inputs", "outputs")} for s in data["segments"]]
    del data["inputs"], data["outputs"]
    return data


def read_model(path: Path) -> tuple[bytes, float | None]:
    """The model bytes of a .tflite file or a build directory, and the build's own latency budget if any."""
    if path.is_dir():
        model = path / "model.tflite"
        if not model.is_file():
            raise EdgeccError(f"{path} is a directory without a model.tflite (not an edgecc build directory)")
        budget = None
        manifest = path / "manifest.json"
        if manifest.is_file():
            try:
                budget = loads(manifest.read_text(encoding="utf-8")).get("latency_budget_ms")
            except (ValueError, AttributeError):  # JSONDecodeError, NaN, bad UTF-8; a manifest that is no object
                raise EdgeccError(f"{manifest} is not valid JSON") from None
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
                raise EdgeccError(f"{manifest}: latency_budget_ms is {budget!r}, not a number of milliseconds")
        return model.read_bytes(), budget or None
    if not path.is_file():
        raise EdgeccError(f"{path} does not exist")
    return path.read_bytes(), None


def crossing_bytes(graph: Graph, on_tpu: tuple[bool, ...]) -> int:
    """Activation bytes that go over the host link between Edge TPU and CPU operators."""
    producer = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}
    crossing = {t for i, op in enumerate(graph.operators) for t in op.inputs
                if t in producer and on_tpu[producer[t]] != on_tpu[i]}
    return sum(graph.tensors[t].nbytes for t in crossing)


def _float_tensors(graph: Graph) -> tuple[str, ...]:
    """Float activations; not the token ids a float32 table lookup hands only to CASTs to integers (how
    edgecc.graphpass gives TFLite Micro's GATHER an id map: whole numbers, no float arithmetic)."""
    to_int = [op.kind == "CAST" and graph.tensors[op.outputs[0]].dtype in INT_TYPES for op in graph.operators]
    cast_only = ({i for op, cast in zip(graph.operators, to_int) if cast for i in op.inputs}
                 - {i for op, cast in zip(graph.operators, to_int) if not cast for i in op.inputs}
                 - set(graph.inputs) - set(graph.outputs))
    activations = {i for op in graph.operators for i in op.outputs} | set(graph.inputs)
    return tuple(t.name for i, t in enumerate(graph.tensors)
                 if i in activations and i not in cast_only and not t.constant and t.dtype not in INT_TYPES)


# the custom operators LiteRT's BuiltinOpResolver registers (tensorflow/lite/core/kernels/register.cc, AddCustom)
LITERT_CUSTOM_OPS = frozenset({"AudioSpectrogram", "Mfcc", "NumericVerify", "TFLite_Detection_PostProcess"})


def _missing_ops(graph: Graph, target: Target) -> tuple[str, ...]:
    """Operators the target's runtime lacks, builtins by name and custom operators as CUSTOM:<name>; an empty
    `legal_ops` means every builtin.

    A custom operator needs a kernel registered under its name. A stock runtime registers a few
    (`stock_custom_ops`: an SSD's TFLite_Detection_PostProcess everywhere); any other needs a kernel
    linked into the application, which no stock build has, so it is reported as missing. The Edge
    TPU's partition (edgecc.edgetpu) judges its operators itself.
    """
    if target.runtime == "edgetpu":
        return ()
    builtins = {op.kind for op in graph.operators if op.kind != "CUSTOM"}
    custom = {op.custom_code for op in graph.operators if op.kind == "CUSTOM"}
    lacking = sorted(builtins - set(target.legal_ops)) if target.legal_ops else []
    return tuple(lacking + [f"CUSTOM:{name or '(unnamed)'}" for name in sorted(custom - stock_custom_ops(target))])


def stock_custom_ops(target: Target) -> frozenset[str]:
    """The custom operators the target's runtime registers by name: TFLite Micro's MicroMutableOpResolver the ones
    edgecc.micro lists, LiteRT the four of LITERT_CUSTOM_OPS."""
    if target.is_micro:
        from edgecc.micro import CUSTOM_METHODS

        return frozenset(CUSTOM_METHODS)
    return LITERT_CUSTOM_OPS


def _mac_share(costs: list[Any], on_tpu: tuple[bool, ...]) -> float:
    macs = sum(c.macs for c in costs)
    return sum(c.macs for c, on in zip(costs, on_tpu) if on) / macs if macs else 0.0


def _single_graph_line(plan: Any, costs: list[Any]) -> str:
    total, on = len(plan.on_tpu), sum(plan.on_tpu)
    return (f"{on} of {total} operators ({on / max(total, 1):.0%}) and {_mac_share(costs, plan.on_tpu):.1%} of the "
            f"MACs run on the Edge TPU, {total - on} on the CPU ({plan.method})")


def _edgetpu_operators(plan: Any, costs: list[Any]) -> Budget:
    """The operators budget of an Edge TPU target: what leaves the Edge TPU, which must not be everything."""
    total = len(plan.on_tpu)
    off = total - sum(plan.on_tpu)
    if plan.rejected:
        return Budget("operators", off, 0, "ops off the Edge TPU", False, f"the Edge TPU compiler would reject "
                      f"this model: {plan.rejected}; nothing runs on the Edge TPU ({plan.method})")
    where = _single_graph_line(plan, costs)
    if off == total:
        return Budget("operators", off, total - 1, "ops off the Edge TPU", False,
                      f"no operator runs on the Edge TPU: {where}; first: {plan.reasons.get(0, '')}")
    return Budget("operators", off, total - 1, "ops off the Edge TPU", True, where)


def pipeline_line(pipeline: Any) -> str:
    """What runs where in the pipeline, for people."""
    on, total = pipeline.edgetpu_operators, pipeline.operators
    return (f"pipeline the bundle runs (edgecc.lower; each segment maps whole by the compiler's documented rules): "
            f"{pipeline.edgetpu_segments} Edge TPU segment(s) co-compiled and "
            f"{len(pipeline.segments) - pipeline.edgetpu_segments} CPU island(s); {on} of {total} operators "
            f"({on / max(total, 1):.0%}) and {pipeline.edgetpu_mac_share:.1%} of the MACs on the Edge TPU; parameters "
            f"{pipeline.cached_parameter_bytes:,} B cached on chip, {pipeline.streamed_parameter_bytes:,} B streamed; "
            f"{pipeline.crossing_bytes:,} B of activations cross the host link")


def _pipeline_operators(pipeline: Any, plan: Any, costs: list[Any]) -> Budget:
    """The operators budget judged on the pipeline, with what edgetpu_compiler alone would do with the file beside it."""
    single = (f"the Edge TPU compiler would reject it whole: {plan.rejected}" if plan.rejected
              else _single_graph_line(plan, costs))
    on, total = pipeline.edgetpu_operators, pipeline.operators
    return Budget("operators", total - on, total - 1, "ops off the Edge TPU", on > 0,
                  f"{pipeline_line(pipeline)}. The file as one graph (edgetpu_compiler alone): {single}")


def _mac_share_budget(share: float, minimum: Any, scope: str) -> Budget:
    """The profile's least share of MACs on the Edge TPU, counted as the MACs left off it (a ceiling like the rest)."""
    off, limit = round(100 * (1 - share), 2), round(100 * (1 - minimum.value), 2)
    return _budget("MACs off the Edge TPU", off, limit, "%", f"{share:.1%} of the MACs run on the Edge TPU ({scope}); "
                   f"the profile's edgetpu.min_mac_share is {minimum.value:g}")


def edgetpu_pipeline(content: bytes, graph: Graph, target: Target, float_tensors: tuple[str, ...]) -> Any | None:
    """The pipeline edgecc.lower makes of a fully-int8, single-graph model of builtin operators (what edgecc builds),
    else None: a model with float or custom parts, or state, is judged as the one graph the compiler sees.
    `float_tensors` is _float_tensors(graph), which assess has already found."""
    if (float_tensors or any(op.kind == "CUSTOM" for op in graph.operators)
            or any(t.variable for t in graph.tensors)):
        return None
    from edgecc.lower import split_for_edgetpu

    return split_for_edgetpu(content, target)


def arena_line(parts: tuple[ArenaPart, ...]) -> str:
    """Where the measured TFLite Micro arena goes, for people."""
    return ("TFLite Micro arena " + f"{sum(p.bytes for p in parts):,} B = "
            + " + ".join(f"{p.name} {p.bytes:,} B" for p in parts) + f" ({parts[2].name}: {parts[2].detail})")


def _budget(name: str, value: float, limit: float, unit: str, detail: str) -> Budget:
    return Budget(name, value, limit, unit, value <= limit, detail)


def assess(content: bytes, target: str | Target, latency_ms: float | None = None,
           measure_arena: bool = True, *, uncertain_passes: bool = False) -> Assessment:
    """Profile `content` on `target` and judge every budget.

    `latency_ms` overrides the target's default latency budget; `measure_arena`
    runs the real TFLite Micro interpreter for microcontroller targets. A latency
    limit inside the estimate's error band is uncertain, and fails unless
    `uncertain_passes`: a gate that holds only when the model fits even at the
    band's slow end.
    """
    target = load_target(target) if isinstance(target, str) else target
    graph = read_graph(content)
    float_tensors = _float_tensors(graph)
    # an Edge TPU's host runs float pre/post-processing and custom operators on its CPU (edgecc.edgetpu says which)
    if target.int8_only and float_tensors and target.runtime != "edgetpu":
        raise EdgeccError(f"a float model given to an int8-only target: {target.name} ({target.runtime}) runs "
                          f"only fully-int8 models, and {len(float_tensors)} activation tensors are float "
                          f"(first: {float_tensors[0]})")
    missing = _missing_ops(graph, target)
    custom = {op.custom_code for op in graph.operators if op.kind == "CUSTOM"}
    if target.runtime != "edgetpu" and not missing and custom <= LITERT_CUSTOM_OPS:
        # LiteRT, the reference runtime, resolves every operator, version and tensor type or says which not; what it
        # refuses is invalid for TFLite Micro too, which does not check operator versions itself, but for a field
        # TFLite Micro reads its own way (tflite_edit.one_dimension_quantized_along_it) and the custom operators only
        # TFLite Micro has (its Signal* audio front end), which its own interpreter judges when it measures the arena
        from edgecc.runtime import load_interpreter
        from edgecc.tflite_edit import one_dimension_quantized_along_it

        load_interpreter(one_dimension_quantized_along_it(content) if target.is_micro else content)
    # TFLite Micro cannot allocate a model with an operator it lacks: then the arena is estimated, not measured
    arena_worker = _ArenaWorker(content) if measure_arena and target.is_micro and not missing else None
    costs = op_costs(graph)
    memory = plan_memory(graph)

    placement = ["cpu"] * len(graph.operators)
    edgetpu_plan = vela_result = pipeline = None
    on_tpu: tuple[bool, ...] | None = None
    streamed, invokes = 0, 1
    if target.edgetpu is not None:
        from edgecc.edgetpu import plan_edgetpu

        edgetpu_plan = plan_edgetpu(graph, target.edgetpu, target.legal_ops, content)
        pipeline = edgetpu_pipeline(content, graph, target, float_tensors)
        if pipeline is not None:  # the sum over the segments: each invoked, what crosses between them over the link
            on_tpu, invokes = pipeline.on_tpu_of_given(), pipeline.edgetpu_segments
            streamed = pipeline.streamed_parameter_bytes + pipeline.crossing_bytes
        else:
            on_tpu = edgetpu_plan.on_tpu
            streamed = edgetpu_plan.streamed_parameter_bytes + crossing_bytes(graph, on_tpu)
        placement = ["edgetpu" if on else "cpu" for on in on_tpu]
    latency = estimate_latency(graph, costs, target, on_tpu, streamed, invokes=invokes)
    if pipeline is not None:
        latency = replace(latency, method=f"{latency.method}; summed over the pipeline's {len(pipeline.segments)} "
                          f"segments, each of its {invokes} Edge TPU segment(s) invoked, with "
                          f"{streamed:,} B per inference over the host link (streamed parameters and crossings)")
    if target.ethosu is not None:
        from edgecc.vela import compile_for_ethos_u

        vela_result = compile_for_ethos_u(content, target.ethosu)
        placement = ["cpu" if op.kind in vela_result.cpu_ops else "npu" for op in graph.operators]
        cpu_ms = sum(o.ms for o, where in zip(latency.ops, placement) if where == "cpu")
        total = vela_result.latency_ms + cpu_ms
        latency = LatencyEstimate(total, total * (1 - ERROR_BAND), total * (1 + ERROR_BAND), vela_result.latency_ms, latency.ops,
                                  f"Vela {vela_result.vela_version} performance estimate for the NPU part + "
                                  f"per-operator estimate for operators on the CPU")
    arena, arena_failure = arena_worker.result() if arena_worker else (None, None)
    if arena_failure:
        arena_failure = abort_cause(graph) or arena_failure
    parts = tuple(arena_split(arena, memory.lower_bound_bytes, carried_plan_bytes(content, graph))) if arena else ()

    budgets = _budgets(target, len(content), graph, memory, arena, arena_failure, missing, vela_result)
    budgets.append(_latency_budget(latency, latency_ms, target, uncertain_passes))
    if edgetpu_plan is not None and target.edgetpu is not None:
        operators = (_pipeline_operators(pipeline, edgetpu_plan, costs) if pipeline is not None
                     else _edgetpu_operators(edgetpu_plan, costs))
        budgets = [operators if b.name == "operators" else b for b in budgets]
        if target.edgetpu.min_mac_share is not None:
            share, scope = ((pipeline.edgetpu_mac_share, "the pipeline the bundle runs") if pipeline is not None
                            else (_mac_share(costs, edgetpu_plan.on_tpu), f"the file as one graph, {edgetpu_plan.method}"))
            budgets.insert(1, _mac_share_budget(share, target.edgetpu.min_mac_share, scope))
    return Assessment(target, len(content), graph, sum(c.macs for c in costs), float_tensors, missing, memory,
                      arena, arena_failure, latency, tuple(placement), edgetpu_plan, vela_result, tuple(budgets),
                      pipeline, parts)


class _ArenaWorker:
    """TFLite Micro measurement running in the background while the rest is computed."""

    def __init__(self, content: bytes) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="edgecc-arena-")
        path = Path(self._dir.name) / "model.tflite"
        path.write_bytes(content)
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1)
        self._future = self._pool.submit(measure_arena, path)

    def result(self) -> tuple[ArenaMeasurement | None, str | None]:
        """The measurement, or None and why the interpreter could not give one (the arena is then planned)."""
        try:
            return self._future.result(), None
        except EdgeccError as err:
            return None, str(err)
        finally:
            self._pool.shutdown()
            self._dir.cleanup()


def _budgets(target: Target, model_bytes: int, graph: Graph, memory: MemoryPlan, arena: ArenaMeasurement | None,
             arena_failure: str | None, missing: tuple[str, ...], vela: Any | None) -> list[Budget]:
    """Operators, RAM and flash; the latency budget is _latency_budget's."""
    mem = target.memory
    budgets = []
    if missing:
        budgets.append(Budget("operators", len(missing), 0, "ops", False,
                              f"{target.runtime} on {target.name} lacks: {', '.join(missing)}"))
    elif arena_failure:  # what stops the interpreter here stops it on the board
        budgets.append(Budget("operators", 1, 0, "ops", False,
                              f"the TFLite Micro interpreter cannot run this model: {arena_failure}"))
    else:
        budgets.append(Budget("operators", 0, 0, "ops", True, f"every operator is available in {target.runtime}"))
    if vela is not None:
        ram = vela.sram_bytes + mem.runtime_ram_bytes.value
        ram_detail = f"Vela SRAM plan {vela.sram_bytes:,} B + runtime {mem.runtime_ram_bytes.value:,.0f} B"
        flash = vela.flash_bytes + mem.runtime_flash_bytes.value
        flash_detail = f"Vela-compiled model {vela.flash_bytes:,} B + runtime code {mem.runtime_flash_bytes.value:,.0f} B"
        assert target.ethosu is not None
        budgets.append(_budget("NPU SRAM", vela.sram_bytes, target.ethosu.sram_bytes.value, "bytes",
                               f"Vela {vela.vela_version}, {target.ethosu.accelerator_config}"))
    elif target.arena is not None:
        measured = arena.bytes if arena else memory.planned_bytes
        how = ("measured with the TFLite Micro interpreter" if arena else "estimate: edgecc's activation plan, not "
               "measured" + (f" (the TFLite Micro interpreter could not run the model: {arena_failure})"
                             if arena_failure else ""))
        margin = target.arena.margin(measured)
        ram = measured + margin + mem.runtime_ram_bytes.value
        ram_detail = (f"tensor arena {measured:,} B {how} + kernel margin {margin:,.0f} B + "
                      f"runtime {mem.runtime_ram_bytes.value:,.0f} B")
        flash = model_bytes + mem.runtime_flash_bytes.value
        flash_detail = f"model {model_bytes:,} B + runtime code {mem.runtime_flash_bytes.value:,.0f} B"
    else:
        weights = sum(t.nbytes for t in graph.tensors if t.constant)
        ram = mem.runtime_ram_bytes.value + model_bytes + weights + memory.planned_bytes
        ram_detail = (f"estimate: runtime {mem.runtime_ram_bytes.value:,.0f} B + model file {model_bytes:,} B + "
                      f"repacked weights {weights:,} B + activation plan {memory.planned_bytes:,} B")
        flash = model_bytes + mem.runtime_flash_bytes.value
        flash_detail = f"model {model_bytes:,} B + runtime {mem.runtime_flash_bytes.value:,.0f} B"
    budgets.append(_budget("RAM", ram, mem.ram_bytes.value, "bytes", ram_detail))
    budgets.append(_budget("flash", flash, mem.flash_bytes.value, "bytes", flash_detail))
    return budgets


def _latency_budget(latency: LatencyEstimate, latency_ms: float | None, target: Target, uncertain_passes: bool) -> Budget:
    """Holds when even the band's slow end is within the limit, exceeded when its fast end is above it."""
    limit = latency_ms if latency_ms is not None else target.latency_budget_ms.value
    source = "--latency-ms" if latency_ms is not None else f"{target.name}'s default budget"
    uncertain = latency.low_ms <= limit < latency.high_ms
    return Budget("latency", latency.total_ms, limit, "ms", latency.high_ms <= limit or (uncertain and uncertain_passes),
                  f"{latency.method}; band {latency.low_ms:.3g}-{latency.high_ms:.3g} ms; limit from {source}", uncertain)
