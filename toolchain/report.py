"""The build's manifest rendered for people (report.md, report.html) and check verdicts for CI (JUnit)."""

from __future__ import annotations

import base64
import html as html_lib
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any


Block = tuple[str, Any]  # ("p", text) | ("table", (header, rows)) | ("list", items) | ("image", (key, caption))
#                         | ("svg", (markup, caption))
EMPTY_ERROR_PLOT = ("the per-operator error plot is empty: every int8 operator output's error against the float "
                    "teacher is 0 (no operator output could be matched by tensor name, or every output agrees exactly), "
                    "so the report cannot show where int8 loses precision")


def final_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage record of model.tflite, the model the build chose (recipe compress.select)."""
    return next(r for r in records if r["file"] == "model.tflite")


def errors_all_zero(errors: list[dict[str, Any]]) -> bool:
    """True when the per-operator error plot would have no bar to show."""
    return not any(e["relative_rms_error"] for e in errors)


def budget_line(budget: dict[str, Any]) -> str:
    """'int8 accuracy is 0.9167, limit >= 0.95': one budget's figure rounded for people."""
    unit = budget["unit"]
    return f"{budget['name']} is {_quantity(budget['value'], unit)}, limit {_limit(budget['limit'], unit)}"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _quantity(value: float | None, unit: str) -> str:
    """A figure with its unit, 4 significant digits; 'not measured' for None."""
    if value is None:
        return "not measured"
    if unit == "bytes":
        return _kib(int(value)) if value < 2**20 else f"{value / 2**20:.2f} MiB"
    return f"{value:.4g} {unit}".strip()


def _limit(limit: str, unit: str) -> str:
    """'<= 1073741824' -> '<= 1024.00 MiB' for byte budgets; other limits as written."""
    relation, _, number = limit.partition(" ")
    return f"{relation} {_quantity(float(number), unit)}" if unit else limit


def _edgetpu_section(plan: dict[str, Any], pipeline: dict[str, Any] | None) -> list[tuple[str, list[Block]]]:
    """What the bundle's pipeline runs where (Edge TPU targets), then which operators leave the Edge TPU and why when
    model.tflite is compiled as one graph (on the build's target, or on coral-usb for other targets)."""
    reasons = Counter(plan["reasons"].values()).most_common()
    on_tpu = sum(plan["on_tpu"])
    single = [("p", f"{on_tpu} of {len(plan['on_tpu'])} operators run on the Edge TPU in {plan['segments']} segment(s) "
                    f"({plan['method']}); {plan['cached_parameter_bytes']:,} parameter bytes are cached on the chip and "
                    f"{plan['streamed_parameter_bytes']:,} streamed from the host every inference."),
              ("table", (["why an operator runs on the CPU", "operators"], [[why, str(n)] for why, n in reasons]))]
    if pipeline is None:
        return [(f"Operators that leave the Edge TPU ({plan['target']})", single)]
    return [(f"Edge TPU pipeline ({plan['target']}): what the bundle runs", [
        ("p", f"{pipeline['edgetpu_operators']} of {pipeline['operators']} operators "
              f"({pipeline['edgetpu_operator_share']:.0%}) and {pipeline['edgetpu_mac_share']:.1%} of the MACs run on "
              f"the Edge TPU in {pipeline['edgetpu_segments']} segment(s), co-compiled (`{pipeline['compile']}`); "
              f"{pipeline['cpu_segments']} CPU island(s) run on the host. Parameters: "
              f"{pipeline['cached_parameter_bytes']:,} bytes cached on the chip, "
              f"{pipeline['streamed_parameter_bytes']:,} streamed every inference; "
              f"{pipeline['crossing_bytes']:,} bytes of activations cross the host link between segments. run.py "
              "runs the segments in order (pipeline.json)."),
        ("table", (["segment", "runs on", "operators", "MACs", "parameter bytes", "cached", "streamed"], [
            [s["file"], s["device"], str(s["operators"]), f"{s['macs']:,}", f"{s['parameter_bytes']:,}",
             f"{s['cached_parameter_bytes']:,}", f"{s['streamed_parameter_bytes']:,}"] for s in pipeline["segments"]])),
    ]), ("model.tflite as one graph: what edgetpu_compiler alone does with it", single)]


def _arena_blocks(manifest: dict[str, Any]) -> list[Block]:
    """The measured TFLite Micro arena split into its parts, and what edgecc's memory planner did (micro targets)."""
    parts = manifest["target_check"].get("arena_split") or []
    plan = manifest["model"].get("memory_plan")
    blocks: list[Block] = []
    if plan:
        arenas = plan["arena_bytes"]
        blocks.append(("p", (f"edgecc's offline memory plan is in model.tflite (the OfflineMemoryAllocation metadata "
                             f"TFLite Micro reads): activations {plan['planned_bytes']['chosen_order']:,} B, lower bound "
                             f"{plan['lower_bound_bytes']['chosen_order']:,} B"
                             + ("; operators reordered." if plan["reordered"] else "; the converter's order kept.")
                             if plan["written"] else f"No offline memory plan in model.tflite: {plan['refused']}.")
                            + (f" TFLite Micro arena measured without the plan {arenas['without_plan']:,} B, with it "
                               f"{arenas['with_plan']:,} B." if arenas["with_plan"] is not None else "")))
    if parts:
        total = sum(p["bytes"] for p in parts)
        blocks.append(("table", (["part of the TFLite Micro arena", "bytes", "share", "what it is"],
                                 [[p["name"], f"{p['bytes']:,}", f"{p['bytes'] / max(total, 1):.0%}", p["detail"]]
                                  for p in parts])))
    return blocks


def _figure(value: float | None, digits: int = 3) -> str:
    """A share rounded for people; 'n/a' where it is undefined (a class with no examples or no predictions)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _warnings_section(warnings: list[str]) -> list[tuple[str, list[Block]]]:
    """First in the report: what a person must see before trusting the accuracy figure."""
    return [("Warnings", [("list", warnings)])] if warnings else []


def _classes_section(records: list[dict[str, Any]]) -> list[tuple[str, list[Block]]]:
    """Per-class figures and confusion matrix of the final model, and the class-balanced figures of every model."""
    final = final_record(records)
    classes = final["classes"]
    names = [c["name"] for c in classes["per_class"]]
    return [(f"Per class ({final['name']}, {final['file']})", [
        ("p", f"Accuracy {_figure(classes['accuracy'], 4)}, balanced accuracy (mean recall over classes) "
              f"{_figure(classes['balanced_accuracy'], 4)}, macro-F1 {_figure(classes['macro_f1'], 4)}; always "
              f"predicting the most frequent test class, '{classes['majority_class']}', would score "
              f"{_figure(classes['majority_baseline'], 4)}."),
        ("table", (["class", "test examples", "predicted", "precision", "recall", "F1"], [
            [c["name"], str(c["support"]), str(c["predicted"]), _figure(c["precision"]), _figure(c["recall"]),
             _figure(c["f1"])] for c in classes["per_class"]])),
        ("p", "Confusion matrix: each row is a true class, each column the class the model predicted."),
        ("table", (["true class", *names],
                   [[name, *(str(n) for n in row)] for name, row in zip(names, classes["confusion"])])),
        ("image", ("confusion", "Confusion matrix of the final model, each cell coloured by its share of the row")),
        ("p", "Every model of the build on the same test split; the warnings of a stage between the teacher and "
              "the final model are listed in its manifest entry (metrics.stages[].classes.warnings)."),
        ("table", (["model", "accuracy", "balanced accuracy", "macro-F1", "worst class recall", "warnings"], [
            [r["name"], _figure(r["classes"]["accuracy"], 4), _figure(r["classes"]["balanced_accuracy"], 4),
             _figure(r["classes"]["macro_f1"], 4),
             _figure(min((c["recall"] for c in r["classes"]["per_class"] if c["recall"] is not None), default=None)),
             str(len(r["classes"]["warnings"]))] for r in records])),
    ])]


def _error_blocks(errors: list[dict[str, Any]]) -> list[Block]:
    """The per-operator error plot, or why there is none."""
    if errors_all_zero(errors):
        return [("p", f"No plot: {EMPTY_ERROR_PLOT}.")]
    return [("image", ("layer_error", "Relative RMS error of each int8 operator output against the float teacher")),
            ("p", "Each bar compares one operator's output in model.tflite with the same tensor of the float teacher "
                  "on test examples; a step up shows where precision is lost. For a pruned or distilled student "
                  "that is compression and int8 rounding together; outputs that pruning narrowed are left out.")]


def _stages_section(manifest: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    """Every distinct model of the build once, which one became model.tflite and why."""
    records, selection = manifest["metrics"]["stages"], manifest["selection"]
    metric = manifest["metrics"]["task_metric"]["name"]
    extra = [metric.replace("_", " ")] if metric != "accuracy" else []
    target = manifest["target"]["name"]
    validated = "validation" in records[0]
    rows = []
    for st in records:
        on_target = "-" if "target_latency_ms" not in st else f"{st['target_latency_ms']:.4g} ms"
        verdict = "-" if "meets_budgets" not in st else _yes(st["meets_budgets"])
        if validated and "meets_budgets" in st:
            verdict = f"{_yes(st['validation']['meets_budgets'])} / {verdict}"
        host = f"{st['host_latency_ms']:.3f} ms"
        if "speedup_vs_float" in st:
            host += f" ({st['speedup_vs_float']:.2f}x float)"
        chosen_on = [_figure(st["validation"]["task_metric"], 4)] if validated else []
        rows.append([st["name"], st["file"], *chosen_on, f"{st['accuracy']:.4f}",
                     *([_figure(st["task_metric"], 4)] if extra else []), on_target, verdict, _kib(st["bytes"]),
                     _kib(st["gzip_bytes"]), f"{st['parameters']:,}", host])
    met = ", ".join(selection["meeting_every_budget"]) or "none"
    judged = selection.get("judged_on_note", "test split")
    losses = _where_the_metric_goes(records, metric) if validated else []
    return [("Stages", [
        ("p", f"model.tflite is {selection['chosen']} (compress.select = '{selection['rule']}'), judged on the "
              f"{judged}: {selection['reason']}. Models that meet every budget there: {met}. The test figures "
              "are measured after the choice. A model that several stages produced byte for byte is one row naming "
              "them all."),
        ("table", (["model", "file", *([f"validation {metric.replace('_', ' ')}"] if validated else []),
                    "test accuracy", *[f"test {e}" for e in extra], f"estimated latency on {target}",
                    "every budget (validation / test)" if validated else "every budget", "size", "gzip", "parameters",
                    "host latency (1 thread)"], rows)),
        *losses,
        ("p", "Share of zeros in each int8 weight matrix of model.tflite (pruned weights are exact zeros; a dense "
              "matrix shows about 1%):"),
        ("table", (["weight tensor", "zeros"], [
            [name, f"{share:.1%}"] for name, share in final_record(records).get("weight_sparsity", {}).items()])),
    ])]


def _where_the_metric_goes(records: list[dict[str, Any]], metric: str) -> list[Block]:
    """Each model's validation figure before and after its int8 conversion: what the stage's training lost (the
    student against the teacher) apart from what rounding to int8 lost (the int8 model against the student)."""
    parts = [f"float teacher {_figure(records[0]['validation']['task_metric'], 4)}"]
    for st in records[1:]:
        student = st["validation"].get("student_task_metric")
        if student is not None:
            parts.append(f"{st['name']}: its student {_figure(student, 4)} before the conversion, "
                         f"{_figure(st['validation']['task_metric'], 4)} as int8")
    if len(parts) == 1:
        return []
    return [("p", f"Where the {metric.replace('_', ' ')} goes, on the validation split: " + "; ".join(parts)
                  + ". A student after `qat` is the quantization-aware model, whose rounding is simulated in float.")]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _teacher_source(teacher: dict[str, Any] | None) -> str:
    """Where the float teacher came from (edgecc build's teacher cache), so that a reused teacher is never a surprise."""
    if teacher is None:
        return ""
    where = {"trained": "trained in this build", "cache": f"from the teacher cache ({str(teacher.get('cache_key'))[:12]})",
             "given": f"given with --teacher ({teacher.get('path')})"}[teacher["source"]]
    return f"Float teacher: {where}, {teacher['seconds']:.0f} s."


def _first_difference(first: dict[str, Any] | None) -> str:
    """Where the two runtimes' outputs part, on the first test example where they do (micro_eval.first_difference)."""
    if not first or "operator" not in first:
        return ""
    steps = "step" if first["max_steps"] == 1 else "steps"
    cause = first.get("cause") or "the two runtimes' kernels round it differently"
    return (f" They first part at operator {first['operator']} ({first['kind']}) on test example {first['example']}: "
            f"{first['elements_differing']:,} of its {first['elements']:,} output elements differ, by at most "
            f"{first['max_steps']} quantization {steps} ({cause}; the operators before it agree bit for bit).")


def _micro_blocks(micro: dict[str, Any] | None, passes: dict[str, Any] | None) -> list[Block]:
    """The TFLite Micro interpreter's accuracy beside LiteRT's, and what the graph passes removed."""
    blocks: list[Block] = []
    if micro and "error" in micro:
        blocks.append(("p", f"TFLite Micro could not run model.tflite: {micro['error']}"))
    elif micro:
        blocks.append(("p", f"With the TFLite Micro interpreter (the board's kernels) the int8 accuracy is "
                            f"{micro['accuracy']:.4f} (LiteRT {micro['litert_accuracy']:.4f}): the same class on "
                            f"{micro['same_predictions']} of {micro['examples']} examples, bit-identical outputs on "
                            f"{micro['identical_outputs']}." + _first_difference(micro.get("first_difference"))))
    if passes and passes["rewrites"]:
        (ops_before, ops_after), (tensors_before, tensors_after) = passes["operators"], passes["tensors"]
        blocks.append(("p", f"Graph passes (bit-exact): {ops_before} -> {ops_after} operators, {tensors_before} -> "
                            f"{tensors_after} tensors ({', '.join(f'{k} x{v}' for k, v in passes['rewrites'].items())})."
                            + (f" Not all kept: {passes['skipped']}." if passes.get("skipped") else "")))
    return blocks


def _document(manifest: dict[str, Any]) -> tuple[str, list[tuple[str, list[Block]]]]:
    """The report's content once, as sections of blocks, for both the Markdown and the HTML rendering."""
    m, metrics, pre = manifest["model"], manifest["metrics"], manifest["preprocessing"]
    lat = metrics["host_latency"]
    title = f"edgecc build: {manifest['recipe']['name']} for {manifest['target']['name']}"
    budget_rows = [[b["name"], _quantity(b["value"], b["unit"]), _limit(b["limit"], b["unit"]), b["status"],
                    b["detail"]] for b in manifest["budgets"]]
    sections: list[tuple[str, list[Block]]] = [
        ("", [("p", f"{manifest['target']['description']}. Built {manifest['created']} by edgecc "
                    f"{manifest['edgecc_version']}, seed {manifest['seed']}.")]),
        *_warnings_section(manifest["warnings"]),
        ("Result", [
            ("table", (["", "float TFLite", "int8 TFLite"], [
                [f"accuracy on the test split ({manifest['data']['test_size']} examples)",
                 f"{metrics['float_accuracy']:.4f}", f"{metrics['int8_accuracy']:.4f}"],
                ["file size", _kib(metrics["float_tflite_bytes"]),
                 f"{_kib(metrics['int8_tflite_bytes'])} ({metrics['size_ratio']:.2f}x smaller)"],
                [f"host latency, median of {lat['int8']['runs']} runs, {lat['int8']['threads']} thread",
                 f"{lat['float']['median_ms']:.3f} ms", f"{lat['int8']['median_ms']:.3f} ms"],
            ])),
            ("p", f"Host latency was measured on this build machine ({metrics['host']}), both models interleaved "
                  "in one process; it is not a prediction for the target."),
            *_micro_blocks(metrics.get("tflite_micro"), m.get("graph_passes")),
            ("image", ("accuracy_vs_size", "Accuracy against size, per stage")),
        ]),
        *_stages_section(manifest),
        *_classes_section(metrics["stages"]),
        ("Budgets", [("table", (["budget", "measured", "limit", "verdict", "how it was found"], budget_rows))]),
        ("Where the time goes (estimate for the target)", [
            ("image", ("op_latency", "Estimated time per operator on the target")),
            ("p", manifest["target_check"]["latency"]["method"]),
        ]),
        ("Where the memory goes", [("image", ("live_memory", "Activation memory over the operator sequence")),
                                   *_arena_blocks(manifest)]),
        ("Where accuracy is lost", _error_blocks(manifest["quantization_error"])),
        ("Model", [
            ("p", f"{m['source']}, {m['parameters']:,} parameters; compression stages: {', '.join(m['stages'])}. "
                  f"Activation tensor types in model.tflite: {', '.join(m['activation_dtypes'])}. "
                  f"{_teacher_source(manifest.get('teacher'))}"),
            ("table", (["op", "count"], [[op, str(n)] for op, n in m["ops"].items()])),
        ]),
        ("Where the bytes go", [
            ("p", "Constant tensors of model.tflite (weights, embedding tables, id maps) by the layer they come "
                  "from; an encoder block's layers are summed."),
            ("table", (["part", "bytes", "share"], [
                [part, f"{n:,}", f"{n / metrics['int8_tflite_bytes']:.1%}"]
                for part, n in m.get("constant_bytes", {}).items()])),
        ]),
        *_edgetpu_section(manifest["edgetpu_partition"], manifest.get("edgetpu_pipeline")),
        ("Running model.tflite", [
            ("list", [
                f"raw input: {pre['raw']}; layout {pre['layout']}, model input shape {pre['model_input_shape']}",
                f"float input: x = raw * {pre['scale']} + {pre['offset']}",
                f"int8 input: q = clip(round(x / {pre['input_quantization']['scale']}) + "
                f"{pre['input_quantization']['zero_point']}, -128, 127)",
                f"output: {pre['output']} (int8, scale {pre['output_quantization']['scale']}, zero point "
                f"{pre['output_quantization']['zero_point']})",
                f"labels: {', '.join(pre['label_names'])}",
            ]),
            ("p", "manifest.json holds these figures, the test split, library versions and the sha256 of every "
                  "artifact; `edgecc verify` checks them."),
        ]),
    ]
    return title, sections


def markdown(manifest: dict[str, Any]) -> str:
    """report.md; the plots are in report.html."""
    return render_markdown(*_document(manifest))


def render_markdown(title: str, sections: list[tuple[str, list[Block]]], plots_in: str = "report.html") -> str:
    """Markdown of a document of sections (the build's report, the pilot report); `plots_in` names the HTML page."""
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        if heading:
            lines += [f"## {heading}", ""]
        for kind, content in blocks:
            if kind == "p":
                lines += [content, ""]
            elif kind == "list":
                lines += [*(f"- {item}" for item in content), ""]
            elif kind == "table":
                header, rows = content
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
            elif kind in ("image", "svg"):
                lines += [f"(plot in {plots_in}: {content[1]})", ""]
    return "\n".join(lines)


def html(manifest: dict[str, Any], images: dict[str, bytes]) -> str:
    """report.html: one self-contained file, its plots embedded as PNG data, no external resources."""
    return render_html(*_document(manifest), images)


def render_html(title: str, sections: list[tuple[str, list[Block]]], images: dict[str, bytes]) -> str:
    """One self-contained HTML page: "image" blocks embed `images[key]` as PNG data, "svg" blocks their own
    markup (generated by edgecc, not taken from input), so the page loads nothing and runs no script."""
    esc = html_lib.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for heading, blocks in sections:
        if heading:
            body.append(f"<h2>{esc(heading)}</h2>")
        for kind, content in blocks:
            if kind == "p":
                body.append(f"<p>{esc(content)}</p>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in content) + "</ul>")
            elif kind == "table":
                header, rows = content
                head = "".join(f"<th>{esc(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "image" and content[0] in images:
                data = base64.b64encode(images[content[0]]).decode("ascii")
                body.append(f'<figure><img alt="{esc(content[1])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{esc(content[1])}</figcaption></figure>")
            elif kind == "svg":
                body.append(f"<figure>{content[0]}<figcaption>{esc(content[1])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}img{max-width:100%}figcaption{color:#666;font-size:90%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def junit_xml(assessment: Any, path: Path) -> None:
    """The budgets as a JUnit test suite, one test case each, so CI systems show them as tests."""
    failures = [b for b in assessment.budgets if not b.ok]
    suite = ET.Element("testsuite", name=f"edgecc check {assessment.target.name}",
                       tests=str(len(assessment.budgets)), failures=str(len(failures)), errors="0")
    for b in assessment.budgets:
        case = ET.SubElement(suite, "testcase", classname=f"edgecc.{assessment.target.name}", name=b.name)
        if not b.ok:
            failure = ET.SubElement(case, "failure", message=f"{b.name} {b.value:g} {b.unit} exceeds {b.limit:g} {b.unit}")
            failure.text = b.detail
        ET.SubElement(case, "system-out").text = f"{b.value:g} {b.unit} (limit {b.limit:g}): {b.detail}"
    try:
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
    except OSError as err:
        from edgecc.errors import EdgeccError

        raise EdgeccError(f"cannot write the JUnit file {path}: {err.strerror}") from None
