"""benchmarks/gpu_check.py on CPU: the paper's shapes, the widened tokenizer, the no-GPU exit, and
the whole 3-step flow with the hf engine on tiny shapes (the vllm engine's run is in test_rollout_vllm)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import gpu_check  # noqa: E402


def test_paper_shapes_have_the_papers_parameter_counts():
    """DeepSeek-R1-Distill-Qwen-1.5B has 1,777,088,000 parameters; Qwen2.5-7B 7.62B (7.61B with the
    student's 151,936-row vocabulary)."""
    from transformers import Qwen2ForCausalLM

    tokenizer = gpu_check.widened_tokenizer(512)
    counts = {}
    for name in ("student", "teacher"):
        config = gpu_check.qwen2_config(gpu_check.SHAPES["paper"][name], 151936, tokenizer)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert counts["student"] == 1_777_088_000
    assert counts["teacher"] == 7_614_699_008
    assert all(shape["hidden_size"] // shape["num_attention_heads"] == 128
               for shape in (gpu_check.SHAPES["paper"]["student"], gpu_check.SHAPES["paper"]["teacher"]))


def test_widened_tokenizer_keeps_the_bundled_ids():
    from kdrl.demo import build_tokenizer

    tokenizer, bundled = gpu_check.widened_tokenizer(1024), build_tokenizer()
    assert len(tokenizer) == 1024
    text = "Compute 12+7*3. \\boxed{33}"
    assert tokenizer(text)["input_ids"] == bundled(text)["input_ids"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (bundled.pad_token_id, bundled.eos_token_id)
    assert len(tokenizer.decode([1023])) > 1  # an unreachable multi-symbol entry still decodes


def test_without_cuda_it_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.NO_CUDA
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_three_kdrl_steps_on_tiny_shapes_with_the_hf_engine(tmp_path, capsys):
    status = gpu_check.main(["--shapes", "tiny", "--device", "cpu", "--engines", "hf", "--prompts", "2",
                             "--group-size", "4", "--max-new-tokens", "12", "--micro-batch-size", "4",
                             "--out", str(tmp_path)])
    assert status == 0
    result = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert result["engine"] == "hf" and len(result["steps"]) == 3
    assert all(step["response_tokens"] > 0 and step["time_generate"] > 0 for step in result["steps"])
    assert result["loss_bf16"] != result["loss_fp32"] and result["loss_matches"]  # bf16 really ran
    assert "| hf |" in (tmp_path / "results.md").read_text()
