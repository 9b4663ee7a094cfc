"""The bundled demo: a one-token-per-character tokenizer, a tiny Qwen2 teacher and student.

``prepare_demo(out_dir)`` builds the whole bundle from nothing (no downloads):

    out_dir/teacher/   Qwen2ForCausalLM (safetensors) + tokenizer + generation_config
    out_dir/student/   a smaller, on purpose undertrained Qwen2 with the same tokenizer
    out_dir/data/      train.jsonl, test_id.jsonl, test_ood.jsonl (kdrl.tasks.sums)
    out_dir/manifest.json

Both models learn the running-sums task (kdrl/tasks/sums.py) by plain supervised
fine-tuning on ``prompt + solution + eos`` of its ``sft`` pool, with the loss on the
response tokens only (``sft``).  The teacher is trained until it is good but imperfect; the
student is stopped early, while it writes the answer format but gets few sums right,
so that RL and distillation have something to improve.  No chat template: the prompt
text is exactly what the model sees before its response.  Each model is evaluated
greedily by ``kdrl.evaluate`` with the hf rollout engine (``bundle.evaluate``).

    tiny_models.py  the tokenizer and the freshly initialised models (also the tests' fixtures)
    specs.py        model sizes and training budgets per scale (full: the shipped bundle; toy)
    sft.py          the SFT loop with its early stop
    bundle.py       prepare_demo: data, training, evaluation, manifest
    command.py      the command line

Command line: ``python -m kdrl.demo --out kdrl/assets/demo [--seed 0] [--scale full|toy]``.
"""
from kdrl.demo.bundle import evaluate, prepare_demo
from kdrl.demo.specs import ROLES, SCALES, ModelSpec, TrainSpec
from kdrl.demo.sft import sft_loss, train_sft
from kdrl.demo.tiny_models import EOS_TOKEN, PAD_TOKEN, build_tokenizer, make_model, num_params

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "ROLES", "SCALES", "ModelSpec", "TrainSpec", "build_tokenizer", "evaluate",
           "make_model", "num_params", "prepare_demo", "sft_loss", "train_sft"]
