"""The committed .tflite fixtures are what scripts/make_fixtures.py makes from this code."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import FIXTURES, needs_train_extra
from edgecc.reader import read_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_fixtures_match_what_the_script_makes_now() -> None:
    needs_train_extra()
    from make_fixtures import models

    for name, content in models().items():
        committed, fresh = read_graph((FIXTURES / f"{name}.tflite").read_bytes()), read_graph(content)
        assert [op.kind for op in committed.operators] == [op.kind for op in fresh.operators], name
        assert [(t.dtype, t.shape) for t in committed.tensors] == [(t.dtype, t.shape) for t in fresh.tensors], name
