"""A seeded fuzz campaign on the committed fixtures (no TensorFlow): malformed models never pass or crash a command."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
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
