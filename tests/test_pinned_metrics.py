"""A fixed-seed short run of several recipes must give the metrics pinned in
tests/data/pinned_metrics.json: refactors and speed-ups may not change results.

The pins were written before the build-once refactor (issue 12) on the tiny fixture models.
A change that is meant to change results regenerates them with ``KDRL_REPIN=1 pytest
tests/test_pinned_metrics.py`` and says why in its commit message.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from kdrl.config import load_config
from kdrl.trainer import train

PINS = Path(__file__).parent / "data" / "pinned_metrics.json"
# Recipes that cover every sampling source and teacher kind: student, teacher (sft), mixed
# (gkd), the self-teacher (opsd), failed-group actions (ampo, ghpo), token selection (tip),
# the ratio anchor (rlad), the full-vocabulary and sampled KD terms, and KD in the advantage.
RECIPES = ["kdrl", "grpo", "sft", "opd", "kdrl_k2", "gkd", "opsd", "ampo", "ghpo", "tip", "rlad", "scope"]
# Wall-clock figures differ run to run; everything else must not.
UNPINNED_PREFIXES = ("time_", "tokens_per_second")


def _run_metrics(recipe: str, overrides: list[str]) -> list[dict]:
    overrides = overrides + ["reward.functions=[kdrl_test_rewards:char_parity]", "reward.correct_threshold=1.0"]
    if recipe == "sft":
        overrides.append("objective.nll_rows=all")
    summary = train(load_config(Path("recipes") / f"{recipe}.yaml", overrides))
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if not key.startswith(UNPINNED_PREFIXES)}
            for record in records]


def _close(pinned, measured, key: str) -> bool:
    if isinstance(pinned, float) or isinstance(measured, float):
        if not (isinstance(pinned, (int, float)) and isinstance(measured, (int, float))):
            return False
        if math.isnan(pinned) and math.isnan(measured):
            return True
        return math.isclose(pinned, measured, rel_tol=1e-4, abs_tol=1e-6)
    return pinned == measured


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_fixed_seed_metrics_are_pinned(recipe, tiny_overrides):
    measured = _run_metrics(recipe, tiny_overrides)
    if os.environ.get("KDRL_REPIN"):
        pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
        pins[recipe] = measured
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        pytest.skip("pins rewritten")
    pinned = json.loads(PINS.read_text())[recipe]
    assert len(measured) == len(pinned), [r.get("kind") for r in measured]
    for line, (want, got) in enumerate(zip(pinned, measured)):
        assert set(want) == set(got), f"{recipe} line {line}: keys differ: {set(want) ^ set(got)}"
        bad = {key: (want[key], got[key]) for key in want if not _close(want[key], got[key], key)}
        assert not bad, f"{recipe} line {line} (step {want.get('step')}): pinned vs measured {bad}"
