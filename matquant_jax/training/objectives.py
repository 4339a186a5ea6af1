"""Training objectives: MatQuant (Eq. 7), co-distillation, Single/Extra Precision, baselines.

    L(θ) = Σ_{r∈R} λ_r · [ CE(F(S(Q(θ, 8), r)), y)  if r has a ground-truth term
                         + D(F_t, F(S(Q(θ, 8), r)))  if r is distilled from teacher t ]

Methods (spec §3-§5) and their defaults:
  matquant          R = (8, 4, 2), λ = (0.1, 0.1, 1.0) (Gemma; Mistral QAT uses (0.2, 0.2, 1.0))
  single_precision  R = (2,), λ = (1.0,): the int2 slice of an int8 parameterization (§5.1)
  extra_precision   R = (8, 4, 2), λ = (1, 1, 1), unclamped slices (§5.2)
  baseline          QAT directly at one width r with MinMax(r) (parent = r); the "sliced int8"
                    baseline is this at r = 8, sliced at evaluation time
  bf16              no quantization (the reference, or plain fine-tuning)

Co-distillation (spec §4) uses the paper's notation, `x→y` (or `x->y`) meaning "the y-bit
model is distilled from the x-bit model", e.g. "[8,4,2,8->4;2]". A bit-width listed alone has
a ground-truth term; one that appears only as a student is trained on the teacher alone
(standalone, "[8,4,8->2]"). Choices the paper leaves open, as options:
  distill_loss      "kl" (default): KL(teacher ‖ student) over the vocabulary per token;
                    "soft_ce": −Σ p_t log p_s (same gradient, differs by the teacher entropy);
                    "l2": squared error of logits.
  stop_teacher_grad True (default): the teacher's logits are a constant target. False lets the
                    distillation term train the teacher slice too.
  Weighting: ground-truth and distillation terms of one bit-width are "weighted equally"
  (spec §4), both scaled by that width's λ_r.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from matquant_jax.quant import validation
from matquant_jax.quant.plan import PrecisionPlan, Scope

METHODS = ("matquant", "single_precision", "extra_precision", "baseline", "bf16")
DISTILL_LOSSES = ("kl", "soft_ce", "l2")

DEFAULT_LAMBDAS = {
    ("matquant", "gemma"): (0.1, 0.1, 1.0),
    ("matquant", "mistral"): (0.2, 0.2, 1.0),
}


@dataclasses.dataclass(frozen=True)
class Objective:
  """A resolved, validated objective. Build it with `make_objective`."""
  method: str
  bits: tuple[int, ...]                  # R, in forward order (teachers first)
  weights: tuple[float, ...]             # λ_r, aligned with `bits`
  ground_truth: tuple[int, ...]          # widths with a cross-entropy term
  distill: tuple[tuple[int, int], ...]   # (teacher, student) pairs
  scope: Scope = Scope.FFN
  extra_precision: bool = False
  parent_bits: int = 8
  distill_loss: str = "kl"
  stop_teacher_grad: bool = True

  def weight(self, bits: int) -> float:
    return self.weights[self.bits.index(bits)]

  def plan_for(self, bits: int | None) -> PrecisionPlan:
    """The precision plan of the forward pass at `bits` (None: the unquantized model)."""
    if bits is None or self.method == "bf16":
      return PrecisionPlan.bf16()
    return PrecisionPlan.uniform(bits, self.scope, extra_precision=self.extra_precision,
                                 parent_bits=self.parent_bits)

  @property
  def teachers(self) -> tuple[int, ...]:
    return tuple(sorted({t for t, _ in self.distill}, reverse=True))

  def describe(self) -> str:
    if self.method == "bf16":
      return "bf16"
    terms = [str(r) for r in self.ground_truth]
    for t in self.teachers:
      students = ";".join(str(s) for tt, s in self.distill if tt == t)
      terms.append(f"{t}->{students}")
    lam = ",".join(f"{w:g}" for w in self.weights)
    ep = " ep" if self.extra_precision else ""
    return f"{self.method} [{','.join(terms)}] λ=({lam}) {self.scope.value}{ep}"


_TERM = re.compile(r"^(\d+)\s*(?:->|→)\s*([\d;\s]+)$")


def parse_codistill(text: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
  """'[8,4,2,8->4;2]' -> ((8, 4, 2), ((8, 4), (8, 2))): ground-truth widths and distill pairs."""
  s = text.strip()
  if not (s.startswith("[") and s.endswith("]")):
    raise ValueError(f"co-distillation spec {text!r} must look like '[8,4,2,8->2]'.")
  gt, pairs = [], []
  for term in (t.strip() for t in s[1:-1].split(",")):
    if not term:
      raise ValueError(f"co-distillation spec {text!r} has an empty term.")
    m = _TERM.match(term)
    if m:
      teacher = validation.check_bits(int(m.group(1)), "teacher bits")
      for st in m.group(2).split(";"):
        student = validation.check_bits(int(st), "student bits")
        if student >= teacher:
          raise ValueError(
              f"in {text!r}, {teacher}->{student}: a teacher must have more bits than its student.")
        pairs.append((teacher, student))
    elif term.isdigit():
      gt.append(validation.check_bits(int(term), "bits"))
    else:
      raise ValueError(
          f"co-distillation term {term!r} in {text!r} is neither a bit-width nor 'x->y' "
          f"(e.g. '8->2' or '8->4;2').")
  if len(set(gt)) != len(gt) or len(set(pairs)) != len(pairs):
    raise ValueError(f"co-distillation spec {text!r} repeats a term.")
  for t, _ in pairs:
    if t not in gt:
      raise ValueError(
          f"in {text!r} the teacher int{t} has no ground-truth term of its own; list {t} too.")
  return tuple(gt), tuple(pairs)


def make_objective(
    method: str = "matquant",
    *,
    bits: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    codistill: str = "",
    scope: str | Scope = "ffn",
    extra_precision: bool | None = None,
    distill_loss: str = "kl",
    stop_teacher_grad: bool = True,
    family: str = "gemma",
) -> Objective:
  """Resolves a method name and options into an `Objective`, or raises ValueError.

  Args:
    method: one of METHODS.
    bits: R for matquant/extra_precision (default (8, 4, 2)); the single width r for baseline.
    weights: λ aligned with `bits` (defaults per method and model family, see module doc).
    codistill: paper notation, e.g. "[8,4,2,8->2]"; overrides `bits` with its widths.
    scope: "ffn" (paper default) or "ffn+attn".
    extra_precision: unclamped slices (default True only for method extra_precision).
    family: "gemma" or "mistral", for the default λ.

  Long: each method's defaults and each argument's check with its own message, in one table-like
  body.
  """
  if method not in METHODS:
    raise ValueError(f"unknown objective method {method!r}; choose one of {', '.join(METHODS)}.")
  if distill_loss not in DISTILL_LOSSES:
    raise ValueError(f"unknown distill_loss {distill_loss!r}; choose one of {DISTILL_LOSSES}.")
  scope = Scope(scope) if not isinstance(scope, Scope) else scope
  if scope not in (Scope.FFN, Scope.ATTN, Scope.FFN_ATTN):
    raise ValueError(f"objective scope must be ffn, attn or ffn+attn, got {scope.value!r}.")
  if method == "bf16":
    if bits or weights or codistill:
      raise ValueError("method 'bf16' trains without quantization: drop bits/weights/codistill.")
    return Objective(method="bf16", bits=(), weights=(), ground_truth=(), distill=(),
                     scope=Scope.NONE)

  if method == "baseline":
    if codistill:
      raise ValueError("a baseline trains one bit-width; co-distillation needs method 'matquant'.")
    bits = tuple(bits or (8,))
    if len(bits) != 1:
      raise ValueError(f"a baseline trains exactly one bit-width r with MinMax(r); got bits={bits}.")
    r = validation.check_bits(bits[0])
    return Objective(method="baseline", bits=(r,), weights=(1.0,), ground_truth=(r,), distill=(),
                     scope=scope, extra_precision=False, parent_bits=r)

  if extra_precision is None:
    extra_precision = method == "extra_precision"
  if codistill:
    gt, pairs = parse_codistill(codistill)
    all_bits = sorted(set(gt) | {s for _, s in pairs}, reverse=True)
    if bits is not None and tuple(sorted(bits, reverse=True)) != tuple(all_bits):
      raise ValueError(f"bits={tuple(bits)} disagree with codistill {codistill!r} ({all_bits}).")
    bits = tuple(all_bits)
  else:
    default_bits = (2,) if method == "single_precision" else (8, 4, 2)
    bits = tuple(bits) if bits is not None else default_bits
    gt, pairs = bits, ()
  for r in bits:
    validation.check_bits(r)
  if len(set(bits)) != len(bits):
    raise ValueError(f"bits={bits} repeats a width.")
  bits = tuple(sorted(bits, reverse=True))  # teachers (wider) run first

  if weights is None:
    if method == "extra_precision" or method == "single_precision":
      weights = (1.0,) * len(bits)
    elif bits == (8, 4, 2):
      weights = DEFAULT_LAMBDAS.get((method, family))
      if weights is None:
        raise ValueError(f"no default λ for family {family!r}; pass weights explicitly.")
    else:
      raise ValueError(f"bits={bits} have no default λ; pass weights (one per width).")
  weights = tuple(float(w) for w in weights)
  if len(weights) != len(bits):
    raise ValueError(f"weights={weights} must give one λ per bit-width in {bits}.")
  if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
    raise ValueError(f"weights={weights} must be >= 0 with at least one > 0.")
  return Objective(method=method, bits=bits, weights=weights, ground_truth=tuple(gt),
                   distill=tuple(pairs), scope=scope, extra_precision=bool(extra_precision),
                   parent_bits=8, distill_loss=distill_loss,
                   stop_teacher_grad=bool(stop_teacher_grad))


# ---------------------------------------------------------------------------------------------
# Losses. All take float32 logits [B, T, V] and a float mask [B, T]; they return (sum, count)
# so per-device partial sums add up exactly before the division.


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats) over the masked tokens."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def distillation(student: jax.Array, teacher: jax.Array, mask: jax.Array, kind: str) -> jax.Array:
  """Mean per-token distillation loss of student logits toward teacher logits."""
  per_tok = _distill_per_token(student, teacher, kind)
  return jnp.sum(per_tok * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _distill_per_token(student: jax.Array, teacher: jax.Array, kind: str) -> jax.Array:
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  if kind == "l2":
    per_tok = jnp.mean((s - t) ** 2, axis=-1)
  else:
    log_ps = jax.nn.log_softmax(s, axis=-1)
    log_pt = jax.nn.log_softmax(t, axis=-1)
    pt = jnp.exp(log_pt)
    per_tok = -jnp.sum(pt * log_ps, axis=-1)
    if kind == "kl":
      per_tok = per_tok + jnp.sum(pt * log_pt, axis=-1)
  return per_tok


def chunk_length(seq_len: int, chunk: int) -> int:
  """The largest divisor of seq_len that is <= chunk (at least 1)."""
  c = max(1, min(chunk, seq_len))
  while seq_len % c:
    c -= 1
  return c


def chunked_losses(head, params, hidden: jax.Array, targets: jax.Array, mask: jax.Array, *,
                   chunk: int, teacher_hidden: jax.Array | None = None, kind: str = "kl",
                   stop_teacher_grad: bool = True, dist_flag: jax.Array | None = None,
                   unroll: bool = False):
  """Cross-entropy (and distillation) from hidden states, `chunk` tokens of the sequence at a
  time, so the [B, T, V] logits are never materialized (only [B, chunk, V] per step, also in
  the backward pass, which recomputes each chunk's logits: jax.checkpoint).

  Args:
    head: (params, hidden [B, c, D]) -> logits [B, c, V] (models.transformer.head_logits).
    params: what `head` reads (gradients flow into them).
    hidden: [B, T, D] student hidden states; teacher_hidden: the teacher's, or None.
    targets, mask: [B, T].
    chunk: tokens per chunk (the largest divisor of T not above it is used).
    kind: the distillation loss (DISTILL_LOSSES).
    stop_teacher_grad: the teacher's logits are a constant (also w.r.t. the head's params).
    dist_flag: optional traced scalar; the distillation term is computed only when > 0.

  Returns:
    (mean cross-entropy, mean distillation loss (0 without a teacher)) over masked tokens.
  """
  b, t = targets.shape
  c = chunk_length(t, chunk)
  n = t // c

  def split(x):
    return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

  xs = {"h": split(hidden), "y": split(targets), "m": split(mask.astype(jnp.float32))}
  if teacher_hidden is not None:
    xs["t"] = split(teacher_hidden)
  zero = jnp.zeros((), jnp.float32)

  @jax.checkpoint
  def body(carry, x):
    logits = head(params, x["h"]).astype(jnp.float32)
    ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, x["y"]) * x["m"])
    d = zero
    if teacher_hidden is not None:
      def dist():
        p_t = jax.lax.stop_gradient(params) if stop_teacher_grad else params
        t_h = jax.lax.stop_gradient(x["t"]) if stop_teacher_grad else x["t"]
        tl = head(p_t, t_h).astype(jnp.float32)
        return jnp.sum(_distill_per_token(logits, tl, kind) * x["m"])
      d = dist() if dist_flag is None else jax.lax.cond(dist_flag > 0, dist, lambda: zero)
    return (carry[0] + ce, carry[1] + d), None

  (ce, d), _ = jax.lax.scan(body, (zero, zero), xs, unroll=bool(unroll))
  count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
  return ce / count, d / count


@dataclasses.dataclass(frozen=True)
class _Losses:
  """The losses on the model output: logits (head None), or hidden states with a chunked head."""
  head: Callable | None = None
  chunk: int = 0
  kind: str = "kl"
  stop_teacher_grad: bool = True
  unroll: bool = False

  def __call__(self, p, out, targets, mask, t_out=None, dist_flag=None):
    """(cross-entropy, distillation toward t_out or 0); t_out is already stop_gradient'ed by
    the caller when the teacher's gradient is stopped."""
    if self.head is not None:
      return chunked_losses(self.head, p, out, targets, mask, chunk=self.chunk,
                            teacher_hidden=t_out, kind=self.kind,
                            stop_teacher_grad=self.stop_teacher_grad, dist_flag=dist_flag)
    ce = cross_entropy(out, targets, mask)
    if t_out is None:
      return ce, jnp.zeros((), jnp.float32)
    compute = lambda: distillation(out, t_out, mask, self.kind)
    if dist_flag is None:
      return ce, compute()
    return ce, jax.lax.cond(dist_flag > 0, compute, lambda: jnp.zeros((), jnp.float32))


ApplyFn = Callable[[object, Mapping[str, jax.Array], "int | jax.Array | None"], jax.Array]


# How loss_and_grads runs several widths (config.width_loop): "scan" over a traced width, or
# "unrolled" in Python (one traced forward/backward per width).
WIDTH_LOOPS = ("scan", "unrolled")


def loss_and_grads(objective: Objective, apply_fn: ApplyFn, params, batch: Mapping[str, jax.Array],
                   *, scan: bool = True, head: Callable | None = None, chunk: int = 1024,
                   grad_shardings=None, unroll: bool = False, in_place: bool = False):
  """Total loss, its gradient and per-bit-width metrics for one batch.

  `apply_fn(params, batch, bits)` returns logits [B, T, V] of the model with the objective's
  kernels fake-quantized at `bits` (a Python int, a traced int32 scalar, or None for the
  unquantized model), sliced from `objective.parent_bits` codes, extra precision as configured.

  With `scan` (the default for more than one width) the widths run as a `lax.scan` over a
  traced bit-width: one compiled forward/backward serves them all and XLA reuses one width's
  activation buffers for the next, so a MatQuant step's peak memory stays near that of a
  single-precision QAT step. (An optimization barrier between unrolled widths does not achieve
  this: XLA keeps every width's activations alive.) Teachers run first and hand their logits
  to later widths through the scan carry; with `stop_teacher_grad=False` the teacher's share
  of the distillation gradient is applied by one extra teacher VJP after the scan, instead of
  keeping its activations alive. `scan=False` unrolls the widths in Python (the reference).

  Args:
    objective: from make_objective.
    apply_fn: see above.
    params: the trainable pytree.
    batch: 'inputs', 'targets' [B, T] int32, 'loss_mask' [B, T] (plus whatever apply_fn reads).
    head: optional (params, hidden [B, c, D]) -> logits [B, c, V]. When given, `apply_fn`
      returns hidden states [B, T, D] instead of logits and every loss is computed `chunk`
      tokens at a time (chunked_losses): the [B, T, V] logits never exist, and a teacher hands
      its hidden states, not its logits, to the students.
    chunk: sequence tokens per loss chunk (with `head`).
    grad_shardings: optional shardings (a tree like params) for the gradients and the f32
      accumulator of the scan over widths, so they stay sharded like the params.
    unroll: unroll the scan over widths in HLO; same numbers, for cost analysis (the loss
      chunk loop stays a loop: unrolled, every chunk's logits would be live at once).
    in_place: with the scan over widths, add each width's gradient into the running sum as the
      backward pass produces it, instead of computing a whole gradient and adding it: one f32
      gradient-sized buffer instead of two. Needs params in the scanned layout and an
      `apply_fn(params, batch, bits, grad_acc=...)` that runs the stack as
      transformer.accumulating_scan (trainer.make_apply_fn). Same numbers up to the order of
      float additions.

  Returns:
    (loss, grads, metrics): metrics has 'loss', 'ce_int{r}' for every width (the plain
    cross-entropy of that slice, also for widths trained only by distillation) and
    'distill_int{t}_int{s}' per distillation pair.
  """
  mask = batch["loss_mask"].astype(jnp.float32)
  targets = batch["targets"]
  losses = _Losses(head=head, chunk=chunk, kind=objective.distill_loss,
                   stop_teacher_grad=objective.stop_teacher_grad, unroll=unroll)
  constrain = _constrainer(grad_shardings)

  if objective.method == "bf16":
    def bf16_loss(p):
      return losses(p, apply_fn(p, batch, None), targets, mask)[0]
    loss, grads = jax.value_and_grad(bf16_loss)(params)
    return loss, constrain(grads), {"loss": loss, "ce_bf16": loss}
  scanned = scans_widths(objective, scan)
  if in_place and not scanned:
    raise ValueError("in-place gradient accumulation runs inside the scan over widths: it "
                     "needs scan=True, several widths and at most one teacher.")
  if scanned:
    loss, grads, metrics = _scanned(objective, apply_fn, params, batch, mask, targets, losses,
                                    constrain, unroll, in_place)
  else:
    loss, grads, metrics = _unrolled(objective, apply_fn, params, batch, mask, targets, losses,
                                     constrain)
  return loss, constrain(grads), metrics


def scans_widths(objective: Objective, scan: bool = True) -> bool:
  """Whether loss_and_grads runs the widths as a lax.scan (else unrolled in Python): asked to
  (`scan`), several widths, and at most one teacher."""
  return scan and len(objective.bits) > 1 and len(objective.teachers) <= 1


def teacher_needs_grad(objective: Objective) -> bool:
  """Whether the distillation gradient also flows into the teacher's pass."""
  return bool(objective.teachers) and not objective.stop_teacher_grad


def _constrainer(shardings):
  if shardings is None:
    return lambda tree: tree
  return lambda tree: jax.lax.with_sharding_constraint(tree, shardings)


def _unrolled(objective, apply_fn, params, batch, mask, targets, losses=_Losses(),
              constrain=lambda t: t):
  metrics = {}
  grads = constrain(jax.tree_util.tree_map(jnp.zeros_like, params))
  total = jnp.zeros((), jnp.float32)
  teacher_logits: dict[int, jax.Array] = {}
  teacher_cotangent: dict[int, jax.Array] = {}
  for r in objective.bits:
    lam = objective.weight(r)
    teachers_of_r = [t for t, s in objective.distill if s == r]
    has_gt = r in objective.ground_truth

    def loss_r(p, t_logits, r=r, lam=lam, has_gt=has_gt, teachers_of_r=teachers_of_r):
      logits = apply_fn(p, batch, r)
      parts = {f"ce_int{r}": losses(p, logits, targets, mask)[0]}
      loss = parts[f"ce_int{r}"] if has_gt else jnp.zeros((), jnp.float32)
      for t in teachers_of_r:
        tl = t_logits[t]
        if objective.stop_teacher_grad:
          tl = jax.lax.stop_gradient(tl)
        parts[f"distill_int{t}_int{r}"] = losses(p, logits, targets, mask, tl)[1]
        loss = loss + parts[f"distill_int{t}_int{r}"]
      return lam * loss, (parts, logits)

    t_in = {t: teacher_logits[t] for t in teachers_of_r}
    (loss, (parts, logits)), (g_p, g_t) = jax.value_and_grad(
        loss_r, argnums=(0, 1), has_aux=True)(params, t_in)
    grads = constrain(jax.tree_util.tree_map(jnp.add, grads, g_p))
    total = total + loss
    metrics.update(parts)
    if not objective.stop_teacher_grad:
      for t, g in g_t.items():
        teacher_cotangent[t] = teacher_cotangent.get(t, 0.0) + g
    if r in objective.teachers:
      teacher_logits[r] = jax.lax.stop_gradient(logits)
  grads = _add_teacher_grads(objective, apply_fn, params, batch, grads, teacher_cotangent,
                             teacher_logits)
  metrics["loss"] = total
  return total, grads, metrics


def _add_teacher_grads(objective, apply_fn, params, batch, grads, cotangents, teacher_logits):
  """The teachers' share of the distillation gradient (only when it is not stopped)."""
  for t, cot in cotangents.items():
    _, vjp = jax.vjp(lambda p, t=t: apply_fn(p, batch, t), params)
    (g_p,) = vjp(cot.astype(teacher_logits[t].dtype))
    grads = jax.tree_util.tree_map(jnp.add, grads, g_p)
  return grads


@jax.custom_vjp
def _sink(p, acc):
  """(p, acc) unchanged; the backward pass adds p's cotangent into acc's (and none to p)."""
  return p, acc


def _sink_fwd(p, acc):
  return (p, acc), None


def _sink_bwd(_, cotangents):
  ct_p, ct_acc = cotangents
  return None, jax.tree_util.tree_map(lambda a, c: a + c.astype(a.dtype), ct_acc, ct_p)


_sink.defvjp(_sink_fwd, _sink_bwd)


def _accumulate_grad(loss_fn, apply_fn, params, batch, bits, acc):
  """(loss, aux), acc + d loss / d params, adding into acc while the backward pass runs.

  loss_fn(p, out) -> (loss, aux) on the model output `out = apply_fn(p, batch, bits)`. The
  layer stack adds its gradient into acc["layers"] group by group (accumulating_scan); the
  other params (embedder, norms, head) pass through `_sink`, which adds theirs. Nothing is
  differentiated w.r.t. params themselves: acc is, with the running sum as its cotangent.
  """
  if "layers" not in params:
    raise ValueError("in-place gradient accumulation needs params in the scanned layout "
                     "(scan_layers=True).")

  def forward(acc):
    top, acc_top = _sink({k: v for k, v in params.items() if k != "layers"},
                         {k: v for k, v in acc.items() if k != "layers"})
    p = dict(top, layers=params["layers"])
    out, acc_layers = apply_fn(p, batch, bits, grad_acc=acc["layers"])
    loss, aux = loss_fn(p, out)
    return (loss, dict(acc_top, layers=acc_layers)), aux

  (loss, _), vjp, aux = jax.vjp(forward, acc, has_aux=True)
  (acc,) = vjp((jnp.ones_like(loss), acc))
  return (loss, aux), acc


def _add_width_grad(loss_on, apply_fn, params, batch, bits, t_logits, grads, in_place,
                    constrain):
  """One width's ((loss, aux), running gradient sum with its gradient added, gradient w.r.t.
  the teacher's output (None in place)); loss_on(p, out, t_logits) -> (loss, aux)."""
  if in_place:
    out, grads = _accumulate_grad(lambda p, o: loss_on(p, o, t_logits), apply_fn, params,
                                  batch, bits, grads)
    return out, constrain(grads), None
  out, (g_p, g_t) = jax.value_and_grad(
      lambda p, tl: loss_on(p, apply_fn(p, batch, bits), tl), argnums=(0, 1),
      has_aux=True)(params, t_logits)
  return out, constrain(jax.tree_util.tree_map(jnp.add, grads, g_p)), g_t


def _scanned(objective, apply_fn, params, batch, mask, targets, losses=_Losses(),
             constrain=lambda t: t, unroll=False, in_place=False):
  bits = objective.bits
  if in_place and teacher_needs_grad(objective):
    raise ValueError("in-place gradient accumulation needs stop_teacher_grad=True (the "
                     "teacher's share of the distillation gradient is a second VJP).")
  teacher = objective.teachers[0] if objective.teachers else None
  students = {s for _, s in objective.distill}
  xs = {
      "bits": jnp.asarray(bits, jnp.int32),
      "lam": jnp.asarray(objective.weights, jnp.float32),
      "gt": jnp.asarray([float(r in objective.ground_truth) for r in bits], jnp.float32),
      "dist": jnp.asarray([float(r in students) for r in bits], jnp.float32),
      "is_teacher": jnp.asarray([r == teacher for r in bits]),
  }
  if teacher is not None:
    # The teacher's output (logits, or hidden states with a head) as the students will see it.
    t_shape = jax.eval_shape(lambda p: apply_fn(p, batch, bits[0]), params)
    t_init = jnp.zeros(t_shape.shape, t_shape.dtype)
  else:
    t_init = None

  def body(carry, x):
    grads, total, t_logits, t_cot = carry

    def loss_on(p, logits, tl):
      if tl is None:
        ce, d = losses(p, logits, targets, mask)
      else:
        t_used = jax.lax.stop_gradient(tl) if objective.stop_teacher_grad else tl
        ce, d = losses(p, logits, targets, mask, t_used, dist_flag=x["dist"])
      loss = x["gt"] * ce
      if tl is not None:
        loss = loss + x["dist"] * d
      return x["lam"] * loss, (ce, d, logits)

    (loss, (ce, d, logits)), grads, g_t = _add_width_grad(
        loss_on, apply_fn, params, batch, x["bits"], t_logits, grads, in_place, constrain)
    if t_logits is not None:
      if not objective.stop_teacher_grad:
        t_cot = t_cot + g_t
      t_logits = jnp.where(x["is_teacher"], jax.lax.stop_gradient(logits), t_logits)
    return (grads, total + loss, t_logits, t_cot), (ce, d)

  zeros = constrain(jax.tree_util.tree_map(jnp.zeros_like, params))
  t_cot0 = None if t_init is None or objective.stop_teacher_grad else jnp.zeros_like(t_init)
  (grads, total, t_logits, t_cot), (ces, ds) = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32), t_init, t_cot0), xs, unroll=bool(unroll))
  if t_cot is not None:
    grads = _add_teacher_grads(objective, apply_fn, params, batch, grads, {teacher: t_cot},
                               {teacher: t_logits})
  metrics = {"loss": total}
  for i, r in enumerate(bits):
    metrics[f"ce_int{r}"] = ces[i]
    if r in students:
      metrics[f"distill_int{teacher}_int{r}"] = ds[i]
  return total, grads, metrics
