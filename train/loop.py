"""The jitted training step: loss on the target tokens only, gradient accumulation with
`lax.scan`, clipping, non-finite guard, and data parallelism: `jit` with the batch sharded and
the state replicated, `pmap`, or `fsdp` (the batch, the frozen weights, the trainable leaves and
the optimizer state all sharded over the devices). `make_eval` is the same loss without a
gradient or dropout, for the validation loss (--eval-every), placed the same way.

Only the trainable tree ({"adapters", "params": extra trainable leaves}) is differentiated and
carried by the optimizer; frozen parameters are a read-only argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import sharding

PyTree = Any
PARALLEL = ("jit", "pmap", "fsdp")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static shape of a step: `accum` micro-batches of `micro_batch` rows, and how they are spread."""

    accum: int
    micro_batch: int
    parallel: str = "jit"


# Logits padded to a multiple of this for the training loss (`CausalLM.logits`): aligned rows let
# the LM head's matmuls run at full rate on a GPU; the -inf columns leave the loss unchanged.
VOCAB_MULTIPLE = 128
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers' lr_scheduler_type names


def make_schedule(lr: float, *, steps: int, warmup: int, kind: str = "linear") -> optax.Schedule:
    """transformers' `get_scheduler(kind, ...)` as an optax schedule of the update count: linear
    warmup from 0 over `warmup` updates, then linear decay to 0 at `steps` ("linear"), a half cosine
    to 0 ("cosine"), or the peak held ("constant_with_warmup"); "constant" has no warmup."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {SCHEDULES}")
    if kind == "constant":
        return optax.constant_schedule(lr)
    warmup = min(warmup, steps)
    rest = max(steps - warmup, 1)
    after = {"linear": optax.linear_schedule(lr, 0.0, rest),
             "cosine": optax.cosine_decay_schedule(lr, rest),
             "constant_with_warmup": optax.constant_schedule(lr)}[kind]
    return optax.join_schedules([optax.linear_schedule(0.0 if warmup else lr, lr, max(warmup, 1)), after], [warmup])


def decayed(trainable: Any) -> Any:
    """Bool tree: the leaves AdamW's weight decay reaches, as the Trainer picks them
    (transformers' `get_decay_parameter_names`): all but biases (lora_B's too) and norm weights
    (Flax's LayerNorm `scale`)."""
    def decay(path: str, _) -> bool:
        leaf = lj.tree.leaf_name(path)
        return "bias" not in leaf and leaf != "scale"
    return lj.tree.map_with_path(decay, trainable)


def make_optimizer(lr: float, *, steps: int, warmup: int, weight_decay: float, clip: float,
                   schedule: str = "linear",
                   loraplus_ratio: float | None = None,
                   lorafa: lj.LoraConfig | None = None,
                   mica: lj.LoraConfig | None = None,
                   adalora: lj.LoraConfig | None = None) -> optax.GradientTransformation:
    """AdamW on `make_schedule(..., kind=schedule)` (warmup, then linear decay by default; weight
    decay on the leaves `decayed` picks), global-norm clipping (none at `clip` 0), non-finite updates skipped;
    with `loraplus_ratio`, LoRA+ (lora_B at that multiple of the schedule); with `lorafa` (the
    LoRA config), LoRA-FA (lora_A frozen, lora_B's gradient projected, then clipped with the rest);
    with `mica` (an init="mica" config), MiCA's lora_B frozen outside the clipping too; with
    `adalora` (a config with an AdaLoRA schedule), its rank allocation on the raw gradients.

    `apply_if_finite` leaves params and state untouched on a non-finite gradient and counts it
    (`total_notfinite`), so the last good state survives; the caller decides to stop or go on.
    """
    sched = make_schedule(lr, steps=steps, warmup=warmup, kind=schedule)
    adamw = lambda rate: optax.adamw(rate, weight_decay=weight_decay, mask=decayed)  # noqa: E731
    opt = adamw(sched) if loraplus_ratio is None else lj.loraplus(adamw, sched, loraplus_ratio)
    tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt  # 0: none, as transformers
    if lorafa is not None:  # lora_A's gradient never reaches the clipping, as with a frozen torch tensor
        tx = lj.lorafa(lorafa, tx)
    if mica is not None:
        tx = lj.mica(mica, tx)
    if adalora is not None:  # outermost: it scores |w * g| on the raw gradients, as PEFT's does
        tx = lj.adalora.rank_allocator(adalora, tx)
    return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)


def row_layout(batch: dict[str, Any]) -> dict[str, Any]:
    """How `CausalLM.apply` reads a training batch's rows: its segment_ids when packed
    (`data.pack`), else its attention_mask."""
    return {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else \
        {"attention_mask": batch["attention_mask"]}


@jax.custom_vjp
def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[label], in fp32: logits [..., V] in any float dtype (-inf columns
    allowed), labels [...] int -> [...].

    The log-sum-exp runs in fp32 without an fp32 [..., V] tensor, and the backward is one
    elementwise pass, (softmax - one_hot(label)) * g in the logits' dtype: autodiff would
    scatter the label term into a zero [..., V] tensor and add it to the softmax term, two more
    passes over the largest tensor of the step."""
    return _nll_fwd(logits, labels)[0]


def _nll_fwd(logits: jax.Array, labels: jax.Array):
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [...]
    gold = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return lse - gold, (logits, labels, lse)


def _nll_bwd(res, g: jax.Array):
    logits, labels, lse = res
    hit = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)  # [..., V]
    p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])  # [..., V], fused into the one pass
    return ((p - hit) * g[..., None]).astype(logits.dtype), None


token_nll.defvjp(_nll_fwd, _nll_bwd)


def target_loss(logits_fn: Callable[..., jax.Array], targets: int) -> Callable[..., tuple]:
    """`loss(params, adapters, batch, rng) -> (sum of token losses, number of target tokens)`.

    `logits_fn(params, adapters, input_ids, attention_mask, rng, positions)` returns logits
    [B, K, V] at `positions` [B, K] (all T when None; V may be padded with -inf columns, as
    `vocab_multiple=VOCAB_MULTIPLE` pads it), e.g. `CausalLM.apply(..., positions=)`
    under the LoRA transform, so an adapted tied embedding acts in the head as well; a packed
    batch's (`data.pack`) mask is None and its `segment_ids=` come as a keyword. Logits
    exist only at `targets` positions per row (those with loss_mask = 1 first), in the compute
    dtype; only the log-sum-exp runs in fp32 (`token_nll`). No [B, T, V] fp32 tensor exists.
    """
    def loss(params, adapters, batch, rng):
        mask, labels, pos = batch["loss_mask"], batch["labels"], None
        if targets < mask.shape[1]:
            pos = jnp.argsort(-mask, axis=1, stable=True)[:, :targets]  # [B, K]: targets first
            labels = jnp.take_along_axis(labels, pos, axis=1)  # [B, K]
            mask = jnp.take_along_axis(mask, pos, axis=1)  # [B, K]
        rows = row_layout(batch)
        logits = logits_fn(params, adapters, batch["input_ids"], rows.pop("attention_mask", None), rng, pos,
                           **rows)  # [B, K, V]
        return jnp.sum(token_nll(logits, labels) * mask), jnp.sum(mask)  # token_nll: [B, K]
    return loss


def make_step(loss_fn, tx: optax.GradientTransformation, cfg: StepConfig, axis_name: str | None = None,
              regularizer: Callable[[Any], jax.Array] | None = None):
    """step(trainable, frozen, opt_state, batch [accum, micro, T], rng) -> (trainable, opt_state, metrics).

    `regularizer(adapters) -> scalar` (e.g. KaSA's) is added to the mean token loss, once per step;
    metrics["loss"] stays the token loss and metrics["regularizer"] is the added term."""
    def objective(trainable, frozen, micro, rng):
        params, adapters = lj.join(trainable, frozen)
        return loss_fn(params, adapters, micro, rng)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(trainable, frozen, opt_state, batch, rng_data):
        rng = jax.random.wrap_key_data(rng_data)
        if axis_name is not None:  # pmap: each device its own dropout draws (the key comes replicated)
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        def body(carry, xs):
            g_acc, l_acc, n_acc = carry
            micro, i = xs
            (l, n), g = grad_fn(trainable, frozen, micro, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (g, l, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                    (batch, jnp.arange(cfg.accum)))
        if axis_name is not None:  # pmap: sum over devices before normalising
            g, l, n = jax.lax.psum((g, l, n), axis_name)
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)  # mean over all target tokens of the global batch
        metrics = {"loss": l / n, "tokens": n}
        if regularizer is not None:  # on the (replicated) adapters: the same on every device
            metrics["regularizer"], g_reg = jax.value_and_grad(lambda t: regularizer(t["adapters"]))(trainable)
            grads = jax.tree.map(jnp.add, grads, g_reg)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, metrics

    return step


def make_eval(loss_fn, axis_name: str | None = None):
    """evaluate(trainable, frozen, batch [accum, micro, T]) -> (sum of token losses, target tokens),
    summed over the micro-batches (and the devices under pmap); `loss_fn` gets no rng, so no dropout."""
    def evaluate(trainable, frozen, batch):
        params, adapters = lj.join(trainable, frozen)

        def body(carry, micro):
            l, n = loss_fn(params, adapters, micro, None)
            return (carry[0] + l, carry[1] + n), None
        (l, n), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), batch)
        if axis_name is not None:
            l, n = jax.lax.psum((l, n), axis_name)
        return l, n
    return evaluate


def _global(x, where: NamedSharding):
    """A global array from a host value every process holds whole (each takes its shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, where, lambda idx: x[idx])


def data_mesh() -> Mesh:
    """Every device of every process on one `data` axis (Auto: XLA propagates the shardings)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def put_fsdp(tree: PyTree, mesh: Mesh | None = None) -> PyTree:
    """`tree` (host values every process holds whole) as global arrays sharded by `sharding.fsdp`."""
    mesh = mesh or data_mesh()
    return jax.tree.map(_global, tree, sharding.fsdp(tree, mesh))


def _host(x: jax.Array) -> np.ndarray:
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))  # every process gets it whole


class Runner:
    """Places state and batches on the devices and runs the compiled step (jit, pmap or fsdp).

    Multi-process (after `jax.distributed.initialize`): every process builds the same global
    host batch and feeds only the rows of its own devices; the state is replicated everywhere
    (jit, pmap) or split over all devices (fsdp).
    """

    def __init__(self, loss_fn, tx, cfg: StepConfig, regularizer: Callable[[Any], jax.Array] | None = None,
                 eval_loss_fn=None):
        if cfg.parallel not in PARALLEL:
            raise ValueError(f"--parallel must be one of {PARALLEL}, got {cfg.parallel!r}")
        self.cfg, self.tx = cfg, tx
        n = jax.device_count()
        if cfg.micro_batch % n:
            raise ValueError(f"--batch-size {cfg.micro_batch} is not divisible by the {n} devices")
        self._eval = None
        if cfg.parallel == "pmap":
            step = make_step(loss_fn, tx, cfg, axis_name="data", regularizer=regularizer)
            self._step = jax.pmap(step, axis_name="data", in_axes=(0, None, 0, 0, None), donate_argnums=(0, 2))
            if eval_loss_fn is not None:
                self._eval = jax.pmap(make_eval(eval_loss_fn, "data"), axis_name="data", in_axes=(0, None, 0))
        else:
            if eval_loss_fn is not None:
                self._eval = jax.jit(make_eval(eval_loss_fn))
            self._mesh = data_mesh()
            self._replicated = NamedSharding(self._mesh, P())
            self._batch_sharding = NamedSharding(self._mesh, P(None, "data"))  # [accum, micro, T]
            self._make = make_step(loss_fn, tx, cfg, regularizer=regularizer)
            self._step = jax.jit(self._make, donate_argnums=(0, 2)) if cfg.parallel == "jit" else None

    def _place(self, tree):
        if self.cfg.parallel == "pmap":
            n = jax.local_device_count()  # pmap shards a leading [local devices] axis: one replica each
            return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
        if self.cfg.parallel == "fsdp":
            return put_fsdp(tree, self._mesh)
        return jax.tree.map(lambda x: _global(x, self._replicated), tree)

    def put_state(self, trainable, opt_state):
        """Device copies of (trainable, opt_state): replicated over the data axis, or split (fsdp)."""
        if self.cfg.parallel == "fsdp":  # the step returns its state sharded as it came in
            out = (sharding.fsdp(trainable, self._mesh), sharding.fsdp(opt_state, self._mesh), self._replicated)
            self._step = jax.jit(self._make, donate_argnums=(0, 2), out_shardings=out)
        return self._place((trainable, opt_state))

    def put_frozen(self, frozen):
        return frozen if self.cfg.parallel == "pmap" else self._place(frozen)

    def get_state(self, trainable, opt_state):
        """Host-side (trainable, opt_state), whole on every process, from the device state."""
        if self.cfg.parallel == "pmap":
            return jax.tree.map(lambda x: np.asarray(x[0]), (trainable, opt_state))
        return jax.tree.map(_host, (trainable, opt_state))

    def _put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """The global host batch {k: [accum * micro, T]} as the step takes it: [accum, micro, T]
        sharded over the data axis, or (pmap) this process's devices' rows [n, accum, micro / devices, T]."""
        a, m = self.cfg.accum, self.cfg.micro_batch
        batch = {k: v.reshape(a, m, *v.shape[1:]) for k, v in batch.items()}  # [accum, micro, T]
        if self.cfg.parallel == "pmap":
            n, per = jax.local_device_count(), m // jax.device_count()
            lo = jax.process_index() * n * per  # this process's devices hold rows [lo, lo + n * per)
            # [n, accum, micro / devices, T]: each device a contiguous slice of every micro-batch
            return {k: np.moveaxis(v[:, lo:lo + n * per].reshape(a, n, per, *v.shape[2:]), 1, 0)
                    for k, v in batch.items()}
        return {k: _global(v, self._batch_sharding) for k, v in batch.items()}

    def step(self, trainable, frozen, opt_state, batch: dict[str, np.ndarray], rng: np.ndarray):
        """One optimizer step on the global host batch {k: [accum * micro, T]}; rng: uint32 key data."""
        if self.cfg.parallel == "pmap":
            trainable, opt_state, metrics = self._step(trainable, frozen, opt_state, self._put_batch(batch), rng)
            return trainable, opt_state, jax.tree.map(lambda x: x[0], metrics)
        if self._step is None:
            raise RuntimeError("Runner.put_state must place the state before the first fsdp step")
        return self._step(trainable, frozen, opt_state, self._put_batch(batch), _global(rng, self._replicated))

    def put_batches(self, batches) -> list:
        """Global host batches placed as `evaluate` takes them, so fixed ones move to the devices once."""
        return [self._put_batch(b) for b in batches]

    def evaluate(self, trainable, frozen, placed) -> tuple[float, int]:
        """(mean token loss, target tokens) of the state over batches from `put_batches`, without
        dropout or any update (the `eval_loss_fn` given at construction)."""
        if self._eval is None:
            raise RuntimeError("Runner.evaluate needs eval_loss_fn at construction")
        total, count = 0.0, 0.0
        for batch in placed:
            l, n = self._eval(trainable, frozen, batch)
            if self.cfg.parallel == "pmap":
                l, n = l[0], n[0]
            total, count = total + float(l), count + float(n)
        return total / max(count, 1.0), int(count)
