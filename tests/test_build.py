"""The interfaces build() and the loop promise to engines, teachers and the objective: engines are
made through the registry and follow the student after every optimizer step; the objective hears
every update and its state survives a checkpoint; the final evaluation reaches the logger."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrl import checkpoint as ckpt
from kdrl.config import load_config
from kdrl.objective import Objective
from kdrl.rollout import ENGINES, make_engine, register_engine
from kdrl.rollout.hf import HFRolloutEngine
from kdrl.teachers import LocalTeacher

RECIPES = Path(__file__).parent.parent / "recipes"


class RecordingEngine(HFRolloutEngine):
    """The hf engine, counting sync_weights calls (registered by "module:attribute", imported lazily)."""

    synced: list[torch.nn.Module] = []

    def sync_weights(self, model: torch.nn.Module) -> None:
        RecordingEngine.synced.append(model)


@pytest.fixture
def recording_engine():
    RecordingEngine.synced = []
    register_engine("recording", "test_build:RecordingEngine")
    yield RecordingEngine
    ENGINES.pop("recording")


def test_student_engine_is_synced_after_build_and_every_optimizer_step(tiny_overrides, recording_engine):
    from kdrl.build import build
    from kdrl.trainer import training_step

    config = load_config(RECIPES / "grpo.yaml", tiny_overrides + ["train.updates_per_batch=2"])
    config.rollout.engine = "recording"
    run = build(config)
    assert isinstance(run.student_engine, RecordingEngine)
    assert recording_engine.synced == [run.student]  # once after build: an engine starts from these weights
    training_step(run)
    training_step(run)
    assert len(recording_engine.synced) == 1 + 2 * 2  # two optimizer steps per batch
    assert all(model is run.student for model in recording_engine.synced)


def test_unknown_engine_names_the_available_ones():
    with pytest.raises(ValueError, match=r"rollout.engine: unknown engine 'nope' \(available: hf"):
        make_engine("nope")


class CountingObjective(Objective):
    """Counts the updates it heard; its count is its state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates, self.heard, self.restored = 0, [], None

    def after_update(self, metrics):
        self.updates += 1
        self.heard.append(dict(metrics))

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.restored = dict(state)
        self.updates = state.get("updates", 0)


def test_objective_hears_every_update_and_its_state_is_checkpointed(tiny_overrides, tmp_path, monkeypatch):
    import kdrl.build
    from kdrl.build import build
    from kdrl.trainer import save, training_step

    monkeypatch.setattr(kdrl.build, "Objective", CountingObjective)
    run = build(load_config(RECIPES / "kdrl.yaml", tiny_overrides))
    training_step(run)
    training_step(run)
    assert run.objective.updates == 2
    assert all("loss" in heard and "grad_norm" in heard and "skipped" in heard for heard in run.objective.heard)
    path = save(run)
    assert ckpt.load_trainer_state(path)["objective"] == {"updates": 2}
    resumed = build(load_config(run.run_dir / "config.yaml"), resume=run.run_dir)
    assert resumed.objective.restored == {"updates": 2} and resumed.step == 2


def test_fixed_teachers_keep_no_state():
    teacher = LocalTeacher(torch.nn.Linear(2, 2))
    assert teacher.state_dict() == {}
    teacher.load_state_dict({})
    teacher.after_update()


def test_final_evaluation_goes_through_the_logger(tiny_overrides, monkeypatch):
    from kdrl.logger import MetricsLogger
    from kdrl.trainer import train

    calls = []
    log, close = MetricsLogger.log, MetricsLogger.close
    monkeypatch.setattr(MetricsLogger, "log", lambda self, step, metrics, kind="train":
                        (calls.append((kind, step, sorted(metrics)[:1])), log(self, step, metrics, kind))[1])
    monkeypatch.setattr(MetricsLogger, "close", lambda self: (calls.append(("close",)), close(self))[1])
    train(load_config(RECIPES / "grpo.yaml", tiny_overrides))
    kinds = [call[0] for call in calls]
    assert kinds == ["train", "train", "train", "eval", "close"]
    assert calls[3][1] == 3 and calls[3][2] == ["test/accuracy"]  # the held-out set, at the last step
