"""A seeded fuzz campaign on the committed fixtures (no TensorFlow): malformed models never pass or crash a command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_models  # noqa: E402
from fuzz_models import FIXTURES, MUTATIONS, SEEDS, campaign  # noqa: E402

MUTANTS = 2 * len(MUTATIONS)  # every kind of mutation, twice
COMMANDS = ("check-rpi4", "check-stm32h7", "bench")  # the others: the full campaign (BENCHMARKS.md)


def test_malformed_models_are_refused_without_tracebacks_crashes_or_hangs() -> None:
    tally = campaign(MUTANTS, seed=7, models=[FIXTURES / s for s in SEEDS], commands=COMMANDS, log=lambda row: None)
    assert tally.mutants == MUTANTS
    assert tally.refused_by_litert > MUTANTS // 2  # the mutations are real: most break the model
    assert tally.failures == []
    for command in COMMANDS:  # and valid mutants (the re-pack control, flips in weights) still pass
        assert tally.counts[command]["exit 2"] > 0 and tally.counts[command]["exit 0"] + tally.counts[command]["exit 1"] > 0


def test_a_campaign_longer_than_a_workers_life_runs_every_mutant_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers are replaced by a fresh pool per batch (Python 3.11's own replacement hangs): nothing lost, no twice."""
    monkeypatch.setattr(fuzz_models, "WORKER_MUTANTS", 2)  # batches of 2 workers x 2 mutants: 3 pools for 9 mutants
    rows: list[str] = []
    tally = campaign(9, seed=7, models=[FIXTURES / s for s in SEEDS], commands=("verify",), log=rows.append)
    assert tally.mutants == 9 and sorted(json.loads(row)["index"] for row in rows) == list(range(9))
