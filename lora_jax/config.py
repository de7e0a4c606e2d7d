"""LoraConfig: what PEFT's LoraConfig says, as a frozen dataclass with a JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import tree

PLAIN_INITS = ("kaiming_uniform", "gaussian", "orthogonal")  # A B = 0 from random factors: W0 stays as it is
# Computed on data (layer inputs; LoRA-GA: gradients): EVA keeps W0 (A B = 0), CorDA and LoRA-GA
# move part of it into A B.
DATA_INITS = ("eva", "corda", "lora_ga")
KASA_INITS = ("kaiming_uniform", "gaussian")  # B = 0: KaSA's random diagonal then changes nothing at init
MICA = "mica"  # B = W0's minor singular directions, fixed; A = 0 trains (W0 stays as it is)
INITS = (*PLAIN_INITS, *DATA_INITS, "pissa", "olora", MICA)  # and "pissa_niter_<n>"
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # PiSSA through a randomized SVD with n power iterations
VELORA_INIT_TYPES = ("batch_average", "random", "batch_average_once")  # PEFT's VeloraConfig.init_type
ALL_LINEAR = "all-linear"  # PEFT's shorthand target: every linear layer except the output head
BIASES = ("none", "all", "lora_only")
Pattern = str | tuple[str, ...]
# axes_pattern for Flax's attention (linen MultiHeadDotProductAttention, nnx.MultiHeadAttention):
# query/key/value kernels [D, H, Dh] map D -> (H, Dh), out [H, Dh, D] maps (H, Dh) -> D.
FLAX_ATTENTION_AXES = {"(.*/)?(query|key|value)": (1, 2), "(.*/)?out": (2, 1)}


def pattern_matches(key: str, path: str) -> bool:
    """Whether a rank_pattern / alpha_pattern `key` selects the leaf at `path`: PEFT's rule
    (`get_pattern_key`: the key fullmatches the end of the module's name, `(.*/)?key`, here of the
    module path or the whole path), or `tree.matches` (a prefix of the path from its root)."""
    rx = re.compile(rf"(?:.*/)?(?:{key})")
    return bool(rx.fullmatch(path.rsplit("/", 1)[0]) or rx.fullmatch(path)) or tree.matches(key, path)


def _regex(value: str, where: str) -> str:
    """`value`, once it compiles: a bad pattern is named here, not deep inside the first match."""
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"LoraConfig.{where}: {value!r} is not a valid regular expression ({e})") from None
    return value


def _as_pattern(value: Any, name: str, *, optional: bool) -> Pattern | None:
    if value is None and optional:
        return None
    if isinstance(value, str):
        return _regex(value, name)
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"LoraConfig.{name} must be a regex string or a non-empty list of names, got {value!r}")


def _token_ids(v: Any, where: str, *, unique: bool = True) -> tuple[int, ...]:
    ok = (isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))
    if not ok:
        raise ValueError(f"LoraConfig.{where} must be a non-empty list of token ids (ints >= 0), got {v!r}")
    dup = sorted({i for i in v if list(v).count(i) > 1})
    if unique and dup:
        raise ValueError(f"LoraConfig.{where} lists token id(s) {dup} more than once")
    return tuple(v)


def _as_tokens(value: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """trainable_tokens normalised: a tuple of ids, or {module name: tuple of ids}."""
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ValueError(f"LoraConfig.trainable_tokens must map module names to token ids, got {value!r}")
        return {k: _token_ids(v, f"trainable_tokens[{k!r}]") for k, v in value.items()}
    return _token_ids(value, "trainable_tokens")


@dataclasses.dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's rank budget (PEFT's `AdaLoraConfig` fields beyond LoRA's; `LoraConfig.rank` is
    its `init_r`): `adalora.rank_allocator` prunes singular triplets from the total of rank x
    (adapted matrices) down to target_r x (adapted matrices).

    Attributes:
      total_step: the number of training steps (steps count from 0, like `update_and_allocate(i)`).
      target_r: the mean rank left per adapted matrix at the end.
      tinit: steps before any pruning (the budget stays at its start while step <= tinit).
      tfinal: the last steps, on the final budget (from step total_step - tfinal on).
      deltaT: prune every deltaT steps in between (a cubic schedule from the full budget to the target).
      beta1 / beta2: EMA rates of the sensitivity |w * g| and of its uncertainty.
      orth_reg_weight: weight of `adalora.orth_loss`, which keeps A and B near orthogonal.
    """

    total_step: int  # required, as in PEFT
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        for name in ("target_r", "total_step", "deltaT"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"AdaLoraSchedule.{name} must be a positive integer, got {v!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"AdaLoraSchedule.{name} must be an integer >= 0, got {v!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoraSchedule: tinit={self.tinit} leaves no pruning phase before step "
                             f"total_step - tfinal = {self.total_step - self.tfinal} (PEFT refuses this too)")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
                raise ValueError(f"AdaLoraSchedule.{name} must be in (0, 1), got {v!r}")
        w = self.orth_reg_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"AdaLoraSchedule.orth_reg_weight must be a number >= 0, got {w!r}")


@dataclasses.dataclass(frozen=True)
class BdLoraConfig:
    """BD-LoRA's layout (PEFT's `BdLoraConfig`): which adapted modules get a block-diagonal lora_A
    or lora_B, so that a tensor-parallel server sharded `nblocks` ways computes them without extra
    communication (row-sharded layers, such as attention out and MLP down projections: A;
    column-sharded ones, such as QKV and MLP up: B).

    Attributes:
      target_modules_bd_a / target_modules_bd_b: names matched as PEFT does, as substrings of
        the module's dotted name (`transformer.h.0.mlp.dense_4h_to_h`); a module may match one side only.
      nblocks: the number of diagonal blocks (the serving shard count); it divides that side's
        dimensions (A: in and r; B: r and out).
      match_strict: every adapted module must match a side (else plain LoRA and BD-LoRA mix).
    """

    target_modules_bd_a: tuple[str, ...] = ()
    target_modules_bd_b: tuple[str, ...] = ()
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self):
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            v = getattr(self, name)
            v = () if v is None else (v,) if isinstance(v, str) else v
            if not (isinstance(v, Sequence) and all(isinstance(n, str) and n for n in v)):
                raise ValueError(f"BdLoraConfig.{name} must be a list of module names, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(v))
        n = self.nblocks
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"BdLoraConfig.nblocks must be a positive integer, got {n!r}")
        if not isinstance(self.match_strict, bool):
            raise ValueError(f"BdLoraConfig.match_strict must be true or false, got {self.match_strict!r}")

    def side(self, module: str) -> str | None:
        """"a" or "b": which factor of the adapter on `module` (a dotted name) is block-diagonal;
        None for a plain one. A module both sides name, or (match_strict) neither, is refused."""
        a = any(n in module for n in self.target_modules_bd_a)
        b = any(n in module for n in self.target_modules_bd_b)
        if a and b:
            raise ValueError(f"BD-LoRA: module {module!r} matches both target_modules_bd_a "
                             f"{list(self.target_modules_bd_a)} and target_modules_bd_b "
                             f"{list(self.target_modules_bd_b)}")
        if self.match_strict and not (a or b):
            raise ValueError(f"BD-LoRA: adapted module {module!r} matches neither target_modules_bd_a "
                             f"{list(self.target_modules_bd_a)} nor target_modules_bd_b "
                             f"{list(self.target_modules_bd_b)}; name it, or set match_strict=False")
        return "a" if a else "b" if b else None


def _nested(value: Any, cls: type, name: str, required: tuple[str, str] | None = None) -> Any:
    """LoraConfig's field `name`: a `cls` as given, or built from its dict (as JSON gives it, unknown
    keys and a missing `required[0]` refused by name); None stays None."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"LoraConfig.{name}: unknown field(s) {unknown} of {cls.__name__}")
        if required is not None and required[0] not in value:
            raise ValueError(f"LoraConfig.{name} needs {required[0]}, {required[1]}")
        value = cls(**value)
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"LoraConfig.{name} must be an instance of {cls.__name__} (or its dict), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which leaves get low-rank adapters, and how they are initialised and scaled.

    Attributes:
      rank: r, the adapter rank (PEFT `r`).
      alpha: scale numerator: scale = alpha / rank (alpha / sqrt(rank) with `use_rslora`).
      targets: regex `re.fullmatch`-ed against '/'-joined paths (or their module prefix), a
        list of module names matched as path components (`c_attn`, `query_key_value`), or
        "all-linear" (PEFT's: every `kernel`/`weight` matrix, stacks included, except an
        `lm_head` or a task head, `score` / `classifier` / `qa_outputs`; embedding tables are not
        linear layers).
      exclude: same form; never targeted even if `targets` selects it.
      dropout: dropout rate on the LoRA input (training only, with an explicit rng).
      init: `kaiming_uniform` (PEFT default: A ~ U(+-1/sqrt(in))) or `gaussian` (A ~ N(0, 1/r^2)),
        B = 0; `orthogonal` (PEFT's: A and B random, nonzero, on orthogonal halves of an r x r
        rotation, so A B = 0; even ranks only); `eva` (A = the principal directions of each
        layer's inputs, ranks redistributed by explained variance: `eva.init_eva`, which needs
        data); `corda` (W0's components along its inputs' covariance: `corda.init_corda`, data
        too, and the base keeps the residual); `lora_ga` (the directions of the first gradients:
        `lora_ga.init_lora_ga`, residual base too); or one that moves part of W0 into the adapter
        (`lora.init_residual`): `pissa` (the r principal singular directions), `pissa_niter_<n>`
        (the same by a randomized SVD with n power iterations), `olora` (the first r columns of
        W0's QR decomposition). `mica` (PEFT's MiCA): B = the r singular directions of W0 with the
        smallest singular values, A = 0, and B stays fixed: train with `optim.mica(config, tx)`,
        which leaves lora_B out of the update (linear layers and embeddings; not with DoRA,
        lora_bias, VeLoRA or aLoRA).
      use_rslora: rank-stabilised scale alpha / sqrt(rank).
      use_dora: DoRA (PEFT `use_dora`): a trained magnitude m per output feature rescales the
        adapted weight, W = m * (W0 + s*A*B) / ||W0 + s*A*B|| (column norms, not differentiated);
        on linear layers and embedding tables [V, D] (m per feature, norms over the vocabulary).
      lora_bias: lora_B gets a bias too (PEFT `lora_bias`), s * b added to the targeted module's
        own bias, which it must have; merging folds it into that bias. Not with DoRA.
      rank_pattern / alpha_pattern: {pattern: value} overrides per path (first match wins): a
        regex naming a module as PEFT's keys do (`c_fc`, `h/1/attn/c_attn`: the end of its path),
        or fullmatching a path or one of its module prefixes (`.*h/1/.*`).
      axes_pattern: {pattern: (n_in, n_out)} for kernels with several input or output axes, such
        as Flax `DenseGeneral` / `nnx.LinearGeneral` ones: a kernel [*S, *in, *out] is adapted as
        the matrix [*S, prod(in), prod(out)] (`FLAX_ATTENTION_AXES` covers Flax's attention);
        unmatched kernels are (1, 1): [*S, in, out], any leading dims a layer stack. A
        convolution kernel [kh, kw, in, out] is (3, 1): PEFT's Conv LoRA, A a convolution into r
        channels and B a 1x1 one.
      bias: `none`, `all` (every bias trains) or `lora_only` (biases of targeted modules train).
      trainable: pattern of extra leaves trained in full (PEFT `modules_to_save`).
      layers_to_transform / layers_pattern: adapt only the targets in these layers (PEFT's): a
        target's layer is the number in its path, `<layers_pattern>/<i>` (or Flax linen's
        `<layers_pattern>_<i>`), without a pattern the first `<name>/<i>` (`transformer/h/3/...`);
        in a layer stack [L, in, out] (scanned layers, no number in the path) the layer is the
        index along L, and the other layers keep zero factors. Targets with no layer are left out.
      target_parameters: parameters adapted whatever their leaf name (PEFT's `target_parameters`,
        e.g. a mixture of experts' weights [E, in, out] used in an einsum): names matched as the
        path's last components, leaf included (`experts/w_in`, or just `w_in`), or a regex that
        fullmatches the whole path; a [*S, in, out] parameter gets one LoRA per matrix (per
        expert). Adds to what `targets` selects, which may then be empty.
      alora_invocation_tokens: Activated LoRA (PEFT's aLoRA): the adapter acts only from the last
        occurrence of these token ids in each row onwards, so everything before it computes (and
        caches) exactly what the base model does; `apply` then takes `lora_mask=`
        (`lora.alora_mask`). Linear layers only, without DoRA or lora_bias; cannot be merged.
      velora_num_groups / velora_scale: VeLoRA (PEFT's `velora_config`, `init_type="batch_average"`):
        the backward pass keeps, of each adapted matrix's input, one number per group of
        in/num_groups features (their projection on the batch's mean direction) and rebuilds
        the input from it (times `velora_scale`) for lora_A's gradient, which becomes an
        approximation; outputs and the other gradients are exact. Linear layers only, through
        `apply`; `multi`'s mixed batches run such adapters as the plain LoRA they are at inference.
      velora_init_type: PEFT's VeloraConfig.init_type: "batch_average" (the mean direction of each
        batch, recomputed every step), or a fixed direction per matrix held in the adapter leaf
        `lora_velora_embed` [ceil(in/G)]: "random" (drawn by `init`) or "batch_average_once"
        (the first training batch's, `velora.init_once`; until then each batch's).
      use_kasa / kasa_beta / kasa_gamma: KaSA (PEFT's `kasa_config`, Knowledge-aware Singular-value
        Adaptation): each adapted W0 loses its r smallest singular components (`kasa.init_kasa`,
        which returns the truncated base) and the update is s * A diag(d) B with a trained
        r-vector d (`lora_diag`, random at init; B = 0, so the model starts as the truncated
        base). `kasa.kasa_loss` is the paper's regulariser, kasa_beta * sum(d^2) + kasa_gamma *
        (||B B^T - I|| + ||A^T A - I||), to add to the task loss. Linear layers only, with
        `kaiming_uniform` or `gaussian` A; not with DoRA, VeLoRA or aLoRA (nor in PEFT).
      adalora: AdaLoRA (PEFT's `AdaLoraConfig`, an `AdaLoraSchedule` or its dict): the update is
        A diag(E) B * alpha / (rank + 1e-5) (alpha 0: rank / (rank + 1e-5)), an SVD-like triplet per
        rank with the singular values E (`lora_E` [*S, r], 0 at init; A and B ~ N(0, 0.02^2)); train
        with `adalora.rank_allocator(config, tx)`, which zeroes the E entries of the least important
        triplets down to the schedule's budget, and add `adalora.orth_loss` to the loss. `rank` is
        PEFT's init_r. Linear layers only, `kaiming_uniform` init (standing for AdaLoRA's own);
        not with rank_pattern / alpha_pattern (AdaLoRA sets the ranks), rsLoRA, DoRA, lora_bias,
        VeLoRA, aLoRA, KaSA or trainable_tokens.
      use_bdlora: BD-LoRA (PEFT's `use_bdlora`, a `BdLoraConfig` or its dict): the modules it names
        get a block-diagonal lora_A or lora_B of `nblocks` blocks. The factor keeps its full
        [*S, in, r] / [*S, r, out] shape with zeros off the blocks, which `apply` and `merge` mask
        out, so those entries get no gradient and never train; PEFT files hold the blocks alone.
        A block-diagonal A starts as PEFT's, U(+-sqrt(6 / (in/nblocks))). Linear
        layers only, `kaiming_uniform` or `gaussian` init; not with DoRA, lora_bias, VeLoRA, aLoRA,
        KaSA or AdaLoRA (PEFT has no such combinations either).
      trainable_tokens: token ids whose embedding rows train in full, the rest of the table
        frozen (PEFT `trainable_token_indices`, e.g. new special tokens): a list for the params'
        one embedding table (a leaf named `embedding`), or {module name: ids}, such as
        {"wte": [...]} for GPT-2 (which also has `wpe`). The rows are replaced by trained values
        (`trainable_tokens_delta`, starting as the originals) wherever the table is used, a
        tied LM head included.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Pattern = ("c_attn", "query_key_value")
    exclude: Pattern | None = None
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    axes_pattern: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    bias: str = "none"
    trainable: Pattern | None = None
    trainable_tokens: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    target_parameters: Pattern | None = None
    alora_invocation_tokens: Sequence[int] | None = None
    velora_num_groups: int | None = None
    velora_scale: float = 1.0
    velora_init_type: str = "batch_average"
    use_kasa: bool = False
    kasa_beta: float = 1e-4
    kasa_gamma: float = 1e-3
    adalora: AdaLoraSchedule | None = None
    use_bdlora: BdLoraConfig | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen: normalise once, here
        set_("use_bdlora", _nested(self.use_bdlora, BdLoraConfig, "use_bdlora"))
        set_("adalora", _nested(self.adalora, AdaLoraSchedule, "adalora", required=(
            "total_step", "the number of training steps (PEFT's AdaLoraConfig requires it too)")))
        set_("target_parameters", _as_pattern(self.target_parameters, "target_parameters", optional=True))
        if self.target_parameters is not None and (self.targets is None or (
                isinstance(self.targets, Sequence) and not isinstance(self.targets, str) and not self.targets)):
            set_("targets", ())  # parameters alone
        else:
            set_("targets", _as_pattern(self.targets, "targets", optional=False))
        if self.targets == (ALL_LINEAR,):  # a one-name list, as a comma-split flag gives it
            set_("targets", ALL_LINEAR)
        set_("exclude", _as_pattern(self.exclude, "exclude", optional=True))
        set_("trainable", _as_pattern(self.trainable, "trainable", optional=True))
        for name in ("rank_pattern", "alpha_pattern", "axes_pattern"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"LoraConfig.{name} must map patterns (strings) to values, got {value!r}")
            for k in value:
                _regex(k, f"{name} key")
            set_(name, dict(value))
        for name, r in [("rank", self.rank), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ValueError(f"LoraConfig.{name} must be a positive integer, got {r!r}")
        for name, a in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a):
                raise ValueError(f"LoraConfig.{name} must be a finite number, got {a!r}")
        for k, v in self.axes_pattern.items():
            ok = (isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2
                  and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v))
            if not ok:
                raise ValueError(f"LoraConfig.axes_pattern[{k!r}] must be (n_in, n_out), two positive integers, "
                                 f"got {v!r}")
            self.axes_pattern[k] = tuple(v)  # a JSON list reads back as the same tuple
        if self.trainable_tokens is not None:
            set_("trainable_tokens", _as_tokens(self.trainable_tokens))
        self._normalise_layers()
        if self.alora_invocation_tokens is not None:
            set_("alora_invocation_tokens", _token_ids(self.alora_invocation_tokens, "alora_invocation_tokens",
                                                       unique=False))
            clash = [k for k in ("use_dora", "lora_bias", "trainable_tokens") if getattr(self, k)]
            if clash:
                raise ValueError(f"LoraConfig.alora_invocation_tokens (aLoRA) acts on some tokens only, which "
                                 f"{' and '.join(clash)} cannot (they change every token)")
        if self.velora_num_groups is not None:
            g = self.velora_num_groups
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
                raise ValueError(f"LoraConfig.velora_num_groups must be a positive integer, got {g!r}")
            clash = [k for k in ("use_dora", "alora_invocation_tokens", "trainable_tokens") if getattr(self, k)]
            if clash:
                raise ValueError(f"LoraConfig.velora_num_groups (VeLoRA) changes plain LoRA's backward pass; not "
                                 f"with {' and '.join(clash)}")
        if self.velora_init_type not in VELORA_INIT_TYPES:
            raise ValueError(f"LoraConfig.velora_init_type: unknown {self.velora_init_type!r}; expected one of "
                             f"{VELORA_INIT_TYPES}")
        if self.velora_init_type != "batch_average" and self.velora_num_groups is None:
            raise ValueError(f"LoraConfig.velora_init_type={self.velora_init_type!r} is VeLoRA's: set "
                             "velora_num_groups too")
        sc = self.velora_scale
        if not isinstance(sc, (int, float)) or isinstance(sc, bool) or not (math.isfinite(sc) and sc > 0):
            raise ValueError(f"LoraConfig.velora_scale must be a positive number, got {sc!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("kasa_beta", "kasa_gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"LoraConfig.{name} must be a number >= 0, got {v!r}")
        for name in ("use_rslora", "use_dora", "lora_bias", "use_kasa"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("LoraConfig: lora_bias with use_dora is not supported (PEFT's DoRA rescales the "
                             "LoRA output before its bias)")
        if not isinstance(self.init, str) or not (self.init in INITS or PISSA_NITER.fullmatch(self.init)):
            raise ValueError(f"LoraConfig.init: unknown init {self.init!r}; expected one of {INITS} "
                             "or 'pissa_niter_<n>'")
        if self.use_kasa:
            clash = [k for k in ("use_dora", "velora_num_groups", "alora_invocation_tokens") if getattr(self, k)]
            if clash:
                raise ValueError(f"LoraConfig.use_kasa (KaSA) is its own LoRA variant; not with {' and '.join(clash)} "
                                 "(PEFT refuses the combination too)")
            if self.init not in KASA_INITS:  # (MiCA included: PEFT has no KaSA + MiCA variant)
                raise ValueError(f"LoraConfig.use_kasa (KaSA) starts from B = 0 on its truncated base: init must be "
                                 f"one of {KASA_INITS}, got {self.init!r}")
        if self.init == MICA:
            clash = [k for k in ("use_dora", "lora_bias", "velora_num_groups", "alora_invocation_tokens")
                     if getattr(self, k)]
            if clash:
                raise ValueError(f"LoraConfig.init='mica' (MiCA) trains lora_A alone on a fixed B; not with "
                                 f"{' and '.join(clash)} (PEFT refuses the combination or freezes it at zero)")
        if self.adalora is not None:
            self._check_adalora()
        if self.use_bdlora is not None:
            clash = [k for k in ("use_dora", "lora_bias", "velora_num_groups", "alora_invocation_tokens", "use_kasa",
                                 "adalora") if getattr(self, k)]
            if clash:
                raise ValueError(f"LoraConfig.use_bdlora (BD-LoRA) is its own LoRA variant; not with "
                                 f"{' and '.join(clash)} (PEFT refuses the combination or drops it)")
            if self.init not in ("kaiming_uniform", "gaussian"):
                raise ValueError(f"LoraConfig.use_bdlora (BD-LoRA) starts from B = 0 with its blocks masked: init must "
                                 f"be 'kaiming_uniform' or 'gaussian', got {self.init!r}")
        if not isinstance(self.bias, str) or self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias: unknown bias {self.bias!r}; expected one of {BIASES}")

    def _check_adalora(self) -> None:
        clash = [k for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
                             "velora_num_groups", "alora_invocation_tokens", "use_kasa", "trainable_tokens")
                 if getattr(self, k)]
        if clash:
            raise ValueError(f"LoraConfig.adalora (AdaLoRA) sets its own ranks and scale; not with "
                             f"{' and '.join(clash)}")
        if self.init != "kaiming_uniform":
            raise ValueError(f"LoraConfig.adalora (AdaLoRA) has its own init (A, B ~ N(0, 0.02^2), E = 0); leave init "
                             f"at its default, got {self.init!r}")
        if self.adalora.target_r > self.rank:
            raise ValueError(f"LoraConfig.adalora.target_r={self.adalora.target_r} exceeds the initial rank "
                             f"rank={self.rank} (PEFT's init_r) it prunes from")

    def _normalise_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if pattern is not None:
            if isinstance(pattern, str):
                pattern = (pattern,)
            if not (isinstance(pattern, Sequence) and pattern and all(isinstance(p, str) and p for p in pattern)):
                raise ValueError(f"LoraConfig.layers_pattern must be a name (regex) or a list of them, got "
                                 f"{self.layers_pattern!r}")
            for p in pattern:
                _regex(p, "layers_pattern")
            if layers is None:  # PEFT refuses this too: a pattern alone selects nothing
                raise ValueError("LoraConfig.layers_pattern needs layers_to_transform (the layer indices to adapt)")
            object.__setattr__(self, "layers_pattern", tuple(pattern))
        if layers is None:
            return
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        ok = (isinstance(layers, Sequence) and not isinstance(layers, str) and len(layers) > 0
              and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers))
        if not ok:
            raise ValueError(f"LoraConfig.layers_to_transform must be a layer index or a non-empty list of them "
                             f"(ints >= 0), got {self.layers_to_transform!r}")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            raise ValueError(f"LoraConfig.layers_to_transform with a regex target {self.targets!r}: put the layers "
                             "in the regex, or give module names (PEFT refuses this combination too)")
        object.__setattr__(self, "layers_to_transform", tuple(sorted(set(layers))))

    def layer_index(self, path: str) -> int | None:
        """The layer number in `path` that layers_to_transform reads (None: the path has none)."""
        module = path.rsplit("/", 1)[0] + "/"
        # PEFT 0.21: the first number that follows a name, so that a nested one (an expert's) is not taken
        if self.layers_pattern is None:
            m = re.match(r"(?:[^/]*/)*?[^/]*/(\d+)/", module)
            return None if m is None else int(m.group(1))
        for pattern in self.layers_pattern:
            m = re.match(rf"(?:[^/]*/)*?(?:{pattern})[/_](\d+)/", module)
            if m is not None:
                return int(m.group(1))
        return None

    def names_layers(self, path: str) -> bool:
        """Whether a stacked kernel at `path` (no layer number) is a stack of the layers that
        layers_pattern names (always, without a pattern)."""
        if self.layers_pattern is None:
            return True
        return any(re.fullmatch(p, c) for p in self.layers_pattern for c in path.split("/")[:-1])

    @property
    def changes_base(self) -> bool:
        """Whether `init` takes part of W0 into the adapter (PiSSA, OLoRA, CorDA, LoRA-GA): the adapters
        then act on the residual weights `init_residual` (`init_corda`, `init_lora_ga`) returns, not on
        the original ones."""
        return self.init not in (*PLAIN_INITS, "eva", MICA)

    def rank_for(self, path: str) -> int:
        """The rank used at `path` (rank_pattern overrides `rank`; keys as `pattern_matches` reads them)."""
        return next((v for k, v in self.rank_pattern.items() if pattern_matches(k, path)), self.rank)

    def axes_for(self, path: str) -> tuple[int, int]:
        """(n_in, n_out): how many trailing axes of the kernel at `path` are its input and output."""
        return next((tuple(v) for k, v in self.axes_pattern.items() if tree.matches(k, path)), (1, 1))

    def matrix_shape(self, path: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The [*S, in, out] matrix stack that the kernel of `shape` at `path` is adapted as."""
        n_in, n_out = self.axes_for(path)
        shape = tuple(shape)
        s = len(shape) - n_in - n_out
        if s < 0:
            raise ValueError(f"LoraConfig.axes_pattern gives {path!r} {n_in} input and {n_out} output axes, "
                             f"but its shape {shape} has {len(shape)}")
        return (*shape[:s], math.prod(shape[s : s + n_in]), math.prod(shape[s + n_in :]))

    def scale_for(self, path: str) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA; AdaLoRA's alpha / (r + 1e-5)) at `path`, after
        per-path overrides."""
        alpha = next((v for k, v in self.alpha_pattern.items() if pattern_matches(k, path)), self.alpha)
        r = self.rank_for(path)
        if self.adalora is not None:  # PEFT: scaling / (ranknum + 1e-5), ranknum = init_r for good
            return float(alpha if alpha > 0 else r) / (r + 1e-5)
        return float(alpha) / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        tokens = d["trainable_tokens"]
        if tokens is not None:
            d["trainable_tokens"] = (list(tokens) if isinstance(tokens, tuple)
                                     else {k: list(v) for k, v in tokens.items()})
        for k in ("targets", "exclude", "trainable", "layers_to_transform", "layers_pattern", "target_parameters",
                  "alora_invocation_tokens"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        if d["use_bdlora"] is not None:
            d["use_bdlora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["use_bdlora"].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Build from a dict; unknown keys are an error naming them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"LoraConfig JSON must be an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LoraConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"LoraConfig JSON is not valid JSON: {e}") from None
        return cls.from_dict(d)
