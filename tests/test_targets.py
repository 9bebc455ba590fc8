from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from conftest import edgecc
from edgecc.check import assess
from edgecc.errors import EdgeccError
from edgecc.targets import Figure, all_targets, builtin_names, load_target
from test_cli import assert_clean_failure

TARGETS = Path(__file__).parents[1] / "targets"
MODEL = Path(__file__).parent / "fixtures" / "vit_int8.tflite"


def profile(tmp_path: Path, base: str, **values: str) -> Path:
    """A copy of built-in profile `base` with each named figure's value (every occurrence) replaced."""
    text = (TARGETS / f"{base}.toml").read_text()
    for name, value in values.items():
        text, count = re.subn(rf"^{name} = {{ value = [^,]+,", f"{name} = {{ value = {value},", text, flags=re.M)
        assert count, name
    path = tmp_path / f"my-{base}.toml"
    path.write_text(text)
    return path


def figures(obj: object) -> list[Figure]:
    found = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, Figure):
            found.append(value)
        elif dataclasses.is_dataclass(value):
            found += figures(value)
    return found


def test_rpi4_profile() -> None:
    rpi4 = load_target("rpi4")
    assert rpi4.runtime == "litert-xnnpack"
    assert rpi4.cpu.cores.value == 4 and rpi4.cpu.clock_mhz.value == 1500
    assert "Cortex-A72" in rpi4.cpu.core


@pytest.mark.parametrize("name", builtin_names())
def test_every_figure_cites_a_source(name: str) -> None:
    for figure in figures(load_target(name)):
        assert len(figure.source) > 20, figure


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(EdgeccError, match=r"unknown target 'rpi9'; known targets: .*rpi4"):
        load_target("rpi9")


def test_user_profile_file_and_its_errors(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "targets" / "rpi4.toml").read_text()
    mine = tmp_path / "mine.toml"
    mine.write_text(text.replace('name = "rpi4"', 'name = "mine"'))
    assert load_target(str(mine)).name == "mine"
    mine.write_text(text.replace("value = 4,", "value = 'four',"))
    with pytest.raises(EdgeccError, match=r"cpu.cores.value: expected an integer, got 'four'"):
        load_target(str(mine))
    mine.write_text(text.replace('runtime = "litert-xnnpack"', 'runtime = "pytorch"'))
    with pytest.raises(EdgeccError, match="runtime: 'pytorch' is not one of"):
        load_target(str(mine))


def test_all_targets_load() -> None:
    assert [t.name for t in all_targets()] == builtin_names()


def test_figures_that_divide_or_count_refuse_zero_nan_and_infinity(tmp_path: Path) -> None:
    path = profile(tmp_path, "rpi4", bandwidth_gbps="0", ram_bytes="inf", clock_mhz="nan", cores="0",
                   flash_bytes="-inf", latency_budget_ms="0.0", runtime_ram_bytes="nan")
    with pytest.raises(EdgeccError) as err:
        load_target(str(path))
    message = str(err.value)
    for expected in ("memory.bandwidth_gbps.value: 0.0 must be above 0", "memory.ram_bytes.value: inf is not a finite",
                     "cpu.clock_mhz.value: nan is not a finite", "cpu.cores.value: 0 is below the minimum 1",
                     "memory.flash_bytes.value: -inf is not a finite", "latency_budget_ms.value: 0.0 must be above 0",
                     "memory.runtime_ram_bytes.value: nan is not a finite"):
        assert expected in message
    with pytest.raises(EdgeccError, match=r"cpu\.cores\.value: expected an integer, got 2\.5"):
        load_target(str(profile(tmp_path, "rpi4", cores="2.5")))


def test_edge_tpu_figures(tmp_path: Path) -> None:
    with pytest.raises(EdgeccError) as err:
        load_target(str(profile(tmp_path, "coral-usb", tops="0", link_gbps="0", onchip_bytes="-1")))
    message = str(err.value)
    for expected in ("edgetpu.tops.value: 0.0 must be above 0", "edgetpu.link_gbps.value: 0.0 must be above 0",
                     "edgetpu.onchip_bytes.value: -1.0 is below the minimum 0.0"):
        assert expected in message


def test_an_old_profile_with_retired_figures_is_refused_naming_them(tmp_path: Path) -> None:
    """Figures no estimate reads any more are refused, not ignored: tuning them would change nothing."""
    path = tmp_path / "old.toml"
    text = (Path(__file__).parents[1] / "targets" / "coral-usb.toml").read_text()
    path.write_text(text.replace("[cpu]\n", '[cpu]\nint8_gmacs = { value = 28.5, source = "old" }\n')
                    .replace("[edgetpu]\n", '[edgetpu]\nmac_efficiency = { value = 0.5, source = "old" }\n'))
    with pytest.raises(EdgeccError) as err:
        load_target(str(path))
    assert str(err.value) == (f"{path}: cpu.int8_gmacs, edgetpu.mac_efficiency: no longer read (latency is estimated "
                              "from clock_mhz, cores, bandwidth_gbps and kernels with coefficients fitted on published "
                              "measurements); delete them")


def test_an_unknown_kernel_library_is_refused_by_field(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    text = (Path(__file__).parents[1] / "targets" / "stm32l4r5.toml").read_text()
    path.write_text(text.replace("[cpu]\n", '[cpu]\nkernels = "cmsis-nn-2026"\n'))
    with pytest.raises(EdgeccError, match=r"cpu\.kernels: 'cmsis-nn-2026' is not one of"):
        load_target(str(path))


@pytest.mark.parametrize(("base", "zeros"), [
    ("rpi4", ("runtime_ram_bytes", "runtime_flash_bytes")),
    ("coral-usb", ("runtime_ram_bytes", "runtime_flash_bytes", "onchip_bytes")),
])
def test_every_figure_that_may_be_zero_gives_a_finite_estimate(tmp_path: Path, base: str,
                                                               zeros: tuple[str, ...]) -> None:
    path = profile(tmp_path, base, **dict.fromkeys(zeros, "0"))
    path.write_text(path.read_text().replace("int8_only = false", "int8_only = true"))
    fit = assess(MODEL.read_bytes(), load_target(str(path)))
    assert math.isfinite(fit.latency.total_ms) and fit.latency.total_ms > 0


@pytest.mark.parametrize(("figures", "fragment"), [
    ({"bandwidth_gbps": "0"}, "memory.bandwidth_gbps.value: 0.0 must be above 0"),
    ({"ram_bytes": "inf"}, "memory.ram_bytes.value: inf is not a finite number"),
    ({"clock_mhz": "nan"}, "cpu.clock_mhz.value: nan is not a finite number"),
], ids=["bandwidth-0", "ram-inf", "rate-nan"])
def test_check_refuses_a_bad_profile(tmp_path: Path, figures: dict[str, str], fragment: str) -> None:
    path = profile(tmp_path, "rpi4", **figures)
    before = set(tmp_path.rglob("*"))
    assert_clean_failure(edgecc("check", str(MODEL), "--target", str(path), cwd=tmp_path), fragment, tmp_path, before)


def test_build_refuses_a_bad_profile_and_writes_nothing(tmp_path: Path) -> None:
    path = profile(tmp_path, "rpi4", bandwidth_gbps="0")
    before = set(tmp_path.rglob("*"))
    result = edgecc("build", "--target", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(result, "memory.bandwidth_gbps.value: 0.0 must be above 0", tmp_path, before)
