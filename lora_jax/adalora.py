"""AdaLoRA (Zhang et al. 2023; PEFT's `AdaLoraConfig` / `AdaLoraModel`): SVD-shaped adapters whose
ranks training allocates.

    config = LoraConfig(rank=12, alpha=32, targets=["c_attn"], adalora=AdaLoraSchedule(target_r=8, total_step=T))
    adapters = lj.init(config, params, key)                      # A, B ~ N(0, 0.02^2), lora_E = 0
    tx = rank_allocator(config, optax.adamw(1e-3))               # outermost: it needs the raw gradients
    loss = task_loss + orth_loss(config, adapters)               # inside the differentiated function

Each adapted W0 acts as W0 + s * A diag(E) B, s = alpha / (r + 1e-5) with r the initial rank (PEFT's
`init_r`): r triplets (a column of A, an entry of E, a row of B). After every update the allocator
smooths each entry's sensitivity |w * g| (EMA, beta1) and its uncertainty (EMA of the deviation,
beta2), scores each triplet by the sum of its E entry's score and the means of its A column's and
B row's scores, and zeroes the E entries of the lowest-scored triplets across all adapted matrices
so that the number kept follows PEFT's cubic budget: r per matrix until step tinit, target_r per
matrix from step total_step - tfinal on, pruned every deltaT steps in between, and held on that
final allocation afterwards. A zeroed triplet adds nothing, so `to_lora` drops it exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from .config import AdaLoraSchedule, LoraConfig
from .lora import ADALORA_E, Adapters, delta_b, orth_norms
from .optim import _adapter_dicts

PyTree = Any
FACTORS = ("lora_A", "lora_B", ADALORA_E)

__all__ = ["AdaLoraSchedule", "AllocatorState", "budget", "kept", "orth_loss", "rank_allocator", "to_lora"]


def _check(config: LoraConfig, where: str) -> AdaLoraSchedule:
    if config.adalora is None:
        raise ValueError(f"{where}: the config has no AdaLoRA schedule (LoraConfig.adalora)")
    return config.adalora


def budget(schedule: AdaLoraSchedule, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(triplets kept, whether to prune) at `step` (PEFT's RankAllocator.budget_schedule)."""
    t_end = schedule.total_step - schedule.tfinal
    if step <= schedule.tinit:
        return init_budget, False
    if step > t_end:
        return target_budget, True
    mul = 1 - (step - schedule.tinit) / (t_end - schedule.tinit)
    return int((init_budget - target_budget) * mul**3 + target_budget), step % schedule.deltaT == 0


class AllocatorState(NamedTuple):
    """`rank_allocator`'s state: `count` updates done; the EMAs of the sensitivity (`ipt`) and of
    its uncertainty (`unc`) per lora_A / lora_B / lora_E leaf; the latest allocation `mask`
    {path: [*S, r] bool, True = kept}; the wrapped optimizer's state."""

    count: jax.Array
    ipt: Adapters
    unc: Adapters
    mask: dict[str, jax.Array]
    inner: optax.OptState


def _triplets(ada: Adapters) -> dict[str, dict[str, jax.Array]]:
    return {p: ab for p, ab in ada.items() if isinstance(ab, dict) and ADALORA_E in ab}


def rank_allocator(config: LoraConfig, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap `tx` with AdaLoRA's rank allocation (PEFT's `update_and_allocate`, called after each
    optimizer step with the 0-based step number): the returned updates also zero the E entries of
    pruned triplets. Its params are the trainable tree (`split`'s) or bare adapters, as with any
    optax optimizer; the gradients must be the raw ones (make this the outermost transformation).
    """
    schedule = _check(config, "rank_allocator")
    t_end = schedule.total_step - schedule.tfinal
    b1, b2 = schedule.beta1, schedule.beta2

    def init(params):
        ada = _triplets(_adapter_dicts(params))
        if not ada:
            raise ValueError(f"rank_allocator: the params hold no AdaLoRA adapter (a {ADALORA_E!r} leaf)")
        zeros = {p: {k: jnp.zeros(ab[k].shape, jnp.float32) for k in FACTORS} for p, ab in ada.items()}
        mask = {p: jnp.ones(ab[ADALORA_E].shape, bool) for p, ab in ada.items()}
        return AllocatorState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, zeros), mask,
                              tx.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("rank_allocator scores |w * g| on the updated weights: pass params to update()")
        step = state.count
        updates, inner = tx.update(grads, state.inner, params)
        new = _triplets(_adapter_dicts(optax.apply_updates(params, updates)))
        g = _adapter_dicts(grads)
        matrices = sum(math.prod(ab[ADALORA_E].shape[:-1]) for ab in new.values())
        init_budget = sum(ab[ADALORA_E].size for ab in new.values())
        target_budget = schedule.target_r * matrices
        # The schedule in Python floats, as PEFT computes it, tabulated per step: exact budgets.
        table = np.array([budget(schedule, s, init_budget, target_budget) for s in range(t_end + 1)], np.int32)

        # Sensitivity on the updated weights with this step's gradients (PEFT: p * p.grad after step()).
        active = step < t_end
        ipt, unc = {}, {}
        for p, ab in new.items():
            ipt[p], unc[p] = {}, {}
            for k in FACTORS:
                s = jnp.abs(ab[k].astype(jnp.float32) * g[p][k].astype(jnp.float32))
                avg = b1 * state.ipt[p][k] + (1 - b1) * s
                dev = b2 * state.unc[p][k] + (1 - b2) * jnp.abs(s - avg)
                ipt[p][k] = jnp.where(active, avg, state.ipt[p][k])
                unc[p][k] = jnp.where(active, dev, state.unc[p][k])

        # Triplet scores: E's entry + the mean over A's column + the mean over B's row.
        score = {p: (ipt[p][ADALORA_E] * unc[p][ADALORA_E])
                 + ((ipt[p]["lora_A"] * unc[p]["lora_A"]).mean(-2) + (ipt[p]["lora_B"] * unc[p]["lora_B"]).mean(-1))
                 for p in new}  # [*S, r] each
        at = jnp.minimum(step, t_end)  # past t_end only the held allocation applies
        budget_now, prune_now = jnp.asarray(table[:, 0])[at], jnp.asarray(table[:, 1] != 0)[at]
        k = init_budget - budget_now  # how many triplets go (PEFT's kthvalue k)
        everything = jnp.sort(jnp.concatenate([s.reshape(-1) for s in score.values()]))
        threshold = everything[jnp.clip(k - 1, 0, init_budget - 1)]
        allocate = (prune_now & (step < t_end)) | (step == t_end)  # then: hold the last allocation
        mask = {p: jnp.where(allocate, (score[p] > threshold) | (k <= 0), state.mask[p]) for p in new}
        apply = allocate | (step > t_end)

        ad_updates = _adapter_dicts(updates)
        ad_params = _adapter_dicts(params)
        out = dict(ad_updates)
        for p in new:
            e_old, u = ad_params[p][ADALORA_E], ad_updates[p][ADALORA_E]
            # Zero a pruned E exactly: the update takes it to -e_old (apply_updates adds the two).
            zeroed = jnp.where(mask[p], u, (-e_old).astype(u.dtype))
            out[p] = {**ad_updates[p], ADALORA_E: jnp.where(apply, zeroed, u)}
        updates = {**updates, "adapters": out} if ad_updates is not updates else out
        return updates, AllocatorState(step + 1, ipt, unc, mask, inner)

    return optax.GradientTransformation(init, update)


def orth_loss(config: LoraConfig, adapters: Adapters) -> jax.Array:
    """orth_reg_weight * the mean over every adapted matrix's A and B of ||A^T A - I||_F and
    ||B B^T - I||_F (PEFT's AdaLoraModel adds it to the loss when given labels), over the triplets
    present."""
    schedule = _check(config, "orth_loss")
    terms = []
    for ab in _triplets(_adapter_dicts(adapters)).values():
        a, b = ab["lora_A"], ab["lora_B"]  # [*S, in, r], [*S, r, out]
        # A triplet with A's column and B's row both zero is absent (a PEFT file pruned it; load_peft
        # pads it back as zeros): PEFT's loaded model has no row or column for it in A^T A or B B^T.
        present = lax.stop_gradient((a != 0).any(-2) | (b != 0).any(-1))  # [*S, r]
        terms += [n.reshape(-1) for n in orth_norms(a, b, present)]
    if not terms:
        raise ValueError(f"orth_loss: the adapters hold no AdaLoRA adapter (a {ADALORA_E!r} leaf)")
    return schedule.orth_reg_weight * jnp.mean(jnp.concatenate(terms))


def kept(adapters: Adapters) -> dict[str, np.ndarray]:
    """{path: [*S, r] bool}: the triplets whose E entry is nonzero (a pruned one is exactly 0), what
    PEFT's `rank_pattern` records."""
    return {p: np.asarray(ab[ADALORA_E]) != 0 for p, ab in _triplets(adapters).items()}


def to_lora(config: LoraConfig, adapters: Adapters) -> tuple[LoraConfig, Adapters]:
    """AdaLoRA adapters as plain LoRA with the same deltas: B <- diag(E) B and each path's rank cut
    to its most kept triplets over the layer stack (at least 1), so `multi`, `combine`, `merge` and
    PEFT's plain LoRA files take them. Per-path ranks go to rank_pattern, and alpha_pattern keeps
    each path's scale."""
    _check(config, "to_lora")
    scale = config.scale_for("")
    out, ranks = {}, {}
    for p, ab in adapters.items():
        if ADALORA_E not in ab:
            out[p] = ab
            continue
        e = np.asarray(ab[ADALORA_E], np.float32)  # [*S, r]
        a = np.asarray(ab["lora_A"], np.float32)
        b = np.asarray(delta_b(ab), np.float32)  # diag(E) B [*S, r, out]
        keep = e != 0
        k = max(1, int(keep.sum(-1).max()))
        # Per matrix, the kept triplets first (stable order), then the pruned ones, cut to k.
        order = np.argsort(~keep, axis=-1, kind="stable")[..., :k]  # [*S, k]
        a_k = np.take_along_axis(a, order[..., None, :], axis=-1)  # [*S, in, k]
        b_k = np.take_along_axis(b, order[..., :, None], axis=-2)  # [*S, k, out]; a pruned row is 0 (E = 0)
        dtype = ab["lora_A"].dtype
        out[p] = {"lora_A": jnp.asarray(a_k, dtype), "lora_B": jnp.asarray(b_k, ab["lora_B"].dtype)}
        ranks[p] = k
    pattern = {re.escape(p): k for p, k in ranks.items() if k != config.rank}
    plain = dataclasses.replace(config, adalora=None, rank_pattern=pattern,
                                alpha=scale * config.rank,
                                alpha_pattern={q: scale * k for q, k in pattern.items()})
    return plain, out
