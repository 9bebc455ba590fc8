"""report.md: the build's manifest rendered for people."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def markdown(manifest: dict[str, Any]) -> str:
    """A readable summary; every figure comes from the manifest, which stays the record."""
    m, metrics, pre = manifest["model"], manifest["metrics"], manifest["preprocessing"]
    lat = metrics["host_latency"]
    lines = [
        f"# edgecc build: {manifest['recipe']['name']} for {manifest['target']['name']}",
        "",
        f"{manifest['target']['description']}. Built {manifest['created']} by edgecc {manifest['edgecc_version']}, "
        f"seed {manifest['seed']}.",
        "",
        "## Result",
        "",
        "| | float TFLite | int8 TFLite |",
        "|---|---|---|",
        f"| accuracy on the test split ({manifest['data']['test_size']} examples) | "
        f"{metrics['float_accuracy']:.4f} | {metrics['int8_accuracy']:.4f} |",
        f"| file size | {_kib(metrics['float_tflite_bytes'])} | {_kib(metrics['int8_tflite_bytes'])} "
        f"({metrics['size_ratio']:.2f}x smaller) |",
        f"| host latency, median of {lat['int8']['runs']} runs, {lat['int8']['threads']} thread | "
        f"{lat['float']['median_ms']:.3f} ms | {lat['int8']['median_ms']:.3f} ms |",
        "",
        f"Host latency was measured on this build machine ({metrics['host']}), both models interleaved in one "
        "process; it is not a prediction for the target.",
        "",
        "## Budgets",
        "",
        "| budget | measured | limit | verdict | how it was found |",
        "|---|---|---|---|---|",
    ]
    for b in manifest["budgets"]:
        value = f"{b['value']:.4g}" if isinstance(b["value"], float) else b["value"]
        lines.append(f"| {b['name']} | {value} | {b['limit']} | {b['status']} | {b['detail']} |")
    lines += [
        "",
        "## Model",
        "",
        f"{m['source']}, {m['parameters']:,} parameters; compression stages: {', '.join(m['stages'])}. "
        f"Activation tensor types in model.tflite: {', '.join(m['activation_dtypes'])}.",
        "",
        "| op | count |",
        "|---|---|",
        *(f"| {op} | {n} |" for op, n in m["ops"].items()),
        "",
        "## Running model.tflite",
        "",
        f"- raw input: {pre['raw']}; layout {pre['layout']}, model input shape {pre['model_input_shape']}",
        f"- float input: x = raw * {pre['scale']} + {pre['offset']}",
        f"- int8 input: q = clip(round(x / {pre['input_quantization']['scale']}) + "
        f"{pre['input_quantization']['zero_point']}, -128, 127)",
        f"- output: {pre['output']} (int8, scale {pre['output_quantization']['scale']}, zero point "
        f"{pre['output_quantization']['zero_point']})",
        f"- labels: {', '.join(pre['label_names'])}",
        "",
        "manifest.json holds these figures, the test split, library versions and the sha256 of every artifact.",
        "",
    ]
    return "\n".join(lines)


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
