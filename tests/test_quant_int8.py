"""8-bit frozen weights against bitsandbytes and transformers' `load_in_8bit`: the codes and row
absmax equal bitsandbytes'; quantize(scheme="int8") of a checkpoint equals transformers' 8-bit
loading and its saved checkpoint loads as it is; LoRA adapters move both ways with PEFT; the CLI
trains on int8 weights, made here or loaded."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import quant
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from test_quant_bnb import ATOL, IDS, _logits, dequantized_reference, lora_both_ways  # noqa: E402


def test_int8_codes_equal_bitsandbytes():
    """Codes and absmax equal bitsandbytes' int8_vectorwise_quant of the fp16 torch weight (out, in)
    = our kernel transposed, an all-zero row and fp16 rounding ties included; the dequantized
    weight equals bitsandbytes' int8_vectorwise_dequant and is within half a step of w."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:, 3] = 0  # output feature 3: an all-zero row of the torch weight
    w[0, 5] = np.abs(w[:, 5]).max() * 63.5 / 127  # exactly half a step: rounds to even (64 -> 64, 63.5 -> 64)
    # bitsandbytes scales by reciprocal(absmax) * 127: here -37.49999 -> -37, where * (127 / absmax) gives -38
    w[:, 7] = np.clip(w[:, 7], -0.5, 0.5)
    w[0, 7], w[1, 7] = 0.6821289, -0.20141602
    codes, absmax = quant.quantize_int8(jnp.asarray(w))
    ref_codes, ref_absmax, _ = bnb_functional.int8_vectorwise_quant(torch.from_numpy(w.T.copy()).half())
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax), ref_absmax.numpy())
    assert (np.asarray(codes).reshape(40, 96)[3] == 0).all() and np.asarray(codes).reshape(40, 96)[7, 1] == -37
    ours = np.asarray(quant.dequantize_int8(codes, absmax, w.shape, jnp.float32))
    np.testing.assert_array_equal(ours, bnb_functional.int8_vectorwise_dequant(ref_codes, ref_absmax).numpy().T)
    assert (np.abs(ours - w) <= np.asarray(absmax)[None, :] / 254 + 1e-3 * np.abs(w)).all()  # fp16 + half a step
    # Stacks (scanned layers) quantize matrix by matrix; int8 takes no NF4 settings.
    stack = quant.quantize({"kernel": jnp.stack([w, 2 * w])}, targets=["kernel"], scheme="int8")["kernel"]
    assert stack.shape == (2, 96, 40) and stack.absmax.shape == (2, 40) and quant.nbytes(stack) == 2 * (96 * 40 + 160)
    np.testing.assert_array_equal(np.asarray(stack.materialise()[0]), ours)
    with pytest.raises(ValueError, match="scheme 'int8' keeps one absmax per output feature"):
        quant.quantize({"kernel": jnp.asarray(w)}, targets=["kernel"], scheme="int8", double_quant=True)
    with pytest.raises(ValueError, match=r"scheme 'int4' is not one of \('nf4', 'int8'\)"):
        quant.quantize({"kernel": jnp.asarray(w)}, targets=["kernel"], scheme="int4")


def _int8_model(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu", attn_implementation="eager").eval()


@pytest.mark.parametrize("name,scan", [("gpt2", False), ("bloom", True)])
def test_int8_base_matches_transformers_and_peft(name, scan, wide_dirs, tmp_path, nudge_torch):
    """quantize(scheme="int8") of a checkpoint holds the codes and SCB of transformers' load_in_8bit
    model, and the checkpoint that model saves loads with those bytes. The reference is
    transformers' fp32 model with bitsandbytes' dequantization of those weights: the int8 base, a
    PEFT-made adapter on it and an adapter trained here on the int8 base (and loaded by PEFT) all
    give its logits. On transformers' own 8-bit model (whose kernel rounds the activations to int8
    too) that adapter changes the logits as it does here, to within that rounding."""
    base_dir = wide_dirs[name]
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_4h_to_h"]}[name]
    model, params = from_pretrained(base_dir, scan_layers=scan)
    qparams = quant.quantize(params, scheme="int8")
    flat = lj.tree.flatten(qparams)
    bnb = _int8_model(base_dir)
    dequantized = {}
    for mod_name, mod in bnb.named_modules():
        if type(mod).__name__ != "Linear8bitLt":  # every linear layer is one; the tied head stays dense
            continue
        _, _, i, *module = mod_name.split(".")  # transformer.h.{i}.attn.c_attn
        q = flat[f"transformer/h/{'/'.join(module)}/kernel" if scan else f"transformer/h/{i}/{'/'.join(module)}/kernel"]
        codes, absmax = (q.codes[int(i)], q.absmax[int(i)]) if scan else (q.codes, q.absmax)
        np.testing.assert_array_equal(np.asarray(codes), mod.weight.data.numpy().reshape(-1), err_msg=mod_name)
        np.testing.assert_array_equal(np.asarray(absmax), mod.weight.SCB.numpy(), err_msg=mod_name)
        dequantized[mod_name] = bnb_functional.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB)  # (out, in)
    assert len(dequantized) == 4 * model.config.num_layers

    # What transformers saves from its 8-bit model loads as the same QuantizedArrays.
    bnb.save_pretrained(tmp_path / "int8")
    _, loaded = from_pretrained(tmp_path / "int8", scan_layers=scan)
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    reference = functools.partial(dequantized_reference, base_dir, dequantized)
    want_base = _logits(reference())
    base = np.asarray(jax.jit(quant.apply(model.apply))(loaded, IDS))
    np.testing.assert_allclose(base, want_base, atol=ATOL, rtol=0)
    assert np.abs(np.asarray(model.apply(params, IDS)) - want_base).max() > 10 * ATOL  # int8 did round
    ours, out = lora_both_ways(model, qparams, reference, targets, tmp_path, nudge_torch)
    on_int8 = _logits(peft.PeftModel.from_pretrained(_int8_model(base_dir), str(out)).eval())
    bnb_base = _logits(_int8_model(base_dir))
    effect = ours - want_base
    assert np.abs((on_int8 - bnb_base) - effect).max() < 0.1 * np.abs(effect).max()


def test_squad_cli_on_int8_weights(wide_dirs, tmp_path, capsys):
    """`--quantize int8` trains LoRA on int8 weights (a quarter of fp32's linear bytes, plus the row
    scales); a checkpoint transformers saved in 8 bits trains as it is; NF4-only flags are refused."""
    from test_squad import cli_args, tiny_squad
    from train import squad

    data = tiny_squad(tmp_path / "squad.json")
    extra = ["--steps", "1", "--no-base-eval"]
    assert squad.main(cli_args(wide_dirs["gpt2"], data, tmp_path / "run", *extra, "--quantize", "int8")) == 0
    printed = capsys.readouterr().out
    assert "| LoRA (int8) |" in printed and "int8: frozen params" in printed
    assert (tmp_path / "run" / "peft" / "adapter_config.json").is_file()

    _int8_model(wide_dirs["gpt2"]).save_pretrained(tmp_path / "int8")
    extra += ["--tokenizer", str(wide_dirs["gpt2"])]
    assert squad.main(cli_args(tmp_path / "int8", data, tmp_path / "run8", *extra)) == 0
    assert "| LoRA (int8 checkpoint) |" in capsys.readouterr().out
    assert squad.main(cli_args(tmp_path / "int8", data, tmp_path / "bad", *extra, "--init", "pissa")) == 1
    assert "already 8-bit (LLM.int8 rows), which --init pissa cannot take" in capsys.readouterr().err
    for flags, msg in [(["--quantize", "int8", "--double-quant"], "--double-quant quantizes the scales of --quantize nf4"),
                       (["--quantize", "int8", "--quant-block-size", "128"], "--quant-block-size sets the NF4 blocks"),
                       (["--quantize", "int8", "--init", "loftq"], "--init loftq fits the adapters to 4-bit NF4")]:
        with pytest.raises(SystemExit):
            squad.main([*flags, "--output-dir", str(tmp_path / "bad")])
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
