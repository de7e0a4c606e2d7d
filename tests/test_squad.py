"""`python -m train.squad` end to end on a tiny random checkpoint and a tiny SQuAD file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax import peft as lp
from lora_jax.models import from_pretrained
from train import squad
from train.state import TrainCheckpoints

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
PLACES = ["Rome", "Oslo", "Lima", "Kyiv"]


def tiny_squad(path: Path, malformed: bool = False) -> Path:
    """A SQuAD v1.1 file of short contexts; optionally with 3 malformed records."""
    paragraphs = []
    for i, name in enumerate(NAMES):
        place = PLACES[i % len(PLACES)]
        ctx = f"{name} lives in {place}."
        qas = [{"id": f"q{i}", "question": f"Where does {name} live?",
                "answers": [{"text": place, "answer_start": ctx.index(place)}]}]
        paragraphs.append({"context": ctx, "qas": qas})
    if malformed:
        paragraphs.append({"context": "Ana lives in Rome.", "qas": [
            {"id": "bad1", "question": "Who?", "answers": []},  # no answer
            {"id": "bad2", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 0}]},  # not in context
        ]})
        paragraphs.append({"context": "", "qas": [{"id": "bad3", "question": "What?",
                                                   "answers": [{"text": "x", "answer_start": 0}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def cli_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--grad-accum", "2", "--max-len", "48", "--max-new-tokens", "4", "--eval-samples", "4",
            "--eval-batch-size", "4", "--rank", "4", "--alpha", "8", "--dropout", "0", "--no-progress",
            "--lr", "1e-2", "--warmup", "1", "--log-every", "1", *extra]


def losses(out: Path, run: str = "lora", key: str = "loss") -> list[float]:
    """The run's training losses in metrics.jsonl (key="val_loss": its validation losses, --eval-every)."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["run"] == run and key in r]


def answer_loss(model_dir: Path, data: Path, adapter: Path, n: int = 4, max_len: int = 48, v2: bool = False) -> float:
    """The saved adapter's mean answer-token loss (first gold answer + EOS) on the first n
    validation questions, computed example by example: what --eval-every reports."""
    from transformers import AutoTokenizer

    from train import data as squad_data
    model, params = from_pretrained(model_dir)
    saved = lp.load_adapter(adapter, params)
    g = lj.apply(model.apply, saved.config)
    records = squad_data.load_split(data, "validation", v2=v2).records[:n]
    total = count = 0.0
    for e in squad_data.encode(AutoTokenizer.from_pretrained(model_dir), records, max_len, train=True).examples:
        logp = jax.nn.log_softmax(g(params, saved.adapters, e.tokens[None, :-1])[0].astype(np.float32))
        t = np.arange(e.target_start - 1, len(e.tokens) - 1)  # logits at t predict tokens[t + 1]
        total, count = total - float(logp[t, e.tokens[t + 1]].sum()), count + len(t)
    return total / count


def test_squad_v2_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--version-2-with-negative on flat records, some without an answer: those are unanswerable
    (v1.1 would skip them as malformed), train to the empty answer (their answer-token loss is
    EOS's) and are scored by evaluate-v2.0's rules, the questions with and without an answer also
    apart."""
    from train import data as squad_data
    from train.metrics import squad_v2_scores

    rows = []
    for i, name in enumerate(NAMES):
        place = PLACES[i % len(PLACES)]
        ctx = f"{name} lives in {place}."
        rows += [{"id": f"q{i}", "context": ctx, "question": f"Where does {name} live?",
                  "answers": {"text": [place], "answer_start": [ctx.index(place)]}},
                 {"id": f"n{i}", "context": ctx, "question": f"What does {name} eat?",
                  "answers": {"text": [], "answer_start": []}}]
    path = tmp_path / "v2.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert squad_data.load_split(path, "train").skipped["no_answer"] == 8
    out = tmp_path / "run"
    assert squad.main(cli_args(tiny_gpt2_dir, path, out, "--steps", "2", "--eval-every", "2",
                               "--version-2-with-negative")) == 0
    printed = capsys.readouterr().out
    assert "16 records from" in printed and "(8 unanswerable, SQuAD v2.0)" in printed
    assert "SQuAD v2.0 EM/F1 on 4 validation questions" in printed
    assert "| LoRA | has answer (2) |" in printed and "| base model | no answer (2) |" in printed
    s = json.loads((out / "summary.json").read_text())
    records = squad_data.load_split(path, "validation", v2=True).records[:4]
    assert s["squad_version"] == "2.0" and [r.answerable for r in records] == [True, False, True, False]
    for run in ("base", "lora"):
        preds = json.loads((out / f"predictions_{run}.json").read_text())
        assert s["scores"][run] == squad_v2_scores(preds, records)
    np.testing.assert_allclose(losses(out, key="val_loss")[-1],
                               answer_loss(tiny_gpt2_dir, path, out / "adapter", v2=True), rtol=1e-4)


def test_keep_best_and_an_earlier_runs_checkpoints(tiny_gpt2_dir, tmp_path, capsys):
    """--keep-best scores and saves the step of the lowest validation loss (here step 2 of 6 at a
    too-large lr); a run stopped and resumed keeps the same one. A fresh run in a directory holding
    an earlier run's checkpoints removes them, so its --resume continues its own steps."""
    data = tiny_squad(tmp_path / "squad.json")
    flags = ["--steps", "6", "--no-base-eval", "--eval-every", "1", "--keep-best", "--lr", "0.5", "--checkpoint-every",
             "2"]
    straight = tmp_path / "straight"
    assert squad.main(cli_args(tiny_gpt2_dir, data, straight, *flags)) == 0
    val = losses(straight, key="val_loss")
    best = int(np.argmin(val)) + 1
    assert best == 2 and f"--keep-best keeps step 2 of 6, the lowest validation loss ({val[1]:.4f})" in \
        capsys.readouterr().out
    assert json.loads((straight / "summary.json").read_text())["best_step"] == {"lora": 2}
    np.testing.assert_allclose(answer_loss(tiny_gpt2_dir, data, straight / "adapter"), val[1], rtol=1e-4)

    split = tmp_path / "split"  # an earlier run (6 steps, other lr) left checkpoints 4 and 6 here
    assert squad.main(cli_args(tiny_gpt2_dir, data, split, "--steps", "6", "--no-base-eval", "--checkpoint-every",
                               "2")) == 0
    assert squad.main(cli_args(tiny_gpt2_dir, data, split, *flags, "--stop-after", "3")) == 0
    assert "removed the checkpoints of an earlier run" in capsys.readouterr().out
    assert squad.main(cli_args(tiny_gpt2_dir, data, split, *flags, "--resume")) == 0
    assert "resumed lora from step 3" in capsys.readouterr().out
    weights = lambda d: (d / "peft" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert weights(split) == weights(straight)
    assert json.loads((split / "summary.json").read_text())["best_step"] == {"lora": 2}

    # --early-stopping 2: no lower loss at steps 3 and 4, so training stops at 4 and keeps step 2,
    # the adapter of the 6-step run; so does a run stopped at 3 and resumed (it stops at 4 again),
    # and --resume after the stop trains no further.
    early = tmp_path / "early"
    assert squad.main(cli_args(tiny_gpt2_dir, data, early, *flags, "--early-stopping", "2")) == 0
    printed = capsys.readouterr().out
    assert "no lower validation loss in 2 evaluations since step 2; training stops at step 4 of 6" in printed
    assert "lora stopped early at step 4" in printed
    assert len(losses(early)) == 4 and losses(early, key="val_loss") == val[:4]
    s = json.loads((early / "summary.json").read_text())
    assert s["early_stop"] == {"lora": 4} and s["best_step"] == {"lora": 2} and weights(early) == weights(straight)
    resumed = tmp_path / "early_resumed"
    assert squad.main(cli_args(tiny_gpt2_dir, data, resumed, *flags, "--early-stopping", "2", "--stop-after", "3")) == 0
    for _ in range(2):
        assert squad.main(cli_args(tiny_gpt2_dir, data, resumed, *flags, "--early-stopping", "2", "--resume")) == 0
        assert weights(resumed) == weights(straight)
        assert json.loads((resumed / "summary.json").read_text())["early_stop"] == {"lora": 4}
    assert "--early-stopping stopped this run at step 4 already (2 evaluations after step 2)" in \
        capsys.readouterr().out
    assert len(losses(resumed)) == 4


def test_resume_after_a_crash(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    """A run killed while saving its step-4 checkpoint resumes from step 2: metrics.jsonl loses the
    rows of the lost steps (logged again, once), --keep-best still knows the best step before 2, and
    flags that would feed it other batches (--seed, rows a step) are refused. --full-finetune pauses
    at --stop-after like LoRA, scoring nothing until it has trained all its steps."""
    from train.state import TrainCheckpoints
    data = tiny_squad(tmp_path / "squad.json")
    flags = ["--steps", "6", "--no-base-eval", "--eval-every", "1", "--keep-best", "--checkpoint-every", "2"]
    out = tmp_path / "run"
    save = TrainCheckpoints.save

    def crash(self, step, *a, **k):
        if self.directory.name == "lora" and step == 4:
            raise RuntimeError("killed")
        return save(self, step, *a, **k)
    monkeypatch.setattr(TrainCheckpoints, "save", crash)
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, *flags)) == 1
    val = losses(out, key="val_loss")
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3, 4] and val[1] < val[0]
    monkeypatch.setattr(TrainCheckpoints, "save", save)
    capsys.readouterr()
    for bad, msg in ((["--seed", "1"], "this run has --seed 1, 8 rows a step"),
                     (["--batch-size", "2"], "this run has --seed 0, 4 rows a step"),
                     (["--train-samples", "5"], "8 rows a step (--batch-size x --grad-accum), 5 training examples")):
        assert squad.main(cli_args(tiny_gpt2_dir, data, out, *flags, "--resume", *bad)) == 1
        err = capsys.readouterr().err
        assert "--resume: lora's checkpoint at step 2 was taken with --seed 0, 8 rows a step" in err and msg in err, err
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, *flags, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "resumed lora from step 2" in printed
    best = 1 + int(np.argmin(val[:2]))
    assert f"lora: --keep-best: the lowest validation loss so far is step {best}'s ({val[best - 1]:.4f})" in printed
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and losses(out, key="val_loss")[:2] == val[:2]

    full = tmp_path / "full"
    both = ["--steps", "2", "--no-base-eval", "--full-finetune", "--full-lr", "1e-3"]
    assert squad.main(cli_args(tiny_gpt2_dir, data, full, *both, "--stop-after", "1")) == 0
    assert squad.main(cli_args(tiny_gpt2_dir, data, full, *both, "--stop-after", "1", "--resume")) == 0
    assert "stopped the full fine-tuning after 1 steps (--stop-after)" in capsys.readouterr().out
    assert not (full / "summary.json").exists()
    assert squad.main(cli_args(tiny_gpt2_dir, data, full, *both, "--resume")) == 0
    assert set(json.loads((full / "summary.json").read_text())["scores"]) == {"lora", "full"}
    assert [r["step"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
            if r["run"] == "full" and "loss" in r] == [1, 2]


def peft_beam_answers(model_dir: Path, data: Path, adapter: Path, n: int = 4, max_prompt: int = 44,
                      **beam_kw) -> dict[str, str]:
    """The answers of transformers' beam search over PEFT's model of an exported adapter, prompt by
    prompt (unpadded), for the first n validation questions."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train import data as squad_data
    from train.evaluate import decode_answer
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter).eval()
    records = squad_data.load_split(data, "validation").records[:n]
    out = {}
    for e in squad_data.encode(tok, records, max_prompt, train=False).examples:
        with torch.no_grad():
            seq = model.generate(input_ids=torch.tensor(e.tokens[None]), do_sample=False,
                                 pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **beam_kw)
        out[e.id] = decode_answer(tok, seq[0, len(e.tokens):].numpy(), tok.eos_token_id)
    return out


def test_two_step_run_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    data = tiny_squad(tmp_path / "squad.json", malformed=True)
    out = tmp_path / "run"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "2", "--dora", "--targets", "all-linear",
                               "--layers-to-transform", "1", "--eval-every", "1")) == 0
    printed = capsys.readouterr().out
    assert "lora step 2: validation loss" in printed
    assert "| base model |" in printed and "| LoRA |" in printed and "trainable params" in printed
    # malformed records are skipped and counted, never fatal
    assert "skipped 3 malformed" in printed and "'no_answer': 1" in printed and "'empty_context': 1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"base", "lora"} and summary["steps"] == 2
    assert len(losses(out)) == 2 and all(np.isfinite(losses(out)))
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "adapter" / "lora_adapter.json").is_file() and (out / "peft" / "adapter_config.json").is_file()
    assert summary["peft_bytes"] > 0 and summary["adapter_bytes"] > 0
    manifest = json.loads((out / "adapter" / "lora_adapter.json").read_text())
    assert manifest["config"]["use_dora"] and manifest["config"]["targets"] == "all-linear"
    assert manifest["config"]["layers_to_transform"] == [1]
    assert len(manifest["adapters"]) == 4  # layer 1's c_attn, attn c_proj, c_fc, mlp c_proj
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] is True and peft_cfg["layers_to_transform"] == [1]
    # --eval-every 1: the validation loss after each step; the last one is the saved adapter's mean
    # answer-token loss on the scored questions (first gold answer + EOS), computed here example by example
    val = losses(out, key="val_loss")
    assert len(val) == 2 and val[1] < val[0] and summary["val_loss"] == {"lora": val[1]}
    np.testing.assert_allclose(val[1], answer_loss(tiny_gpt2_dir, data, out / "adapter"), rtol=1e-4)

    # Continue from the exported PEFT adapter: its config (rank 4) replaces the flags (rank 2);
    # this time on an NF4 base (QLoRA), scored before and after.
    again = tmp_path / "again"
    args = cli_args(tiny_gpt2_dir, data, again, "--steps", "1", "--init-adapter", str(out / "peft"),
                    "--quantize", "nf4", "--double-quant")
    args[args.index("--rank") + 1] = "2"
    assert squad.main(args) == 0
    printed = capsys.readouterr().out
    assert "starting from adapter" in printed and "nf4 + double quant: frozen params" in printed
    assert "| QLoRA (nf4 + double quant) |" in printed
    again_config = json.loads((again / "adapter" / "lora_adapter.json").read_text())["config"]
    assert again_config["rank"] == 4 and again_config["use_dora"] and again_config["layers_to_transform"] == [1]
    again_summary = json.loads((again / "summary.json").read_text())
    assert again_summary["quantize"] == "nf4 + double quant" and set(again_summary["scores"]) == {"base", "lora"}

    # --eval-only scores the saved adapters as they are, from either format: the trained run's answers.
    trained = json.loads((out / "predictions_lora.json").read_text())
    for fmt in ("adapter", "peft"):
        scored = tmp_path / f"scored_{fmt}"
        assert squad.main(cli_args(tiny_gpt2_dir, data, scored, "--eval-only", "--no-base-eval",
                                   "--init-adapter", str(out / fmt))) == 0
        printed = capsys.readouterr().out
        assert f"| adapter {out / fmt} |" in printed and "evaluation only" in printed and "adapter params" in printed
        assert json.loads((scored / "predictions_lora.json").read_text()) == trained
        s = json.loads((scored / "summary.json").read_text())
        assert s["eval_only"] and s["steps"] == 0 and s["scores"]["lora"] == summary["scores"]["lora"]
        assert not (scored / "metrics.jsonl").exists() and not (scored / "adapter").exists()

    # --num-beams: the answers of transformers' beam search (max 4 new tokens) over PEFT's model of
    # the exported DoRA adapter.
    beams = tmp_path / "beams"
    assert squad.main(cli_args(tiny_gpt2_dir, data, beams, "--eval-only", "--no-base-eval", "--init-adapter",
                               str(out / "peft"), "--num-beams", "3", "--length-penalty", "-1")) == 0
    assert "beam search: 3 beams, length penalty -1)" in capsys.readouterr().out
    s = json.loads((beams / "summary.json").read_text())
    assert s["num_beams"] == 3 and s["length_penalty"] == -1
    answers = json.loads((beams / "predictions_lora.json").read_text())
    assert answers != trained  # not the greedy answers
    assert answers == peft_beam_answers(tiny_gpt2_dir, data, out / "peft", num_beams=3, length_penalty=-1.0,
                                        max_new_tokens=4)


def test_resume_gives_identical_adapters(tiny_gpt2_dir, tmp_path, capsys):
    """Resuming gives the adapters of an uninterrupted run, here with PiSSA, LoRA+ and lora_bias on
    an NF4 base (the residual weights are rebuilt and quantized on resume); the saved adapters are plain
    LoRA [trained | PiSSA start] of rank 2r on the original weights."""
    data = tiny_squad(tmp_path / "squad.json")
    common = ["--steps", "4", "--no-base-eval", "--checkpoint-every", "2", "--dropout", "0.1", "--init", "pissa",
              "--loraplus-ratio", "4", "--quantize", "nf4", "--lora-bias", "--lr-scheduler", "cosine"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert squad.main(cli_args(tiny_gpt2_dir, data, straight, *common)) == 0
    assert "| QLoRA (nf4, pissa, LoRA+ x4) |" in capsys.readouterr().out
    assert squad.main(cli_args(tiny_gpt2_dir, data, split, *common, "--stop-after", "2")) == 0
    assert not (split / "summary.json").exists()
    assert squad.main(cli_args(tiny_gpt2_dir, data, split, *common, "--resume")) == 0

    def final(out):
        ck = TrainCheckpoints(out / "checkpoints" / "lora")
        got = ck.manager.restore(4)
        ck.close()
        return got["state"]["trainable"]

    a, b = final(straight), final(split)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert losses(straight) == losses(split)
    # --lr-scheduler cosine (warmup 1 of 4 updates, peak 1e-2): the logged rate of each update
    from train.loop import make_schedule
    want = [float(make_schedule(1e-2, steps=4, warmup=1, kind="cosine")(k)) for k in range(4)]
    assert losses(split, key="lr") == losses(straight, key="lr") == want and want[1] > want[2] > want[3] > 0
    assert json.loads((straight / "summary.json").read_text())["lr_scheduler"] == "cosine"

    peft_cfg = json.loads((straight / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 8 and peft_cfg["lora_alpha"] == 16 and peft_cfg["init_lora_weights"] is True
    assert peft_cfg["lora_bias"] is True
    _, params = from_pretrained(tiny_gpt2_dir)
    saved = lp.load_adapter(straight / "adapter", params)
    assert saved.config.rank == 8 and saved.config.init == "kaiming_uniform"
    pissa = dataclasses.replace(saved.config, rank=4, alpha=8.0, init="pissa")
    _, start = lj.init_residual(pissa, params, jax.random.fold_in(jax.random.key(0), 1))  # the CLI's key for seed 0
    for p, ab in saved.adapters.items():
        np.testing.assert_allclose(ab["lora_A"][..., 4:], start[p]["lora_A"], atol=1e-6)
        np.testing.assert_allclose(ab["lora_B"][..., 4:, :], -start[p]["lora_B"], atol=1e-6)
        assert not np.allclose(ab["lora_B"][..., :4, :], start[p]["lora_B"])


def test_loftq_run_saves_its_base_and_reloads(tiny_gpt2_dir, tmp_path, capsys):
    """--init loftq trains QLoRA from LoftQ's base and factors, saves that base next to the adapters
    (their PEFT config names it), and the saved pair scores the same answers when loaded back."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "loftq"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "2", "--init", "loftq", "--loftq-iter", "2",
                               "--quantize", "nf4", "--no-base-eval")) == 0
    printed = capsys.readouterr().out
    assert "init loftq (2 iterations)" in printed and "| QLoRA (nf4, loftq) |" in printed
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str(out / "loftq_base") and peft_cfg["init_lora_weights"] is True
    assert (out / "loftq_base" / "model.safetensors").is_file() and (out / "loftq_base" / "tokenizer.json").is_file()
    again = tmp_path / "again"
    assert squad.main(cli_args(out / "loftq_base", data, again, "--eval-only", "--no-base-eval", "--quantize", "nf4",
                               "--init-adapter", str(out / "peft"))) == 0
    assert json.loads((again / "predictions_lora.json").read_text()) == \
        json.loads((out / "predictions_lora.json").read_text())
    assert json.loads((again / "summary.json").read_text())["scores"] == json.loads(
        (out / "summary.json").read_text())["scores"]


def _run_subprocess(args, devices: int):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "train.squad", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


PARALLEL_ARGS = ["--steps", "3", "--no-base-eval", "--eval-samples", "1", "--eval-batch-size", "1",
                 "--eval-every", "2"]


@pytest.fixture(scope="module")
def one_device(tiny_gpt2_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one_device")
    data = tiny_squad(tmp / "squad.json")
    _run_subprocess(cli_args(tiny_gpt2_dir, data, tmp / "one", *PARALLEL_ARGS), devices=1)
    return tmp / "one"


@pytest.fixture(scope="module")
def one_device_losses(one_device):
    return losses(one_device)


@pytest.fixture(scope="module")
def one_device_val(one_device):
    val = losses(one_device, key="val_loss")
    assert len(val) == 2  # --eval-every 2 over 3 steps: after steps 2 and 3
    return val


@pytest.mark.parametrize("parallel", ["jit", "pmap", "fsdp"])
def test_data_parallel_matches_one_device(tiny_gpt2_dir, tmp_path, parallel, one_device, one_device_losses,
                                         one_device_val):
    data = tiny_squad(tmp_path / "squad.json")
    _run_subprocess(cli_args(tiny_gpt2_dir, data, tmp_path / parallel, *PARALLEL_ARGS, "--parallel", parallel),
                    devices=4)
    np.testing.assert_allclose(losses(tmp_path / parallel), one_device_losses, rtol=1e-5)
    np.testing.assert_allclose(losses(tmp_path / parallel, key="val_loss"), one_device_val, rtol=1e-5)
    preds = json.loads((tmp_path / parallel / "predictions_lora.json").read_text())
    assert len(preds) == 1 and preds == json.loads((one_device / "predictions_lora.json").read_text())
    summary = json.loads((tmp_path / parallel / "summary.json").read_text())
    assert summary["parallel"] == parallel


def test_remat_gives_the_same_losses(tiny_gpt2_dir, tmp_path, one_device_losses):
    """--remat recomputes the layers in the backward pass: the same numbers, less activation memory."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "remat"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, *PARALLEL_ARGS, "--remat", "--remat-policy",
                               "dots_with_no_batch_dims_saveable")) == 0
    np.testing.assert_allclose(losses(out), one_device_losses, rtol=1e-5)


@pytest.mark.parametrize("parallel, port", [("jit", 12000), ("fsdp", 13000)])
def test_two_processes_match_one_device(tiny_gpt2_dir, tmp_path, parallel, port, one_device, one_device_losses,
                                        one_device_val):
    """jax.distributed over 2 processes on 127.0.0.1 (2 devices each under fsdp: the state is split
    over both processes), same global batch: same loss trajectory and answers."""
    data = tiny_squad(tmp_path / "squad.json")
    port += os.getpid() % 1000
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 if parallel == 'fsdp' else 1}"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train.squad", *cli_args(tiny_gpt2_dir, data, tmp_path / "two", *PARALLEL_ARGS),
         "--parallel", parallel, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), one_device_losses, rtol=1e-5)
    np.testing.assert_allclose(losses(tmp_path / "two", key="val_loss"), one_device_val, rtol=1e-5)
    preds = json.loads((tmp_path / "two" / "predictions_lora.json").read_text())
    assert preds == json.loads((one_device / "predictions_lora.json").read_text())
    if parallel == "fsdp":
        assert "lora: fsdp over 4 devices" in outs[0][0]


@pytest.mark.parametrize("warmup", [5, 0])
def test_lr_schedules_are_transformers(warmup):
    """Each --lr-scheduler gives, update by update, the learning rate of transformers' get_scheduler
    of that name over a torch optimizer (LambdaLR: update k uses the k-th value)."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    from train.loop import SCHEDULES, make_schedule
    assert SCHEDULES == squad.LR_SCHEDULERS
    steps, lr = 20, 3e-3
    for kind in SCHEDULES:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        ref = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=steps)
        want = []
        for _ in range(steps):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        got = [float(make_schedule(lr, steps=steps, warmup=warmup, kind=kind)(k)) for k in range(steps)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9, err_msg=kind)
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine_with_restarts'"):
        make_schedule(lr, steps=steps, warmup=warmup, kind="cosine_with_restarts")


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_optimizer_is_transformers_adamw_with_clipping(clip):
    """make_optimizer's updates are the Trainer's: clip_grad_norm_(max_grad_norm), then torch AdamW;
    --clip 0 clips nothing, as max_grad_norm 0 does (clipping to norm 0 would train nothing)."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import optax

    from train.loop import make_optimizer
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5) * rng.uniform(1, 20) for _ in range(4)]  # norms above and below 1
    w = torch.nn.Parameter(torch.tensor(rng.normal(size=5)))
    params = jnp.asarray(w.detach().numpy())
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, eps=1e-8)
    tx = make_optimizer(1e-2, steps=4, warmup=0, weight_decay=0.1, clip=clip, schedule="constant")
    state = tx.init(params)
    for g in grads:
        w.grad = torch.tensor(g)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([w], clip)
        opt.step()
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params), w.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_weight_decay_spares_biases_and_norms_as_the_trainer_does():
    """AdamW decays the leaves transformers' Trainer decays (get_decay_parameter_names: no biases,
    no LayerNorm weights), with LoRA+ too; lora_B's bias (lora_bias) is a bias."""
    pytest.importorskip("torch")
    import jax.numpy as jnp
    from transformers import GPT2Config as HFGPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    from lora_jax.models import CausalLM, GPT2Config
    from train.loop import decayed, make_optimizer
    hf = GPT2LMHeadModel(HFGPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0,
                                      eos_token_id=0))
    want = {n for n in get_parameter_names(hf, ALL_LAYERNORM_LAYERS) if "bias" not in n} - {"lm_head.weight"}  # tied
    params = CausalLM(GPT2Config(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=32,
                                 max_position_embeddings=8)).init_params(jax.random.key(0))
    hf_name = lambda p: p.replace("/", ".").replace(".kernel", ".weight").replace(".scale", ".weight").replace(
        ".embedding", ".weight")
    got = {hf_name(p) for p, d in lj.tree.flatten(decayed(params)).items() if d}
    assert got == want and len(lj.tree.flatten(params)) == len(dict(hf.named_parameters()))
    config = lj.LoraConfig(rank=2, targets=["c_attn"], lora_bias=True, trainable=["ln_f"])
    trainable, _ = lj.split(config, params, lj.init(config, params, jax.random.key(1)))
    trainable = jax.tree.map(jnp.ones_like, trainable)
    for ratio in (None, 4.0):  # one step on zero gradients: only the decay moves a leaf
        tx = make_optimizer(1e-1, steps=4, warmup=0, weight_decay=0.5, clip=0.0, schedule="constant",
                            loraplus_ratio=ratio)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, trainable), tx.init(trainable), trainable)
        moved = {p for p, u in lj.tree.flatten(updates).items() if float(jnp.abs(u).max()) > 0}
        assert moved == {"adapters/transformer/h/0/attn/c_attn/kernel/lora_A",
                         "adapters/transformer/h/0/attn/c_attn/kernel/lora_B"}, (ratio, moved)


def test_bad_flags_fail_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        squad.main(["--steps", "0", "--output-dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "--steps must be positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        squad.main(["--quantize", "nf4", "--full-finetune", "--output-dir", str(tmp_path / "x")])
    assert "--full-finetune trains the weights that --quantize nf4 freezes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        squad.main(["--double-quant", "--output-dir", str(tmp_path / "x")])
    assert "--double-quant quantizes the scales of --quantize nf4" in capsys.readouterr().err
    for flags, msg in [(["--init", "svd"], "--init: unknown init 'svd'"),
                       (["--init", "olora", "--init-adapter", "x"], "--init makes fresh adapters"),
                       (["--loraplus-ratio", "0"], "--loraplus-ratio must be a positive number"),
                       (["--remat-policy", "everything_saveable"], "pass --remat with it"),
                       (["--eval-only", "--full-finetune", "--resume"], "takes no --full-finetune, --resume"),
                       (["--eval-only", "--no-base-eval"], "--no-base-eval scores nothing: pass --init-adapter"),
                       (["--init", "loftq"], "pass --quantize nf4 with it"),
                       (["--loftq-iter", "3"], "a positive count for --init loftq"),
                       (["--init-batches", "4"], "--init-batches 4: a positive count for --init eva / corda / lora_ga"),
                       (["--init", "eva", "--corda-method", "kpm"], "--corda-method kpm: ipm or kpm for --init corda"),
                       (["--init", "eva", "--eva-rho", "0.5"], "--eva-rho 0.5: a number >= 1 for --init eva"),
                       (["--layers-to-transform", "1,x"], "--layers-to-transform '1,x': comma-separated layer"),
                       (["--lorafa", "--loraplus-ratio", "4"], "--lorafa freezes lora_A, whose rate --loraplus"),
                       (["--alora", "--init-adapter", "x"], "--alora makes a fresh aLoRA config"),
                       (["--velora-groups", "0"], "--velora-groups must be positive, got 0"),
                       (["--velora-init", "random"], "--velora-init random chooses VeLoRA's projection: pass "
                                                     "--velora-groups with it"),
                       (["--velora-groups", "8", "--dora"], "--velora-groups changes lora_A's gradient; not with --dora"),
                       (["--reduce-intruders", "1.5"], "--reduce-intruders keeps a share of each intruder "
                                                       "dimension: in [0, 1], got 1.5"),
                       (["--reduce-intruders", "--dora"], "--reduce-intruders changes the directions DoRA"),
                       (["--init", "mica", "--lorafa"], "--init mica trains lora_A alone; --lorafa sets how"),
                       (["--kasa", "--dora", "--init", "pissa"],
                        "--kasa is its own LoRA variant on a truncated base; not with --dora, --init pissa"),
                       (["--reduce-intruders", "--eval-only"], "--reduce-intruders --eval-only acts on an adapter"),
                       (["--adalora", "3", "--rank", "2"], "--adalora 3: the target rank is between 1 and --rank 2"),
                       (["--adalora", "2", "--kasa", "--rslora"],
                        "--adalora has its own init, scale and ranks; not with --kasa, --rslora"),
                       (["--bdlora-blocks", "0"], "--bdlora-blocks must be positive, got 0"),
                       (["--eval-every", "0"], "--eval-every must be positive, got 0"),
                       (["--num-beams", "0"], "--num-beams must be positive, got 0"),
                       (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
                       (["--full-lr", "nan"], "--full-lr must be a positive number, got nan"),
                       (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0, got -0.1"),
                       (["--clip", "inf"], "--clip must be a number >= 0 (0: no clipping), got inf"),
                       (["--warmup", "-3"], "--warmup must be >= 0, got -3"),
                       (["--seed", "-5"], "--seed must be >= 0, got -5"),
                       (["--alpha", "0"], "--alpha must be a finite nonzero number (scale = alpha / r), got 0.0"),
                       (["--train-samples", "-1"], "--train-samples must be >= 0, got -1"),
                       (["--length-penalty", "2"],
                        "--length-penalty 2.0 ranks beam-search answers: pass --num-beams"),
                       (["--keep-best"], "--keep-best keeps the step of the lowest validation loss: pass --eval-every"),
                       (["--eval-every", "5", "--early-stopping", "3"],
                        "--early-stopping 3: a positive patience (in evaluations), with --eval-every N --keep-best"),
                       (["--eval-only", "--eval-every", "5"],
                        "--eval-only trains nothing, so it takes no --eval-every"),
                       (["--prompt-template", "{context} {question:>9}"],
                        "--prompt-template: prompt template '{context} {question:>9}' must hold {context} and"),
                       (["--alora", "--prompt-template", "A: {context}, Q: {question}"],
                        "--alora: the prompt template 'A: {context}, Q: {question}' ends with a field"),
                       (["--bdlora-blocks", "2", "--lora-bias", "--init", "pissa"], "--bdlora-blocks is its own LoRA "
                        "variant (block-diagonal factors); not with --lora-bias, --init pissa")]:
        with pytest.raises(SystemExit):
            squad.main([*flags, "--output-dir", str(tmp_path / "x")])
        assert msg in capsys.readouterr().err
    (tmp_path / "afile").write_text("kept")
    with pytest.raises(SystemExit):
        squad.main(["--output-dir", str(tmp_path / "afile")])
    assert f"--output-dir {tmp_path / 'afile'} exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "kept"
    assert squad.main(["--quantize", "nf4", "--quant-block-size", "48", "--output-dir", str(tmp_path / "x")]) == 1
    assert "block_size 48 is not one of (32, 64" in capsys.readouterr().err
    assert squad.main(["--remat", "--remat-policy", "most", "--output-dir", str(tmp_path / "x")]) == 1
    assert "unknown remat_policy 'most'" in capsys.readouterr().err
    assert squad.main(["--init", "orthogonal", "--rank", "3", "--output-dir", str(tmp_path / "x")]) == 1
    assert "init='orthogonal' needs an even rank; 'transformer/h/0/attn/c_attn/kernel' has rank 3" in \
        capsys.readouterr().err
    assert squad.main(["--layers-to-transform", "4,7", "--output-dir", str(tmp_path / "x")]) == 1
    assert "layers_to_transform=[4, 7] (layers_pattern=None) keeps none of the 12 targeted weights" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_examples_past_the_positions_are_refused(tiny_gpt2_dir, tmp_path, capsys):
    """A training example longer than the tiny GPT-2's 64 positions would read NaN position rows: it
    is refused by name before anything is written (packed rows may be longer: see the packing test)."""
    ctx = "Ana lives in Rome. Bo lives in Oslo. Cy lives in Lima."
    record = {"id": "q", "question": "Where does Cy live?",
              "answers": [{"text": "Lima", "answer_start": ctx.index("Lima")}]}
    (tmp_path / "long.json").write_text(json.dumps({"version": "1.1", "data": [
        {"title": "t", "paragraphs": [{"context": ctx, "qas": [record]}]}]}))
    args = cli_args(tiny_gpt2_dir, tmp_path / "long.json", tmp_path / "x", "--steps", "1")
    args[args.index("--max-len") + 1] = "128"
    assert squad.main(args) == 1
    assert "a training example of 85 tokens exceeds the 64 positions of model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    args[args.index("--max-len") + 1] = "64"  # what the error asks: the context is cut around the answer
    assert squad.main(args) == 0


def test_validation_questions_that_do_not_fit(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    """A validation question whose prompt cannot fit scores 0 (as evaluate-v1.1.py scores a
    missing prediction), counted in the log; none fitting, a prompt + answer past the positions,
    or a batch the devices cannot split is refused before anything is written."""
    from train import data as squad_data
    from train.metrics import squad_scores
    (tmp_path / "d").mkdir()
    tiny_squad(tmp_path / "d" / "train.json")
    doc = json.loads((tmp_path / "d" / "train.json").read_text())
    doc["data"][0]["paragraphs"][0]["qas"][0]["question"] = "Where " + "in the wide world " * 3 + "?"  # a prompt of 76 tokens
    (tmp_path / "d" / "validation.json").write_text(json.dumps(doc))
    out = tmp_path / "run"
    assert squad.main(cli_args(tiny_gpt2_dir, tmp_path / "d", out, "--steps", "1", "--no-base-eval")) == 0
    assert "validation: 1 of 4 questions do not fit --max-len 48 minus --max-new-tokens 4; they score 0" in \
        capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    preds = json.loads((out / "predictions_lora.json").read_text())
    records = squad_data.load_split(tmp_path / "d", "validation").records[:4]
    assert s["eval_questions"] == 4 and len(preds) == 3 and records[0].id not in preds
    assert s["scores"]["lora"] == squad_scores(preds, records)

    for flags, msg in [(["--max-new-tokens", "47"], "no validation question fits --max-len 48 minus --max-new-tokens 47"),
                       (["--max-len", "128"], "a validation prompt of 76 tokens + --max-new-tokens 4 exceeds the 64 "
                        "positions of model"),
                       (["--batch-size", "6"], "--batch-size 6 is not divisible by the 4 devices")]:
        if "6" in flags:
            monkeypatch.setattr(jax, "device_count", lambda: 4)
        args = cli_args(tiny_gpt2_dir, tmp_path / "d", tmp_path / "x", "--steps", "1")
        for f, v in zip(flags[::2], flags[1::2]):
            args[args.index(f) + 1] = v
        assert squad.main(args) == 1
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_reduce_intruders_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--reduce-intruders scores and saves the reduced adapter next to the trained one (what
    lj.reduce_intruders makes of the saved adapter) and reports the LM loss on the contexts."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "reduced"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "2", "--no-base-eval", "--lr", "0.1",
                               "--alpha", "256", "--reduce-intruders", "0.5")) == 0  # a big delta: intruders
    assert "LM loss on the validation contexts: base model " in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"lora", "reduced"}
    got = summary["reduce_intruders"]
    assert got["mitigation_lambda"] == 0.5 and got["matrices"] == 2 and got["intruders"] > 0
    assert got["context_loss"]["reduced"] != got["context_loss"]["lora"]
    assert set(got["context_loss"]) == {"base", "lora", "reduced"} and all(
        np.isfinite(v) for v in got["context_loss"].values())
    params = from_pretrained(tiny_gpt2_dir)[1]
    trained, reduced = checkpoint.load(out / "adapter", params), lp.load_peft(out / "peft_reduced", params)
    want, found = lj.reduce_intruders(trained.config, params, trained.adapters, mitigation_lambda=0.5)
    assert sum(int(n) for n in found.values()) == got["intruders"]
    for p, ab in want.items():
        for k in ("lora_A", "lora_B"):
            np.testing.assert_allclose(reduced.adapters[p][k], ab[k], atol=1e-6)
    assert (out / "predictions_reduced.json").is_file()


def test_velora_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--velora-groups trains with VeLoRA: lora_A then moves differently from a plain run's (its first
    gradients are zero either way, lora_B starting at 0 and the warmup's first rate being 0) and the
    PEFT export carries velora_config; --velora-init batch_average_once fixes each projection from
    the first training batch (a unit vector, in both files), and lora_A moves differently again."""
    data = tiny_squad(tmp_path / "squad.json")
    runs = {}
    for name, extra in (("plain", []), ("velora", ["--velora-groups", "4"]),
                        ("once", ["--velora-groups", "4", "--velora-init", "batch_average_once"])):
        assert squad.main(cli_args(tiny_gpt2_dir, data, tmp_path / name, "--steps", "3", "--no-base-eval",
                                   "--eval-samples", "1", *extra)) == 0
        runs[name] = checkpoint.load(tmp_path / name / "adapter", from_pretrained(tiny_gpt2_dir)[1])
    assert "VeLoRA: each adapted matrix's projection fixed from the first training batch" in capsys.readouterr().out
    assert runs["velora"].config.velora_num_groups == 4
    for p, ab in runs["plain"].adapters.items():
        for other in ("velora", "once"):
            assert np.abs(np.asarray(runs[other].adapters[p]["lora_A"]) - np.asarray(ab["lora_A"])).max() > 1e-6
        assert np.abs(np.asarray(runs["once"].adapters[p]["lora_A"])
                      - np.asarray(runs["velora"].adapters[p]["lora_A"])).max() > 1e-7
    cfg = json.loads((tmp_path / "velora" / "peft" / "adapter_config.json").read_text())
    assert cfg["velora_config"] == {"num_groups": 4, "scale": 1, "init_type": "batch_average"}
    cfg = json.loads((tmp_path / "once" / "peft" / "adapter_config.json").read_text())
    assert cfg["velora_config"]["init_type"] == "batch_average_once"
    tensors = lp.read_tensors(tmp_path / "once" / "peft" / lp.WEIGHTS_FILE)
    for p, ab in runs["once"].adapters.items():
        v = np.asarray(ab[lj.velora.EMBED])
        assert abs(np.linalg.norm(v) - 1) < 1e-5
        np.testing.assert_array_equal(tensors[f"base_model.model.{p.removesuffix('/kernel').replace('/', '.')}"
                                             ".lora_velora_embed"], v)


def test_kasa_through_the_cli(tiny_gpt2_dir, tiny_bloom_dir, tmp_path, capsys):
    """--kasa trains KaSA with its regulariser (logged per step) on the truncated base; the BLOOM
    adapter goes out in PEFT's format and, given back with --init-adapter, is scored on that base
    again (the same predictions); GPT-2's Conv1D layers get no PEFT copy, and the table says why."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "bloom"
    common = ["--no-base-eval", "--eval-samples", "2", "--lr", "0.1"]
    assert squad.main(cli_args(tiny_bloom_dir, data, out, "--steps", "2", "--kasa", *common)) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["regularizer"] > 0 for r in rows)
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert cfg["kasa_config"] == {"beta": 0.0001, "gamma": 0.001}
    again = tmp_path / "again"
    assert squad.main(cli_args(tiny_bloom_dir, data, again, "--eval-only", "--init-adapter", str(out / "peft"),
                               *common)) == 0
    assert "kasa: the adapted weights lose their r smallest singular components" in capsys.readouterr().out
    predictions = lambda d: json.loads((d / "predictions_lora.json").read_text())  # noqa: E731
    assert predictions(again) == predictions(out)

    assert squad.main(cli_args(tiny_gpt2_dir, data, tmp_path / "gpt2", "--steps", "1", "--kasa", *common)) == 0
    printed = capsys.readouterr().out
    assert "no PEFT copy: PEFT's KaSA takes nn.Linear layers only" in printed and "| LoRA (KaSA) |" in printed
    assert json.loads((tmp_path / "gpt2" / "summary.json").read_text())["peft_dir"] is None
    assert not (tmp_path / "gpt2" / "peft").exists()


def test_adalora_through_the_cli(tiny_bloom_dir, tmp_path, capsys):
    """--adalora trains AdaLoRA: its orthogonal regulariser logged per step, the ranks pruned to the
    target on average by the end (reported), a PEFT AdaLoRA export that, given back with
    --init-adapter, scores the same predictions; stopped and resumed, the same export (the
    allocator's state is in the checkpoints)."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "ada"
    common = ["--no-base-eval", "--eval-samples", "2", "--lr", "0.05", "--targets", "query_key_value,dense_4h_to_h"]
    assert squad.main(cli_args(tiny_bloom_dir, data, out, "--steps", "10", "--rank", "4", "--adalora", "2",
                               *common)) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["regularizer"] > 0 for r in rows)
    alloc = json.loads((out / "summary.json").read_text())["adalora"]
    assert (alloc["target_r"], alloc["initial"], alloc["kept"]) == (2, 16, 8)
    assert "| LoRA (AdaLoRA, 8 of 16 triplets) |" in printed and "AdaLoRA: 8 of 16 triplets kept" in printed
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["init_r"], cfg["target_r"], cfg["total_step"], cfg["tinit"], cfg["tfinal"]) == \
        ("ADALORA", 4, 2, 10, 1, 2)
    assert sum(sum(v) for v in cfg["rank_pattern"].values()) == 8
    again = tmp_path / "again"
    assert squad.main(cli_args(tiny_bloom_dir, data, again, "--eval-only", "--init-adapter", str(out / "peft"),
                               *common)) == 0
    predictions = lambda d: json.loads((d / "predictions_lora.json").read_text())  # noqa: E731
    assert predictions(again) == predictions(out)
    split = tmp_path / "split"
    for extra in (["--stop-after", "6"], ["--resume"]):
        assert squad.main(cli_args(tiny_bloom_dir, data, split, "--steps", "10", "--rank", "4", "--adalora", "2",
                                   *common, *extra)) == 0
    weights = lambda d: (d / "peft" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert weights(split) == weights(out)


def test_bdlora_through_the_cli(tiny_gpt2_dir, tiny_bloom_dir, tmp_path, capsys):
    """--bdlora-blocks trains BD-LoRA on every linear layer of BLOOM: the PEFT export holds the
    blocks alone (as many numbers as the summary's trainable count) and, given back with
    --init-adapter, scores the same predictions. GPT-2's Conv1D layers get no PEFT copy."""
    from safetensors.numpy import load_file

    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "bd"
    common = ["--no-base-eval", "--eval-samples", "2", "--lr", "0.05"]
    assert squad.main(cli_args(tiny_bloom_dir, data, out, "--steps", "3", "--bdlora-blocks", "2",
                               "--targets", "all-linear", *common)) == 0
    printed = capsys.readouterr().out
    assert "| LoRA (BD-LoRA, 2 blocks) |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bdlora"]["nblocks"] == 2
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert cfg["use_bdlora"] == {"target_modules_bd_a": ["self_attention.dense", "dense_4h_to_h"],
                                 "target_modules_bd_b": ["query_key_value", "dense_h_to_4h"], "nblocks": 2,
                                 "match_strict": True}
    tensors = load_file(out / "peft" / "adapter_model.safetensors")
    m = "base_model.model.transformer.h.0."
    assert tensors[m + "mlp.dense_4h_to_h.lora_A.weight"].shape == (4, 96)  # (r, in/2)
    assert tensors[m + "self_attention.query_key_value.lora_B.weight"].shape == (144, 2)  # (out, r/2)
    assert summary["trainable_params"] == sum(v.size for v in tensors.values())
    again = tmp_path / "again"
    assert squad.main(cli_args(tiny_bloom_dir, data, again, "--eval-only", "--init-adapter", str(out / "peft"),
                               *common)) == 0
    predictions = lambda d: json.loads((d / "predictions_lora.json").read_text())  # noqa: E731
    assert predictions(again) == predictions(out)
    for flag, said in (("--reduce-intruders", "whose blocks the reduction's new factors break"),
                       ("--lorafa", "whose blocks LoRA-FA's projection of lora_B's gradient does not keep")):
        assert squad.main(cli_args(tiny_bloom_dir, data, tmp_path / "no", "--init-adapter", str(out / "peft"),
                                   flag, *common)) == 1
        assert said in capsys.readouterr().err and not (tmp_path / "no").exists()

    assert squad.main(cli_args(tiny_gpt2_dir, data, tmp_path / "gpt2", "--steps", "1", "--bdlora-blocks", "2",
                               *common)) == 0
    assert "no PEFT copy: PEFT's BD-LoRA takes nn.Linear layers only" in capsys.readouterr().out
    assert not (tmp_path / "gpt2" / "peft").exists()


def test_mica_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--init mica trains lora_A on MiCA's fixed lora_B: the saved adapter's lora_B is what lj.init
    makes, its lora_A moved, and the PEFT export says init_lora_weights="mica"."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "mica"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "3", "--no-base-eval", "--eval-samples", "1",
                               "--init", "mica")) == 0
    assert "MiCA: lora_B fixed at W0's minor singular directions" in capsys.readouterr().out
    params = from_pretrained(tiny_gpt2_dir)[1]
    saved = checkpoint.load(out / "adapter", params)
    start = lj.init(saved.config, params, jax.random.key(0))
    for p, ab in saved.adapters.items():
        np.testing.assert_array_equal(ab["lora_B"], start[p]["lora_B"])
        assert np.abs(np.asarray(ab["lora_A"])).max() > 1e-4
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"


def test_text_loss_is_transformers_loss(tiny_gpt2_dir):
    """The LM loss on texts is transformers' own (token-weighted over texts of different lengths,
    cut to max_len, with all-padding rows in the last batch)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from lora_jax.models import load_tokenizer
    from train.evaluate import text_loss

    model, params = from_pretrained(tiny_gpt2_dir)
    tok = load_tokenizer(tiny_gpt2_dir)
    texts = ["Ana lives in Rome and Bo lives in Oslo.", "Hello world!", "x", " ".join(NAMES * 4)]
    got = text_loss(model.apply, params, tok, texts, max_len=24, batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    total = count = 0.0
    for t in texts:
        ids = tok(t)["input_ids"][:24]
        if len(ids) > 1:
            with torch.no_grad():
                total += float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss) * (len(ids) - 1)
            count += len(ids) - 1
    assert got == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("alora", [False, True], ids=["lora", "alora"])
def test_packed_loss_and_gradient_are_the_unpacked_ones(tiny_bloom_dir, tmp_path, alora):
    """The job's loss on packed rows (--packing) is the sum of each example's unpacked loss terms, and
    so is its gradient: the same sum and target count, with dropout off; with --alora too, the
    adapter acting from each packed prompt's own ANSWER marker on."""
    from transformers import AutoTokenizer

    from train import data as squad_data
    from train.loop import target_loss
    from train.run import lora_logits

    model, params = from_pretrained(tiny_bloom_dir)
    tok = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    records = squad_data.load_split(tiny_squad(tmp_path / "squad.json"), "train").records
    examples = squad_data.encode(tok, records, 48, train=True).examples
    rows = squad_data.pack(examples, 120)
    assert len(rows) < len(examples)
    marker = tok(squad_data.ANSWER_MARKER, add_special_tokens=False)["input_ids"]
    config = lj.LoraConfig(rank=4, alpha=8, targets=["query_key_value", "dense_h_to_4h"],
                           alora_invocation_tokens=marker if alora else None)
    adapters = jax.tree.map(lambda x: x + 0.05, lj.init(config, params, jax.random.key(1)))
    pad = squad_data.pad_id_of(tok)
    loss = lambda batch, k: jax.value_and_grad(  # noqa: E731
        lambda a: target_loss(lora_logits(model, config), k)(params, a, jax.tree.map(jax.numpy.asarray, batch),
                                                               None), has_aux=True)(adapters)
    (total, count), grads = loss(squad_data.make_train_batch(examples, len(examples), (48,), pad),
                                 max(e.targets for e in examples))
    (p_total, p_count), p_grads = loss(squad_data.make_train_batch(rows, len(rows), (120,), pad),
                                       max(r.targets for r in rows))
    assert p_count == count == sum(e.targets for e in examples)
    np.testing.assert_allclose(p_total, total, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), p_grads, grads)


def test_packing_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--packing: the examples share rows (the count is logged and in summary.json); the first step's
    loss, at the zero-delta start, is transformers' mean answer-token loss over the examples it packed
    (all those --train-samples keeps here); the validation loss, on packed rows too, is the saved
    adapter's own, computed example by example."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train import data as squad_data

    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "packed"
    args = cli_args(tiny_gpt2_dir, data, out, "--steps", "2", "--no-base-eval", "--packing", "--eval-every", "2",
                    "--train-samples", "6")
    args[args.index("--max-len") + 1] = "128"  # two examples a row (positions restart: 64 suffice)
    assert squad.main(args) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    rows = s["packing"]["rows"]
    assert s["packing"]["examples"] == s["train_examples"] == 6 and rows <= 3  # 8 rows a step: all in the first
    assert "train: the first 6 of the 8 records (--train-samples)" in printed
    assert f"--packing: 6 training examples in {rows} rows of 128 tokens" in printed
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    records = squad_data.load_split(data, "train").records[:6]
    total = count = 0.0
    for e in squad_data.encode(tok, records, 128, train=True).examples:
        ids = torch.tensor(e.tokens[None], dtype=torch.long)
        labels = ids.clone()
        labels[0, :e.target_start] = -100  # the answer and EOS alone
        with torch.no_grad():
            total += float(hf(ids, labels=labels).loss) * e.targets
        count += e.targets
    assert losses(out)[0] == pytest.approx(total / count, rel=1e-5)
    np.testing.assert_allclose(losses(out, key="val_loss")[-1],
                               answer_loss(tiny_gpt2_dir, data, out / "adapter", max_len=128), rtol=1e-4)


def test_scoring_another_adapter_compiles_nothing(tiny_gpt2_dir, tmp_path):
    """The job scores adapters through one function of (params, adapters): a second adapter reuses
    the compiled generation and text loss (closed over, its arrays would be program constants and
    compile anew), and the answers are those of generating with the adapter closed over."""
    from lora_jax.models import generate, load_tokenizer
    from train import data as squad_data
    from train.evaluate import decode_answer, predict, text_loss

    model, params = from_pretrained(tiny_gpt2_dir)
    tok = load_tokenizer(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=2, alpha=4, targets=["c_attn", "c_fc"])
    g = lj.apply(model.apply, config)
    traced = []

    def apply(pa, *a, **k):  # runs (in Python) only when a computation using it is traced
        traced.append(a[0].shape)
        return g(*pa, *a, **k)
    records = squad_data.load_split(tiny_squad(tmp_path / "squad.json"), "validation").records
    examples = squad_data.encode(tok, records, 48, train=False).examples
    batch = next(squad_data.eval_batches(examples, batch_size=8, buckets=(48,), pad_id=squad_data.pad_id_of(tok)))
    texts = [r.context for r in records]
    answers, text_losses, compiled = [], [], []
    for seed in (1, 2):
        adapters = jax.tree.map(lambda x, s=seed: x + 0.3 * s, lj.init(config, params, jax.random.key(seed)))
        answers.append(predict(apply, (params, adapters), model, tok, examples, batch_size=8, buckets=(48,),
                               max_new_tokens=3))
        text_losses.append(text_loss(apply, (params, adapters), tok, texts, max_len=24, batch_size=4))
        compiled.append(len(traced))
        closed = lambda p, *a, _ab=adapters, **k: g(p, _ab, *a, **k)  # noqa: E731
        want = np.asarray(generate(closed, params, batch["input_ids"], batch["attention_mask"], model=model,
                                   max_new_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
        assert [answers[-1][i] for i in batch["ids"]] == [decode_answer(tok, row, tok.eos_token_id) for row in want]
    assert compiled[0] > 0 and compiled[1] == compiled[0]  # the second adapter traced (compiled) nothing
    assert answers[0] != answers[1] and text_losses[0] != text_losses[1]


def test_lorafa_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--lorafa trains lora_B alone: the saved lora_A is the run's initial one, lora_B moved."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "lorafa"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "2", "--no-base-eval", "--lorafa")) == 0
    assert "LoRA-FA: lora_A frozen at its start (" in capsys.readouterr().out
    params = from_pretrained(tiny_gpt2_dir)[1]
    saved = checkpoint.load(out / "adapter", params)
    start = lj.init(saved.config, params, jax.random.fold_in(jax.random.key(0), 1))  # run.py's init key, --seed 0
    for p, ab in saved.adapters.items():
        np.testing.assert_array_equal(ab["lora_A"], start[p]["lora_A"])
        assert np.abs(ab["lora_B"]).max() > 0
    assert json.loads((out / "summary.json").read_text())["lorafa"] is True


def test_alora_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--alora: the adapter acts from each prompt's answer marker on (here a --prompt-template's:
    its text after the last field), in training and in KV-cache scoring; the PEFT export carries the
    marker's tokens and scores the same through --init-adapter with that template; prompts without
    the marker (the default template's) are refused by name."""
    from transformers import AutoTokenizer

    from train import data as squad_data
    from train.run import check_invocation

    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "alora"
    template = ["--prompt-template", "Question: {question}\\nContext: {context}\\nAnswer:"]  # as typed in a shell
    # the MLP too: its last layer's input spans every token, in training and in the prefill
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "2", "--no-base-eval", "--alora", *template,
                               "--targets", "c_attn,c_fc")) == 0
    capsys.readouterr()
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    marker = peft_cfg["alora_invocation_tokens"]
    assert marker == AutoTokenizer.from_pretrained(tiny_gpt2_dir)("\nAnswer:", add_special_tokens=False)["input_ids"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alora_invocation_tokens"] == marker
    assert summary["prompt_template"] == "Question: {question}\nContext: {context}\nAnswer:"
    scored = tmp_path / "scored"
    assert squad.main(cli_args(tiny_gpt2_dir, data, scored, "--eval-only", "--no-base-eval",
                               "--init-adapter", str(out / "peft"))) == 1  # the default template's prompts
    assert f"aLoRA invocation tokens {marker} are missing from 8 of the 8 training prompts" in capsys.readouterr().err
    assert squad.main(cli_args(tiny_gpt2_dir, data, scored, "--eval-only", "--no-base-eval",
                               "--init-adapter", str(out / "peft"), *template)) == 0
    assert json.loads((scored / "predictions_lora.json").read_text()) == \
        json.loads((out / "predictions_lora.json").read_text())
    config = lj.LoraConfig(rank=2, targets=["c_attn"], alora_invocation_tokens=marker)
    check_invocation(config, {"training": [squad_data.Encoded("ok", np.array([5, *marker, 6]), 3, False)]})
    with pytest.raises(ValueError, match=r"are missing from 1 of the 2 validation prompts \(e.g. 'q7'\)"):
        check_invocation(config, {"validation": [squad_data.Encoded("ok", np.array([*marker, 6]), 3, False),
                                                 squad_data.Encoded("q7", np.array([5, 6, 7]), 3, False)]})


def test_eva_init_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """--init eva reads the layer inputs on training batches, redistributes the ranks, trains,
    and both exports carry EVA's ranks and scales."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "eva"
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "1", "--no-base-eval", "--init", "eva",
                               "--init-batches", "2", "--eva-rho", "3", "--targets", "c_attn,c_fc")) == 0
    assert "init eva: 2 batches; ranks" in capsys.readouterr().out
    saved = checkpoint.load(out / "adapter", from_pretrained(tiny_gpt2_dir)[1])
    ranks = {p: ab["lora_A"].shape[-1] for p, ab in saved.adapters.items()}
    assert saved.config.init == "eva" and sum(ranks.values()) == 4 * 4 and len(set(ranks.values())) > 1
    assert all(saved.config.rank_for(p) == r and saved.config.scale_for(p) == 2.0 for p, r in ranks.items())
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["rank_pattern"] and json.loads((out / "summary.json").read_text())["init"] == "eva"


@pytest.mark.parametrize("init,flags,said", [("corda", ["--corda-method", "kpm"], "init corda (kpm, 2 batches)"),
                                              ("lora_ga", [], "init lora_ga (2 batches)")])
def test_residual_data_inits_through_the_cli(init, flags, said, tiny_gpt2_dir, tmp_path, capsys):
    """--init corda / lora_ga: the residual base from the first batches (their inputs' covariance,
    the loss gradient), trained, saved as plain rank-2r LoRA on the original weights that the PEFT
    export carries too."""
    data = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / init
    assert squad.main(cli_args(tiny_gpt2_dir, data, out, "--steps", "1", "--no-base-eval", "--init", init,
                               "--init-batches", "2", *flags)) == 0
    assert said in capsys.readouterr().out
    params = from_pretrained(tiny_gpt2_dir)[1]
    saved = checkpoint.load(out / "adapter", params)
    assert saved.config.init == "kaiming_uniform" and saved.config.rank == 8  # to_plain: rank 2r on W0
    assert json.loads((out / "summary.json").read_text())["init"] == init
    assert lp.load_peft(out / "peft", params).config.rank == 8


def test_the_job_on_the_gpu_branch(tiny_bloom_dir, tmp_path, monkeypatch, cudnn_standin):
    """The job as a GPU runs it, on CPU: jax.default_backend() says "gpu" (bf16 compute by
    default, the models' cuDNN attention branch, padding mask and ALiBi bias included), cuDNN's
    kernel stood in for by a custom_vjp around XLA attention (jax's cuDNN attention is one):
    training, validation and generation go through and the adapters are saved."""
    import jax.numpy as jnp

    seen = []

    def check(implementation, q, bias, mask):
        if implementation == "cudnn":
            assert q.dtype == jnp.bfloat16 and (bias is None or bias.dtype == jnp.bfloat16)
            seen.append(q.shape)
    cudnn_standin(check)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    data, out = tiny_squad(tmp_path / "squad.json"), tmp_path / "run"
    assert squad.main(cli_args(tiny_bloom_dir, data, out, "--steps", "2")) == 0
    train = losses(out)
    assert seen and len(train) == 2 and all(math.isfinite(x) for x in train)
    assert (out / "adapter").is_dir() and (out / "peft").is_dir()
