"""Target device profiles: TOML files under `targets/`, every figure with its source.

Profiles are data, not code: adding a board means adding a TOML file. A figure
is written as `{ value = ..., source = "..." }` so that no number enters a
report without saying where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgecc import schema
from edgecc.errors import EdgeccError
from edgecc.schema import spec

RUNTIMES = ("litert-xnnpack", "tflite-micro", "edgetpu", "ethos-u")


@dataclass(frozen=True)
class Figure:
    """A number and the public source it was taken from (or how it was derived)."""

    value: float = spec(minimum=0.0)
    source: str = spec()


@dataclass(frozen=True)
class Cpu:
    core: str = spec(doc="processor core, e.g. Cortex-A72")
    cores: Figure = spec()
    clock_mhz: Figure = spec()


@dataclass(frozen=True)
class Memory:
    ram_bytes: Figure = spec(doc="RAM available on the smallest variant of the board")
    storage_bytes: Figure = spec(doc="where the model file lives (flash or SD card)")
    bandwidth_gbps: Figure = spec(doc="main-memory bandwidth in GB/s")


@dataclass(frozen=True)
class Target:
    name: str = spec()
    description: str = spec()
    runtime: str = spec(choices=RUNTIMES)
    cpu: Cpu = spec()
    memory: Memory = spec()


def _builtin_dir() -> Path:
    return Path(str(resources.files("edgecc.builtin_targets")))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """A built-in profile by name, or a user's profile TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if name_or_path not in builtin_names():
            known = ", ".join(builtin_names())
            raise EdgeccError(f"unknown target {name_or_path!r}; known targets: {known}")
        path = _builtin_dir() / f"{name_or_path}.toml"
    return schema.load(Target, path, "target profile")


def all_targets() -> list[Target]:
    return [load_target(name) for name in builtin_names()]
