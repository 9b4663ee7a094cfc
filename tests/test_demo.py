"""The demo bundle: tokenizer, tiny models, prepare_demo, and the shipped assets."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.data import load_problems
from kdrl.demo import build_tokenizer, evaluate, make_model, num_params, prepare_demo
from kdrl.tasks import generate_problems, load_jsonl
from kdrl.tasks import sums

BUNDLE = Path(__file__).resolve().parents[1] / "kdrl" / "assets" / "demo"
TOY_PINS = Path(__file__).parent / "data" / "demo_toy_pins.json"

TEXTS = [
    "3+4*2-5=?\n",
    "3+4=7 7*2=4 4-5=9 \\boxed{9}",
    "  leading and trailing spaces  ",
    "\n\nnew\nlines\n\n",
    "tabs\tand {braces} \\frac{1}{2} <tag> ~!@#$%^&*()_+`-=[]|;':\",./?",
    "unicode: é ü 中文 ∑",
]


def _roundtrip(tok):
    for s in TEXTS:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        if s.isascii():
            assert len(ids) == len(s)  # one token per character
    for p in generate_problems("train", 50, seed=0) + sums.generate_problems("test_ood", 50, seed=0):
        text = p["prompt"] + p["solution"]
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_roundtrip():
    tok = build_tokenizer()
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 258
    _roundtrip(tok)
    ids = tok.encode("1+2=?\n", add_special_tokens=False)
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids  # nothing added
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "1+2=?\n"


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = prepare_demo(str(out), seed=0, scale="toy", log=lambda s: None)
    return out, manifest


def _load(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return tok, model


def test_prepare_demo_toy(toy_bundle):
    out, manifest = toy_bundle
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["seed"] == 0 and on_disk["scale"] == "toy"
    for split in ("train", "test_id", "test_ood"):
        rows = load_jsonl(out / "data" / f"{split}.jsonl")
        assert len(rows) == manifest["data"][split]["rows"] > 0
    for role in ("teacher", "student"):
        assert (out / role / "model.safetensors").exists()
        tok, model = _load(out / role)
        assert model.config.model_type == "qwen2"
        assert num_params(model) == manifest[role]["parameters"]
        _roundtrip(tok)  # the tokenizer AutoTokenizer rebuilds is the one we saved
        assert tok.encode("7*8=6", add_special_tokens=False) == build_tokenizer().encode("7*8=6", add_special_tokens=False)
        tok.padding_side = "left"
        enc = tok(["3+4=?\n", "1+2*3=?\n"], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
        width = enc["input_ids"].shape[1]
        assert gen.shape[0] == 2 and width < gen.shape[1] <= width + 4


def test_prepare_demo_is_reproducible(toy_bundle, tmp_path):
    out, _ = toy_bundle
    prepare_demo(str(tmp_path), seed=0, scale="toy", log=lambda s: None)
    for role in ("teacher", "student"):
        a = AutoModelForCausalLM.from_pretrained(out / role).state_dict()
        b = AutoModelForCausalLM.from_pretrained(tmp_path / role).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "data" / "train.jsonl").read_text() == (tmp_path / "data" / "train.jsonl").read_text()


def _timeless(manifest: dict) -> dict:
    """The manifest without wall-clock figures and library versions."""
    kept = {k: v for k, v in manifest.items() if k not in ("build_seconds", "versions")}
    for role in ("teacher", "student"):
        kept[role] = {**kept[role], "train": {k: v for k, v in kept[role]["train"].items() if k != "seconds"}}
    return kept


def test_prepare_demo_builds_the_pinned_bundle(toy_bundle):
    """The builder may be refactored, never changed: the shipped bundle (which every committed
    benchmark result used) cannot be rebuilt, so the builder must keep making it bit for bit. The
    toy build runs the same code, so its files (weights included) and manifest numbers are pinned,
    as the builder that made the shipped bundle wrote them. They hold for the torch and
    transformers versions that wrote them (checked only there) on this kind of CPU; a deliberate
    change rewrites them with ``KDRL_REPIN=1 pytest tests/test_demo.py`` and says why in its
    commit message."""
    out, _ = toy_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    files = {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(out.rglob("*")) if path.is_file() and path.name != "manifest.json"}
    versions = {name: manifest["versions"][name] for name in ("torch", "transformers")}
    if os.environ.get("KDRL_REPIN"):
        pins = {"files": files, "manifest": _timeless(manifest), "versions": versions}
        TOY_PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        pytest.skip("pins rewritten")
    pins = json.loads(TOY_PINS.read_text())
    if versions != pins["versions"]:
        pytest.skip(f"pinned with {pins['versions']}, running {versions}: other float kernels and file formats")
    assert files == pins["files"]
    assert _timeless(manifest) == pins["manifest"]


def test_make_model_config():
    tok = build_tokenizer()
    m = make_model(tok, hidden_size=32, layers=2, heads=2, intermediate=64, seed=0)
    assert m.config.vocab_size == len(tok)
    assert m.config.max_position_embeddings >= 256
    assert m.config.pad_token_id == tok.pad_token_id and m.config.eos_token_id == tok.eos_token_id
    assert m.generation_config.eos_token_id == tok.eos_token_id
    assert m.generation_config.pad_token_id == tok.pad_token_id
    m2 = make_model(tok, hidden_size=32, layers=2, heads=2, intermediate=64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_shipped_bundle():
    assert BUNDLE.is_dir(), "run `python -m kdrl.demo` to build kdrl/assets/demo"
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert manifest["scale"] == "full"
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert size <= 25e6
    toks, models = {}, {}
    for role in ("teacher", "student"):
        toks[role], models[role] = _load(BUNDLE / role)
        assert (BUNDLE / role / "model.safetensors").exists()
    assert num_params(models["student"]) * 4 <= num_params(models["teacher"])
    for model in models.values():  # vLLM's CPU attention supports head sizes 32 and 64
        assert model.config.hidden_size // model.config.num_attention_heads in (32, 64)
    assert toks["student"].get_vocab() == toks["teacher"].get_vocab() == build_tokenizer().get_vocab()
    data = {s: load_jsonl(BUNDLE / "data" / f"{s}.jsonl") for s in ("train", "test_id", "test_ood")}
    assert len(data["train"]) >= 1000 and len(data["test_id"]) >= 200 and len(data["test_ood"]) >= 200
    assert not {p["prompt"] for p in data["train"]} & {p["prompt"] for p in data["test_id"]}
    assert all(p["metadata"]["task"] == "sums" for rows in data.values() for p in rows)
    for rows in data.values():  # every shipped reference solution is right, chain and answer
        assert all(sums.chain_correct(p, p["solution"]) for p in rows)
    # The bundle's measured levels (500-problem sets, greedy): teacher 70-95% in distribution and
    # well below that out of distribution; student at most 30% but above guessing.
    ev = {role: manifest[role]["eval"] for role in ("teacher", "student")}
    assert 0.70 <= ev["teacher"]["test_id"]["accuracy"] <= 0.95
    assert 0.25 <= ev["teacher"]["test_ood"]["accuracy"] <= 0.60
    assert 0.05 <= ev["student"]["test_id"]["accuracy"] <= 0.30
    # A quick look at behaviour, re-measured: the teacher solves most in-distribution sums, the
    # student writes the answer format but solves few.
    probe = load_problems("bundled:test_id", limit=48)
    t = evaluate(models["teacher"], toks["teacher"], probe, max_new_tokens=48)
    s = evaluate(models["student"], toks["student"], probe, max_new_tokens=48)
    assert t["accuracy"] >= 0.6 and t["chain_correct"] >= 0.55
    assert s["boxed_rate"] >= 0.9 and s["accuracy"] <= 0.45
    assert manifest["teacher"]["parameters"] == num_params(models["teacher"])


def test_prepare_demo_rebuilds_one_role(toy_bundle, tmp_path):
    """--roles student retrains only the student; the teacher's weights and manifest entry are kept,
    and the rebuilt student equals the one a full build makes (each role has its own seed)."""
    import shutil

    out, manifest = toy_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    teacher_file = (copy / "teacher" / "model.safetensors").read_bytes()
    rebuilt = prepare_demo(str(copy), seed=0, scale="toy", roles=("student",), log=lambda s: None)
    assert (copy / "teacher" / "model.safetensors").read_bytes() == teacher_file
    assert rebuilt["teacher"] == json.loads((out / "manifest.json").read_text())["teacher"]
    assert rebuilt["student"]["command"].endswith("--roles student")
    a = AutoModelForCausalLM.from_pretrained(out / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(copy / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="seed 0"):
        prepare_demo(str(copy), seed=1, scale="toy", roles=("student",), log=lambda s: None)
    with pytest.raises(ValueError, match="manifest.json"):
        prepare_demo(str(tmp_path / "empty"), seed=0, scale="toy", roles=("student",), log=lambda s: None)
    with pytest.raises(ValueError, match="roles"):
        prepare_demo(str(copy), seed=0, scale="toy", roles=("critic",), log=lambda s: None)


def test_prepare_demo_command_is_declared_once():
    """``kdrl prepare-demo`` has exactly the options of ``python -m kdrl.demo`` (kdrl.demo.command)."""
    from kdrl.cli import build_parser
    from kdrl.demo import command

    args = build_parser().parse_args(["prepare-demo", "--scale", "toy", "--roles", "student", "--threads", "1"])
    assert args.func is command.run
    assert (args.scale, args.roles, args.threads, args.seed) == ("toy", ["student"], 1, 0)
    assert Path(args.out).resolve() == BUNDLE
