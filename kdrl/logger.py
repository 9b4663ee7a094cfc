"""Metrics: JSONL always; TensorBoard / Weights & Biases when asked; a progress bar; a PNG of the curves."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from kdrl.config import LogConfig


class MetricsLogger:
    """``enabled=False`` is the logger of every process but rank 0 (which alone writes): it does nothing."""

    def __init__(self, run_dir: Path, config: LogConfig, total_steps: int, initial_step: int = 0,
                 run_config: Optional[dict] = None, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled  # only the main process writes
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.tensorboard = None
        self.wandb = None
        self.progress = None
        if not enabled:
            return
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if config.wandb:
            import wandb

            self.wandb = wandb.init(project=config.wandb_project, dir=str(run_dir), config=run_config,
                                    resume="allow")
        if config.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                                 dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)

    def advance(self, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            shown = {k: metrics[k] for k in ("reward", "accuracy", "kd_value", "response_length") if k in metrics}
            self.progress.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.progress.update(1)

    def samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with self.samples_path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible
    return value


def truncate_metrics(run_dir: Path, step: int, final_step: Optional[int] = None) -> None:
    """On resume, drop records written after the checkpoint so the log reads as one run.

    A line cut short by a kill mid-write is dropped too. When ``step`` is the run's ``final_step``
    the resumed run evaluates once more (the final evaluation comes after the last checkpoint), so
    the evaluation records of that step are dropped: it is logged once, not twice.
    """
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                if record["step"] == step == final_step and record.get("kind") == "eval":
                    continue
                kept.append(line)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Reward, accuracy, KD and response-length curves of one run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = [("reward", "reward (train rollouts)"), ("accuracy", "accuracy"),
              ("kl_sampled", "KL(student || teacher), sampled"), ("response_length", "response length (tokens)")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for axis, (key, title) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            axis.plot(*zip(*points), label="train", lw=1)
        if key == "accuracy":
            for name in sorted({k for r in evals for k in r if k.endswith("/accuracy")}):
                eval_points = [(r["step"], r[name]) for r in evals if name in r]
                axis.plot(*zip(*eval_points), marker="o", label=name.replace("/accuracy", ""))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if key == "accuracy":
            axis.legend(fontsize=7)
    figure.tight_layout()
    out_path = Path(out) if out else Path(run_dir) / "curves.png"
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
