from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgecc.errors import EdgeccError
from edgecc.targets import Figure, all_targets, builtin_names, load_target


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
    with pytest.raises(EdgeccError, match=r"cpu.cores.value: expected a number, got 'four'"):
        load_target(str(mine))
    mine.write_text(text.replace('runtime = "litert-xnnpack"', 'runtime = "pytorch"'))
    with pytest.raises(EdgeccError, match="runtime: 'pytorch' is not one of"):
        load_target(str(mine))


def test_all_targets_load() -> None:
    assert [t.name for t in all_targets()] == builtin_names()
