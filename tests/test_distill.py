"""End to end: the OPRD loop through the CLI and the Python API on tiny models (4-bit teacher on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minioprd.cli import app

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml")
runner = CliRunner()


def _lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = runner.invoke(app, ["distill", "--recipe", RECIPE, "-o", str(out), "--steps", "12",
                                 "train.lr=3e-3", "train.save_every=5"])
    assert result.exit_code == 0, result.output
    return out, result


def test_cli_run_writes_every_output(cli_run):
    out, result = cli_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "metrics.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/projections.safetensors", "adapter/minioprd.json",
                 "adapter/tokenizer_config.json", "checkpoints/step-000005/adapter_model.safetensors",
                 "checkpoints/step-000010/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "cos", "layer_cos", "response_len", "distinct", "tokens_per_s", "elapsed_s", "lr"):
        assert key in rows[0], key
    assert len(rows[0]["layer_cos"]) == 2  # 2 student layers mapped onto the 4-layer teacher
    assert "layer_map (student->teacher): 1->1, 2->4" in result.stdout
    # tiny student 2x64, teacher 4x128: the recipe's explicit oprd runs, with a note on what auto would pick
    assert "note: loss.objective=oprd is set, but student 2x64 and teacher 4x128 differ in shape" in result.stdout
    assert "loss.objective=auto would pick opd_full" in result.stdout
    meta = json.loads((out / "adapter" / "minioprd.json").read_text())
    assert meta["layer_map"] == [[1, 1], [2, 4]] and meta["projections"] is True


def test_cli_run_loss_falls_and_cosine_rises(cli_run):
    out, _ = cli_run
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    # the projections start at their least-squares fit (loss.projection_init=lstsq), so the loss starts at what
    # a linear map cannot explain and training takes it down from there
    assert last < 0.95 * first, (first, last)
    assert rows[-1]["cos"] > rows[0]["cos"] + 0.02


def test_training_moves_lora_and_projections_only_and_adapter_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minioprd.config import load_config
    from minioprd.distill import distill, prepare

    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path / "run"), "train.steps": 4, "train.lr": "3e-3"})
    s = prepare(cfg, log=lambda m: None)
    before = {n: p.detach().clone() for n, p in s.student.named_parameters()}
    proj_before = [p.weight.detach().clone() for p in s.projections]
    probe = torch.tensor([s.prompts[0]])
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights for the CPU on first use: compare outputs
        teacher_before = s.teacher(input_ids=probe).logits
    distill(cfg, setup=s)
    moved = {n for n, p in s.student.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert all(not torch.equal(p.weight, w) for p, w in zip(s.projections, proj_before))
    with torch.no_grad():
        assert torch.equal(s.teacher(input_ids=probe).logits, teacher_before)
    assert all(p.grad is None and not p.requires_grad for p in s.teacher.parameters())

    base = AutoModelForCausalLM.from_pretrained(s.student.peft_config["default"].base_model_name_or_path,
                                                dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    ids = torch.tensor([s.prompts[0]])
    s.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, s.student(input_ids=ids).logits)
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(input_ids=ids).logits, s.student(input_ids=ids).logits)


def test_qwen3_real_tokenizer_with_padded_vocab_difference(qwen3_pair, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}]})
                              for q in ("What is 2+2?", "Name a colour.", "Say hi.")) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--teacher", str(qwen3_pair["teacher"]), "--student",
                                 str(qwen3_pair["student"]), "--dataset", str(data), "-o", str(out), "--steps", "2",
                                 "--max-new-tokens", "8", "--prompts-per-step", "2", "--device", "cpu",
                                 "train.threads=1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    assert "layer_map (student->teacher): 1->1, 2->3" in result.stdout
    cfg = (out / "adapter" / "tokenizer_config.json").read_text()
    assert "<think>" in cfg or (out / "adapter" / "chat_template.jinja").is_file()


def test_dry_run_prints_config_and_layer_map():
    result = runner.invoke(app, ["distill", "--recipe", RECIPE, "--dry-run", "loss.layers=last"])
    assert result.exit_code == 0, result.output
    assert "layer_map (student -> teacher, hidden_states index): 2->4" in result.stdout
    assert "Linear(64->128)" in result.stdout and "kind: scale_mse" in result.stdout


@pytest.mark.parametrize("args,expected", [
    (["--student", "/no/such/model"], "student path '/no/such/model' does not exist"),
    (["loss.knd=mse"], "unknown config key 'loss.knd' (did you mean 'kind'?)"),
    (["train.lr=-1", "rollout.n=0"], "2 problems in the config"),
    (["--teacher", "Qwen2.5-7B"], "is not in the local Hugging Face cache"),
    (["notanoverride"], "is not section.key=value"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path):
    result = runner.invoke(app, ["distill", "--recipe", RECIPE, "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    lines = _lines(result)
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in result.output


def test_dataset_without_prompt_field_is_one_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "hello", "label": 1}\n')
    result = runner.invoke(app, ["distill", "--recipe", RECIPE, "--dataset", str(data), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = _lines(result)
    assert len(lines) == 1 and "text" in lines[0] and "--field" in lines[0], lines
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_existing_run_is_not_overwritten(cli_run):
    out, _ = cli_run
    before = (out / "metrics.jsonl").read_bytes()
    result = runner.invoke(app, ["distill", "--recipe", RECIPE, "-o", str(out), "--steps", "1"])
    assert result.exit_code == 2 and "already holds a run" in result.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_in_loop_eval_logs_metrics_and_keeps_best(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--steps", "4", "train.eval_every=2",
                            "eval.holdout=6", "eval.max_new_tokens=8", "eval.metric=kl"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and r["eval/kl"] >= 0 and -1 <= r["eval/cos_mean"] <= 1
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["metric"] == "eval/kl"
    assert best["value"] == min(r["eval/kl"] for r in evals if r["step"] > 0)
    assert (out / "best" / "adapter_model.safetensors").is_file()


def test_holdout_prompts_are_not_trained_on(tmp_path):
    from minioprd.config import load_config
    from minioprd.distill import prepare

    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path), "train.eval_every": 1, "eval.holdout": 10})
    s = prepare(cfg, log=lambda m: None)
    assert len(s.eval_examples) == 10
    held = {e.prompt for e in s.eval_examples}
    train_text = {s.tokenizer.decode(p) for p in s.prompts}
    assert not any(h in t for h in held for t in train_text)
    assert len(s.prompts) == 2000 - 10


def test_merge_lora_for_rollouts_unmerges_after(tmp_path):
    from minioprd.config import load_config
    from minioprd.distill import distill, prepare

    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path / "run"), "train.steps": 3,
                               "rollout.merge_lora": True, "model.teacher_quant": "none"})
    s = prepare(cfg, log=lambda m: None)
    base = {n: p.detach().clone() for n, p in s.student.named_parameters() if "base_layer" in n}
    calls = []
    orig = s.student.merge_adapter
    s.student.merge_adapter = lambda *a, **k: (calls.append(1), orig(*a, **k))
    distill(cfg, setup=s)
    assert len(calls) == 3
    lora_layers = [m for m in s.student.modules() if hasattr(m, "merged")]
    assert lora_layers and not any(m.merged for m in lora_layers)  # adapters are live again for the update
    for n, p in s.student.named_parameters():
        if n in base:
            torch.testing.assert_close(p.detach(), base[n], rtol=0, atol=1e-5)


def test_rollout_speedups_leave_the_run_unchanged(tmp_path):
    """rollout.cache / rollout.share_prefill / rollout.pack_weights reach the rollout and change nothing the run
    computes: the same seed samples the same responses, so the losses and response lengths match step for step."""
    rows = {}
    for name, over in {"plain": ["rollout.cache=dynamic", "rollout.share_prefill=false", "rollout.pack_weights=false"],
                       "fast": ["rollout.cache=static", "rollout.share_prefill=true", "rollout.compile=false"],
                       "packed": ["rollout.pack_weights=true"]}.items():
        out = tmp_path / name
        r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--steps", "2", *over])
        assert r.exit_code == 0, r.output
        rows[name] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "response_len", "distinct"):
        for fast in ("fast", "packed"):
            assert [x[key] for x in rows[fast]] == pytest.approx([x[key] for x in rows["plain"]], rel=1e-5)


def test_report_to_tensorboard_gets_the_same_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--steps", "3", "train.report_to=[tensorboard]"])
    assert r.exit_code == 0, r.output
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert "layer_cos/0" in acc.Tags()["scalars"]
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "o2"), "train.report_to=[mlflow]"])
    assert r.exit_code == 2 and "train.report_to" in r.stderr


def test_collapse_warning_fires_on_looping_rollouts(tmp_path, monkeypatch):
    """Rollouts that loop (a 4-gram over and over) are flagged in metrics and warned about."""
    import minioprd.distill as d
    from minioprd.rollout import Rollout

    orig = d.rollout

    def looping(model, tok, prompts, **kw):
        ro = orig(model, tok, prompts, **kw)
        R = ro.response_mask.shape[1]
        loop = torch.tensor([5, 6, 7, 8] * (R // 4 + 1))[:R]
        ids = ro.input_ids.clone()
        ids[:, ro.prompt_len:] = loop
        mask = torch.ones_like(ro.response_mask)
        return Rollout(ids, torch.cat([ro.attention_mask[:, :ro.prompt_len], mask.long()], 1), mask, ro.prompt_len)

    monkeypatch.setattr(d, "rollout", looping)
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "run"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["repetition"] == 1.0 and x["collapse_warning"] for x in rows)
    assert "repeating itself" in r.stdout


def test_qlora_student_trains_after_eval_mode_rollouts(tmp_path):
    """student_quant=4bit on a CPU with avx512_bf16: bitsandbytes used to repack the NF4 weights during the
    (eval-mode) rollout, and the training forward then died in its in-place bias add (a traceback)."""
    from safetensors.torch import load_file

    out = tmp_path / "q"
    r = runner.invoke(app, ["distill", "--recipe", RECIPE, "-o", str(out), "--steps", "2", "model.student_quant=4bit"])
    assert r.exit_code == 0, r.output
    b = [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and all(bool((x != 0).any()) for x in b)  # B starts at zero: every LoRA layer was updated
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)


def test_config_problems_are_reported_before_any_model_loads(tmp_path, monkeypatch):
    """eval_every with nothing to evaluate and a tracker that is not installed: both named at once, no weights
    loaded, nothing written."""
    import importlib.util

    import minioprd.distill as d
    from minioprd.config import load_config
    from minioprd.errors import ConfigError

    monkeypatch.setattr(d, "prepare", lambda *a, **k: pytest.fail("models were loaded before the config was checked"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path / "run"), "train.eval_every": 2, "eval.holdout": 0,
                               "train.report_to": ["wandb"]})
    with pytest.raises(ConfigError) as e:
        d.distill(cfg)
    assert len(e.value.problems) == 2
    assert "pip install wandb" in e.value.problems[0] and "nothing to evaluate on" in e.value.problems[1]
    assert not (tmp_path / "run").exists()


def test_run_state_round_trips_through_a_checkpoint_dict():
    """The counters a checkpoint saves restore every field; an older checkpoint's subset leaves the rest alone."""
    from minioprd.distill import RunState

    st = RunState(loss_scale=2.0**15, loss_scale_clean=7, overflow_steps=2, nonfinite_in_row=1, nonfinite_total=3,
                  collapse_warnings=4, best=0.5, best_step=20, elapsed_before=10.0)
    saved = json.loads(json.dumps(st.counters()))  # what trainer_state.json holds
    assert saved["elapsed_before"] >= 10.0 and "started" not in saved and "step" not in saved
    back = RunState()
    back.restore(30, saved)
    assert (back.step, back.loss_scale, back.best, back.best_step, back.collapse_warnings) == (30, 2.0**15, 0.5, 20, 4)
    old = RunState()
    old.restore(4, {"nonfinite_in_row": 0, "nonfinite_total": 1, "elapsed_before": 3.0, "loss_scale": 1.0,
                    "loss_scale_clean": 0, "overflow_steps": 0})
    assert old.nonfinite_total == 1 and old.best is None and old.collapse_warnings == 0
