"""QLoRA against the reference implementations: NF4 codes, absmax and double quantization equal
bitsandbytes'; quantize() of a checkpoint equals transformers' 4-bit loading; adapters move both
ways between the NF4 base here and PEFT with transformers' logits; checkpoints transformers saved
in 4 bits load as they are (library and CLI)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax import quant
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 12], [1, 2, 3, 4, 5, 6, 7, 300]], np.int32)
ATOL = 1e-4


@pytest.mark.parametrize("shape,block", [((128, 96), 64), ((30, 10), 64), ((48, 144), 128)])
def test_nf4_codes_equal_bitsandbytes(shape, block):
    """Codes and absmax equal bitsandbytes' quantize_4bit of the torch Linear weight (out, in) =
    our kernel transposed, a last partial block included (30 x 10); so do the dequantized values,
    where bitsandbytes 0.50's CPU dequantize_4bit is right: for rows of 144 it returns values up to
    1.6 away from its own codes (max NF4 rounding error here: 0.49), so (48, 144) compares codes only."""
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    codes, absmax = quant.quantize_nf4(jnp.asarray(w), block)
    q, state = bnb_functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=block, quant_type="nf4")
    n = w.size
    np.testing.assert_array_equal(np.asarray(codes)[: n // 2], q.numpy().reshape(-1)[: n // 2])
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    ours = np.asarray(quant.dequantize_nf4(codes, absmax, shape, block, jnp.float32))
    # NF4 rounding: each value is within half the widest gap between levels of its block's scale.
    gap = np.diff(quant.NF4).max() / 2
    blocks = np.pad(w.T.reshape(-1), (0, -n % block)).reshape(-1, block)
    bound = np.repeat(np.abs(blocks).max(-1), block)[:n].reshape(shape[::-1]).T * gap
    assert (np.abs(ours - w) <= bound + 1e-6).all()
    if shape != (48, 144):
        np.testing.assert_array_equal(ours, bnb_functional.dequantize_4bit(q, state).numpy().T)


def test_double_quant_matches_bitsandbytes_nested_statistics():
    """Double quantization as bitsandbytes' `compress_statistics=True` stores it: the same dynamic
    map, offset (mean absmax) and second-level absmax; bitsandbytes' dequantization of its own
    state equals ours of that state. The 8-bit codes agree on >= 99% of the absmax: ours are the
    nearest map value, bitsandbytes' CPU search misses it for some values near a midpoint."""
    np.testing.assert_array_equal(quant.DYNAMIC, bnb_functional.create_dynamic_map(signed=True).numpy())
    w = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32) * 0.02  # 2048 blocks
    q, state = bnb_functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
    codes, absmax = quant.quantize_nf4(jnp.asarray(w), 64)
    qa, absmax2, offset = quant.quantize_absmax(absmax)
    np.testing.assert_allclose(np.asarray(offset), state.offset.item(), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(absmax2), state.state2.absmax.numpy())
    ref = state.absmax.numpy()
    agree = np.asarray(qa) == ref
    assert agree.mean() >= 0.99
    centred = (np.asarray(absmax) - np.asarray(offset)) / np.repeat(np.asarray(absmax2), 256)
    ours, theirs = np.abs(quant.DYNAMIC[np.asarray(qa)] - centred), np.abs(quant.DYNAMIC[ref] - centred)
    assert (ours <= theirs).all() and (ours[~agree] < theirs[~agree]).all()

    state_q = quant.QuantizedArray(jnp.asarray(q.numpy().reshape(-1)), jnp.asarray(ref),
                                   jnp.asarray(state.state2.absmax.numpy()), jnp.float32(state.offset.item()),
                                   w.shape, jnp.dtype(jnp.float32), 64)
    np.testing.assert_allclose(np.asarray(state_q.materialise()), bnb_functional.dequantize_4bit(q, state).numpy().T,
                               rtol=1e-6, atol=1e-7)
    ours_q = quant.quantize({"w": jnp.asarray(w)}, targets=["w"], double_quant=True)["w"]
    single = quant.quantize({"w": jnp.asarray(w)}, targets=["w"])["w"]
    assert np.abs(np.asarray(ours_q.materialise() - single.materialise())).max() < 0.01 * np.abs(w).max()
    assert quant.nbytes(ours_q) * 8 / w.size < 4.13 < 4.5 <= quant.nbytes(single) * 8 / w.size


def _bnb_model(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=qc, device_map="cpu")


def _hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def dequantized_reference(base_dir, dequantized: dict):
    """transformers' fp32 model of `base_dir` with the linear weights `dequantized` {module: (out, in)}."""
    ref = _hf_model(base_dir)
    with torch.no_grad():
        for mod_name, w in dequantized.items():
            mod = ref.get_submodule(mod_name)
            mod.weight.copy_(w.T if type(mod).__name__ == "Conv1D" else w)  # Conv1D holds (in, out)
    return ref


def lora_both_ways(model, qparams, reference, targets, tmp_path, nudge_torch) -> tuple[np.ndarray, object]:
    """On quantized params whose dequantized weights `reference()` holds: a PEFT-made adapter gives
    PEFT's logits here, and one trained here (3 Adam steps; the weights stay quantized) gives its
    logits here once PEFT loads it. Returns (those logits, the exported PEFT directory)."""
    want_base = _logits(reference())
    pm = nudge_torch(peft.get_peft_model(reference(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)),
                     seed=1)
    pm.save_pretrained(tmp_path / "peft_made")
    got = lp.load_peft(tmp_path / "peft_made", qparams, model_config=model.config)
    g = jax.jit(lj.apply(model.apply, got.config, strict=True))
    np.testing.assert_allclose(np.asarray(g(qparams, got.adapters, IDS)), _logits(pm), atol=ATOL, rtol=0)

    config = lj.LoraConfig(rank=4, alpha=8, targets=targets)
    apply = lj.apply(model.apply, config)

    def loss_fn(p, a, ids):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, a, ids)[:, :-1], ids[:, 1:]).mean()

    ts = lj.make_train_step(loss_fn, optax.adam(1e-2))
    trainable, frozen = lj.split(config, qparams, lj.init(config, qparams, jax.random.key(0)))
    opt, step = ts.init(trainable), jax.jit(ts.step)
    for _ in range(3):
        trainable, opt, _ = step(trainable, frozen, opt, IDS)
    qp, adapters = lj.join(trainable, frozen)
    assert all(isinstance(lj.tree.flatten(qp)[p], quant.QuantizedArray) for p in adapters)
    ours = np.asarray(jax.jit(apply)(qp, adapters, IDS))
    assert np.abs(ours - want_base).max() > 100 * ATOL
    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config)
    np.testing.assert_allclose(_logits(peft.PeftModel.from_pretrained(reference(), str(out)).eval()), ours,
                               atol=ATOL, rtol=0)
    return ours, out


@pytest.mark.parametrize("name,scan", [("gpt2", False), ("bloom", True)])
def test_qlora_matches_bitsandbytes_and_peft(name, scan, wide_dirs, tmp_path, nudge_torch):
    """quantize() of a checkpoint holds the codes and absmax transformers' 4-bit loading
    (bitsandbytes) holds. The reference is transformers' fp32 model with bitsandbytes' own
    dequantization of those weights (bitsandbytes' CPU forward rounds absmax to bf16, so its
    logits are not the reference): the NF4 base, a PEFT-made adapter on it, and an adapter trained
    here on the NF4 base and loaded by PEFT all give its logits; loaded by PEFT on transformers'
    4-bit model, that adapter gives them to within bitsandbytes' CPU rounding."""
    base_dir = wide_dirs[name]
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_4h_to_h"]}[name]
    model, params = from_pretrained(base_dir, scan_layers=scan)
    qparams = quant.quantize(params)
    flat = lj.tree.flatten(qparams)
    dequantized = {}
    for mod_name, mod in _bnb_model(base_dir).named_modules():
        if type(mod).__name__ != "Linear4bit":  # every linear layer is one; the tied head stays dense
            continue
        _, _, i, *module = mod_name.split(".")  # transformer.h.{i}.attn.c_attn
        q = flat[f"transformer/h/{'/'.join(module)}/kernel" if scan else f"transformer/h/{i}/{'/'.join(module)}/kernel"]
        codes, absmax = (q.codes[int(i)], q.absmax[int(i)]) if scan else (q.codes, q.absmax)
        np.testing.assert_array_equal(np.asarray(codes), mod.weight.data.numpy().reshape(-1), err_msg=mod_name)
        np.testing.assert_array_equal(np.asarray(absmax), mod.weight.quant_state.absmax.numpy(), err_msg=mod_name)
        dequantized[mod_name] = bnb_functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)  # (out, in)
    assert len(dequantized) == 4 * model.config.num_layers

    reference = functools.partial(dequantized_reference, base_dir, dequantized)
    want_base = _logits(reference())
    base = np.asarray(jax.jit(quant.apply(model.apply))(qparams, IDS))
    np.testing.assert_allclose(base, want_base, atol=ATOL, rtol=0)
    assert np.abs(np.asarray(model.apply(params, IDS)) - want_base).max() > 100 * ATOL  # NF4 did round
    ours, out = lora_both_ways(model, qparams, reference, targets, tmp_path, nudge_torch)
    # On transformers' own 4-bit model it loads and applies too; bitsandbytes' CPU forward (bf16
    # absmax) only lets us check it to a few percent of what the adapter changes.
    on_4bit = peft.PeftModel.from_pretrained(_bnb_model(base_dir), str(out)).eval()
    assert np.abs(_logits(on_4bit) - ours).max() < 0.05 * np.abs(want_base - ours).max()


def _save_4bit(base_dir, out, *, quant_type="nf4", double=False, storage="uint8"):
    """What `save_pretrained` writes for transformers' bitsandbytes 4-bit model of `base_dir`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                            bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=getattr(torch, storage))
    AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, device_map="cpu").save_pretrained(out)
    return out


@pytest.mark.parametrize("name,scan,double,storage", [("gpt2", False, True, "uint8"), ("bloom", True, False, "bfloat16")])
def test_transformers_4bit_checkpoint_loads(name, scan, double, storage, wide_dirs, tmp_path):
    """A checkpoint saved from transformers' bitsandbytes 4-bit model loads with its NF4 bytes as
    they are (packed in uint8 or, bnb_4bit_quant_storage, bf16 tensors): the codes quantize()
    makes from the fp32 checkpoint, the same absmax (or, double-quantized, the same scales), the
    same logits, with and without LoRA; an fp4 one is refused."""
    base_dir = wide_dirs[name]
    nf4 = _save_4bit(base_dir, tmp_path / "nf4", double=double, storage=storage)
    model, loaded = from_pretrained(nf4, scan_layers=scan)
    _, params = from_pretrained(base_dir, scan_layers=scan)
    ref = quant.quantize(params, double_quant=double)
    got, want = lj.tree.flatten(loaded), lj.tree.flatten(ref)
    assert got.keys() == want.keys()
    quantized = [p for p, x in want.items() if isinstance(x, quant.QuantizedArray)]
    assert quantized and all(isinstance(got[p], quant.QuantizedArray) for p in quantized)
    for p in quantized:
        a, b = got[p], want[p]
        assert a.shape == b.shape and a.block_size == 64 and (a.absmax2 is not None) == double, p
        np.testing.assert_array_equal(a.codes, b.codes, err_msg=p)
        np.testing.assert_allclose(a.scales(), b.scales(), rtol=1e-5, err_msg=p)
    run = quant.apply(model.apply)
    np.testing.assert_allclose(run(loaded, IDS), run(ref, IDS), atol=ATOL, rtol=0)

    config = lj.LoraConfig(rank=4, alpha=8, targets="all-linear")
    adapters = jax.tree.map(lambda x: x + 0.05, lj.init(config, loaded, jax.random.key(0)))
    g = lj.apply(model.apply, config)
    np.testing.assert_allclose(g(loaded, adapters, IDS), g(ref, adapters, IDS), atol=ATOL, rtol=0)

    if name == "gpt2":
        with pytest.raises(ValueError, match=r"transformer\.h\.0\..*weight: bitsandbytes quant type 'fp4'"):
            from_pretrained(_save_4bit(base_dir, tmp_path / "fp4", quant_type="fp4"))


def test_squad_cli_on_a_4bit_checkpoint(wide_dirs, tmp_path, capsys):
    """`python -m train.squad --model <4-bit checkpoint>` scores and trains QLoRA on the NF4
    weights as saved; flags that need full-precision weights are refused before any output."""
    from test_squad import cli_args, tiny_squad
    from train import squad

    nf4 = _save_4bit(wide_dirs["gpt2"], tmp_path / "nf4")
    data = tiny_squad(tmp_path / "squad.json")
    extra = ["--steps", "1", "--tokenizer", str(wide_dirs["gpt2"])]
    assert squad.main(cli_args(nf4, data, tmp_path / "run", *extra)) == 0
    printed = capsys.readouterr().out
    assert "| base model (nf4 checkpoint) |" in printed and "| QLoRA (nf4 checkpoint) |" in printed
    assert (tmp_path / "run" / "peft" / "adapter_config.json").is_file()
    for flag in (["--init", "pissa"], ["--full-finetune"], ["--quantize", "nf4"]):
        assert squad.main(cli_args(nf4, data, tmp_path / "bad", *extra, *flag)) == 1
        assert f"already 4-bit NF4, which {' '.join(flag)} cannot take" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def _bnb_quantized(directory, scheme: str):
    """transformers' bitsandbytes model of `directory`: "nf4", "nf4-double" (double quantization),
    "nf4-bf16" (a bf16 base) or "int8"."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = (BitsAndBytesConfig(load_in_8bit=True) if scheme == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=scheme == "nf4-double"))
    dtype = torch.bfloat16 if scheme == "nf4-bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=qc, device_map="cpu", dtype=dtype,
                                                attn_implementation="eager").eval()


@pytest.mark.parametrize("scheme", ["nf4", "nf4-double", "int8", "nf4-bf16"])
def test_requantizing_merge_is_peft_merge_and_unload(scheme, wide_dirs, tmp_path):
    """merge(..., requantize=True) of a PEFT adapter on the quantized base leaves the bytes that
    PEFT's merge_and_unload leaves in transformers' bitsandbytes model (dequantize, add s * B A in
    fp32, quantize that sum again with the same settings; on a bf16 base too), and the logits of
    that merged model; the weights without LoRA keep their bytes."""
    bf16 = scheme == "nf4-bf16"
    base_dir = wide_dirs["gpt2"]
    pm = peft.get_peft_model(_bnb_quantized(base_dir, scheme), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False))  # random A and B
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    model, params = from_pretrained(base_dir, dtype=jnp.bfloat16 if bf16 else jnp.float32)
    qparams = quant.quantize(params, scheme="int8" if scheme == "int8" else "nf4", double_quant=scheme == "nf4-double")
    got = lp.load_peft(tmp_path / "adapter", qparams, model_config=model.config)
    if bf16:  # PEFT keeps its adapters in fp32 on a bf16 base (autocast_adapter_dtype)
        got = got._replace(adapters=jax.tree.map(lambda x: x.astype(jnp.float32), got.adapters))
    ours = lj.merge(got.config, jax.tree.map(jnp.copy, qparams), got.adapters, requantize=True)
    flat, before = lj.tree.flatten(ours), lj.tree.flatten(qparams)
    dequantized = {}
    for mod_name, mod in merged.named_modules():
        if type(mod).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        path = "transformer/h/" + mod_name.split(".", 2)[2].replace(".", "/") + "/kernel"
        q, w = flat[path], mod.weight
        assert isinstance(q, quant.QuantizedArray) and q.scheme == before[path].scheme
        assert q.block_size == before[path].block_size and (q.absmax2 is None) == (before[path].absmax2 is None)
        changed = mod_name.endswith(("c_attn", "c_fc"))
        assert changed != np.array_equal(np.asarray(q.codes), np.asarray(before[path].codes)), mod_name
        np.testing.assert_array_equal(np.asarray(q.codes), w.data.numpy().reshape(-1), err_msg=mod_name)
        if scheme == "int8":
            np.testing.assert_array_equal(np.asarray(q.absmax), w.SCB.numpy(), err_msg=mod_name)
            dequantized[mod_name] = bnb_functional.int8_vectorwise_dequant(w.data, w.SCB)
        else:
            dequantized[mod_name] = bnb_functional.dequantize_4bit(w.data, w.quant_state).float()
            np.testing.assert_allclose(np.asarray(q.materialise(), np.float32), dequantized[mod_name].numpy().T,
                                       rtol=1e-2 if bf16 else 1e-6, err_msg=mod_name)
    assert len(dequantized) == 4 * model.config.num_layers
    if bf16:  # the bytes are the point; bf16 logits differ from the fp32 reference by bf16 rounding
        return
    np.testing.assert_allclose(np.asarray(jax.jit(quant.apply(model.apply))(ours, IDS)),
                               _logits(dequantized_reference(base_dir, dequantized)), atol=ATOL, rtol=0)


def test_from_bnb_partial_block_has_the_codes_quantize_makes():
    """A 4-bit weight whose size is no multiple of the block (30 x 10, blocks of 64) loads from
    bitsandbytes' saved state with the QuantizedArray quantize() makes of the same weight, padding
    bytes included (both pad with NF4's zero), and the values bitsandbytes dequantizes."""
    w = np.random.default_rng(3).standard_normal((30, 10)).astype(np.float32)  # [in, out]
    q, state = bnb_functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4")
    saved = {"m.weight": q.numpy()} | {f"m.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}
    got = quant.from_bnb(saved)["m.weight"]
    want = quant.quantize({"w": jnp.asarray(w)}, targets=["w"])["w"]
    assert got.shape == want.shape and got.codes.shape == want.codes.shape == (160,)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(got.materialise()), bnb_functional.dequantize_4bit(q, state).numpy().T)
