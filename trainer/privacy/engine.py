"""DP-SGD gradients for any ``nn.Module`` whose loss is given per example.

One logical step (one Poisson batch) is::

    for micro_batch in logical_batch:          # physical micro-batches, possibly empty
        losses = per_example_loss(module, micro_batch)   # [b]
        engine.accumulate(losses)
    stats = engine.finalize()                  # writes .grad of every trainable param
    optimizer.step()

``accumulate`` computes each example's gradient over ALL trainable parameters together
(flat clipping), its norm n_i, the factor ``c_i = min(1, C / (n_i + 1e-6))``, and adds
``sum_i c_i g_i`` to a float32 buffer. ``finalize`` adds ``N(0, sigma^2 C^2)`` once per
coordinate, divides by the expected batch size ``q N`` and writes ``.grad``. Nothing
else ever writes ``.grad``.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from trainer.privacy.layer_rules import LayerRule, build_rules
from trainer.privacy.noise import entropy_generator, secure_standard_normal

MODES = ("auto", "fast", "reference")
KERNEL_BACKENDS = ("auto", "torch", "triton")
SELF_CHECK_RTOL = 1e-3  # float32 sums in another order differ by ~1e-6; the holes it guards against by >1e-2
# bf16 autocast: the batch gradient is rounded to bf16 in autograd, the per-example ones are not
# (measured: sums off by 0.2-0.4%, norms by up to 1.4% on tests/test_engine.py's TinyNet)
SELF_CHECK_RTOL_BF16 = 2e-2

# every module under an engine -> that engine: a second engine on the same modules is refused
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, DPGradientEngine]" = weakref.WeakKeyDictionary()


def _full_precision(method):
    """Run an engine method with autocast off: norms, clip factors, clipped sums and noise are
    float32 even when the caller is inside a bf16 autocast region (autocast would redo the
    engine's float32 GEMMs in bf16, and an example's clipped gradient could exceed C)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.autocast(self.params[0][1].device.type, enabled=False):
            return method(self, *args, **kwargs)
    return wrapper


class EngineSelfCheckError(ValueError):
    """The fast engine's per-example gradients disagree with autograd: the model breaks its contract."""


def _differs(a: Tensor, ref: Tensor, atol: float, rtol: float = SELF_CHECK_RTOL, scale: float = 0.0) -> bool:
    """``||a - ref|| > rtol * max(||a||, ||ref||, scale) + atol`` (in float64)."""
    a, ref = a.double(), ref.double().to(a.device)
    return float((a - ref).norm()) > rtol * max(float(a.norm()), float(ref.norm()), scale) + atol


class DPGradientEngine:
    """Per-example clipping, summation and Gaussian noise for the trainable params of ``module``.

    Args:
        module: the model; every parameter with ``requires_grad=True`` is trained under DP
            and all of them together form the clipped vector.
        max_grad_norm: the clipping norm C.
        noise_multiplier: sigma; the noise std per coordinate is sigma * C (0 disables
            noise: not private, for tests and diagnostics only).
        expected_batch_size: q * N, the divisor of the noisy sum (not the realised batch size).
        mode: "fast" (book-keeping: layer hooks, one backward, one GEMM per layer),
            "reference" (per-example gradients by batched autograd: the oracle), "auto" = fast.
        generator: the noise generator; by default a fresh one seeded from OS entropy.
        kernel_backend: "auto" | "torch" | "triton", passed to the ``kernels`` functions.
        secure_noise: draw the noise from the OS CSPRNG with the floating-point-attack-resistant
            Gaussian of :mod:`trainer.privacy.noise` (``generator`` is then unused).
        self_check: "fast" mode verifies on its first micro-batch that the per-example gradients
            sum to the batch gradient (same backward); :meth:`check` adds the per-example test.
        self_check_rtol: the relative tolerance of those checks (``SELF_CHECK_RTOL``; under bf16
            autocast ``SELF_CHECK_RTOL_BF16``). Norms, clip factors, sums and noise are float32
            whatever the forward's precision: each example's contribution is clipped exactly as
            computed from the tensors the backward produced.

    Contract for "fast": trainable modules are called on batch-first inputs, examples do
    not interact (no BatchNorm), and a parameter affects the loss only through the output
    of the module that registers it. Modules called several times and parameters shared
    by several modules are handled exactly. Each forward with grad enabled must be
    followed by ``accumulate`` (the hooks record until then). A model that breaks the
    contract is refused by the self-check (:class:`EngineSelfCheckError` naming the module)
    before its first micro-batch adds anything; a module can carry one engine at a time.
    """

    def __init__(
        self,
        module: nn.Module,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        mode: str = "auto",
        generator: torch.Generator | None = None,
        kernel_backend: str = "auto",
        secure_noise: bool = False,
        self_check: bool = True,
        self_check_rtol: float = SELF_CHECK_RTOL,
    ):
        if not max_grad_norm > 0 or max_grad_norm == float("inf"):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
        if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
        if not expected_batch_size > 0 or not math.isfinite(expected_batch_size):
            raise ValueError(f"expected_batch_size must be > 0 (it is q * N), got {expected_batch_size}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.mode = "fast" if mode == "auto" else mode
        self.kernel_backend = kernel_backend
        self.params: list[tuple[str, nn.Parameter]] = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("module has no parameter with requires_grad=True: nothing to train under DP")
        for name, sub in module.named_modules():
            if sub in _ATTACHED:
                raise ValueError(f"module {name or '<root>'!r} ({type(sub).__name__}) already has a DPGradientEngine "
                                 "attached: call detach() on that engine first (one engine per module)")
        self.generator = generator if generator is not None else entropy_generator(self.params[0][1].device)
        self.secure_noise = bool(secure_noise)
        self._check_pending = self_check and self.mode == "fast"
        self.self_check_rtol = float(self_check_rtol)
        self.last_per_sample_norms: Tensor = torch.empty(0)
        self._sums: dict[int, Tensor] = {}
        self._reset_stats()
        self._rules: list[LayerRule] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._recording = True
        if self.mode == "fast":
            self._rules = build_rules(module, kernel_backend)
            self._check_coverage()
            for rule in self._rules:
                self._hooks.append(rule.module.register_forward_hook(self._hook_for(rule), with_kwargs=True))
            # parameters registered in several modules: per-rule norms do not add up for them
            owners: dict[int, list[tuple[LayerRule, str]]] = {}
            for rule in self._rules:
                for local, p in rule.params.items():
                    owners.setdefault(id(p), []).append((rule, local))
            self._shared = {pid: uses for pid, uses in owners.items() if len(uses) > 1}
            self._skip = {id(rule): {n for n, p in rule.params.items() if id(p) in self._shared} for rule in self._rules}
        for sub in module.modules():
            _ATTACHED[sub] = self

    # ------------------------------------------------------------------ setup
    def _check_coverage(self) -> None:
        covered = {id(p) for rule in self._rules for p in rule.params.values()}
        missing = [n for n, p in self.params if id(p) not in covered]
        if missing:
            raise ValueError(f"no per-example rule covers the trainable parameters {missing}")
        trainable = {id(p) for _, p in self.params}
        for rule in self._rules:
            for local, p in rule.params.items():
                if id(p) not in trainable:
                    raise ValueError(f"rule for {rule.name!r} covers {local!r}, which is not a trainable param")

    def _hook_for(self, rule: LayerRule):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if not self._recording or not torch.is_grad_enabled():
                return None
            return rule.capture(args, kwargs, output)

        return hook

    def detach(self) -> None:
        """Remove the hooks (the module is left as it was before the engine)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for rule in self._rules:
            rule.clear()
        for sub in self.module.modules():
            if _ATTACHED.get(sub) is self:
                del _ATTACHED[sub]

    # ------------------------------------------------------------------ per micro-batch
    @_full_precision
    def accumulate(self, per_example_losses: Tensor) -> None:
        """Backward of one micro-batch; adds the clipped per-example gradients to the buffer.

        ``per_example_losses`` [b] (b may be 0) must come from a forward of ``module`` with
        grad enabled. Leaves ``.grad`` untouched.
        """
        losses = per_example_losses
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"per_example_losses must be a 1-D tensor [b], got {shape}")
        b = losses.shape[0]
        try:
            if b == 0:
                self.last_per_sample_norms = torch.zeros(0)
                self._step_norms.append(self.last_per_sample_norms)
                self._step_finite_losses.append(None)
                return
            if not losses.requires_grad:
                raise ValueError("per_example_losses does not require grad: run the forward with grad enabled")
            finite_losses = None  # the fast mode's norms are each example's own
            if self.mode == "reference":
                norms, clipped = self._reference(losses)
                finite_losses = torch.isfinite(losses.detach())
            elif self._check_pending:  # the same single backward also gives the batch gradient
                norms, clipped, summed, (batch, scales) = self._book_keeping(losses, check=True)
                # not on a batch with nothing to compare (one example: nothing to mix; all gradients 0: a rank's
                # padding example) or with a non-finite example (the step is redone): it waits for one that tests
                if b > 1 and bool(torch.isfinite(norms).all() & norms.gt(0).any()):
                    self._verify_sums(summed(torch.ones_like(norms)), batch, scales, self.self_check_rtol)
                    self._check_pending = False
            else:
                norms, clipped, _, _ = self._book_keeping(losses)
            self._add(norms, clipped, finite_losses)
        finally:
            for rule in self._rules:
                rule.clear()

    @_full_precision
    def accumulate_per_example_gradients(self, flat_grads: Tensor) -> None:
        """Clip and add examples whose gradients the caller computed: ``flat_grads`` [k, D].

        D is the number of trainable elements, in the order of ``self.params`` (flattened and
        concatenated). Each row is one example, clipped to ``max_grad_norm`` like any other.
        Used by the privacy audit for gradient-space canaries.
        """
        numel = sum(p.numel() for _, p in self.params)
        if flat_grads.dim() != 2 or flat_grads.shape[1] != numel:
            raise ValueError(f"flat_grads must be [k, {numel}], got {tuple(flat_grads.shape)}")
        flat = flat_grads.float()
        norms = flat.norm(dim=1)
        summed = torch.mv(flat.t(), self._clip_factors(norms)) if len(flat) else torch.zeros(numel)
        clipped, offset = {}, 0
        for _, p in self.params:
            clipped[id(p)] = summed[offset: offset + p.numel()].view(p.shape).to(p.device)
            offset += p.numel()
        self._add(norms, clipped)

    def nonfinite_examples(self) -> list[Tensor]:
        """For each micro-batch accumulated since the last ``finalize``, the positions of the examples
        whose gradient is not finite (NaN or inf: so is their norm); [] when there is none. One device sync.

        Such an example would make the whole step NaN: the caller :meth:`discard`s the step and
        accumulates it again with the example left out (``trainer.runtime.LeftOut``). The fast mode
        tells each example's own norm; the reference mode's batched backward spreads one example's
        NaN to every row (0 * NaN), so there the examples whose loss is not finite are named.
        Raises RuntimeError when no example can be named (no step may be released then).
        """
        device = self.params[0][1].device
        norms = [n.to(device) for n in self._step_norms]
        flat = torch.cat(norms) if norms else torch.zeros(0, device=device)
        blame = [torch.zeros(0, dtype=torch.bool, device=device) if f is None else ~f.to(device)
                 for f in self._step_finite_losses]
        sums_finite = [torch.isfinite(t).all().reshape(1).to(device) for t in self._sums.values()]
        flags = torch.cat([torch.isfinite(flat), *sums_finite, *blame]).cpu()
        if bool(flags[:len(flat) + len(sums_finite)].all()):
            return []
        sizes = [len(n) for n in norms]
        bad = (~flags[:len(flat)]).split(sizes)
        named = flags[len(flat) + len(sums_finite):].split([len(b) for b in blame])
        out = []
        for k, (rows, losses_bad) in enumerate(zip(bad, named)):
            culprits = rows if self._step_finite_losses[k] is None else losses_bad
            if bool(rows.any()) and not bool(culprits.any()):
                raise RuntimeError("DP engine: a per-example gradient is not finite, and no example's loss is (the "
                                   "reference mode cannot tell which example it is); refusing to release the step")
            out.append(torch.nonzero(culprits).flatten())
        if not any(len(o) for o in out):
            raise RuntimeError("DP engine: a clipped sum is not finite though every per-example norm is; "
                               "refusing to release the step")
        return out

    def discard(self) -> None:
        """Forget everything accumulated since the last ``finalize`` (to redo the step)."""
        self._sums = {}
        self._reset_stats()

    def _add(self, norms: Tensor, clipped: dict[int, Tensor], finite_losses: Tensor | None = None) -> None:
        for pid, g in clipped.items():
            self._sums[pid] = self._sums[pid] + g if pid in self._sums else g
        self.last_per_sample_norms = norms.detach()
        self._step_norms.append(self.last_per_sample_norms)
        self._step_finite_losses.append(finite_losses)
        # kept as tensors: no device sync per micro-batch
        self._count += norms.shape[0]
        self._clipped = self._clipped + (self._clip_factors(norms) < 1).sum()
        self._norm_sum = self._norm_sum + norms.detach().sum()

    # ------------------------------------------------------------------ self-check
    @_full_precision
    def check(self, loss_fn: Callable[[Tensor], Tensor], batch_size: int, rtol: float | None = None) -> None:
        """Verify the fast path on one batch and add nothing; raises :class:`EngineSelfCheckError`.

        ``loss_fn(rows)`` runs a forward of ``module`` with grad enabled on the examples ``rows``
        (int64 indices into one fixed batch of ``batch_size`` >= 2 examples) and returns their
        losses; it must be deterministic (the same example gives the same loss in any batch).
        Checks (1) that the per-example gradients sum to the batch gradient of every trainable
        parameter, (2) that weighted by distinct factors in (0, 1], as clipping weights them,
        they sum to autograd's gradient of the weighted losses (a clipped sum that applies the
        factors wrong cannot pass), and (3) that the first and last example's gradient norm in
        the batch equals the norm of its gradient computed alone (examples mixed by a
        sequence-first input or an input broadcast over the batch fail this). Each pass is one
        forward and one backward.
        Run it on public stand-in data before training, so that a model the engine cannot
        handle is refused before any step is charged. ``rtol``: this check's tolerance (default
        ``self_check_rtol``, the training's precision): a float32 ``loss_fn`` in a bf16 run is
        judged at float32's ``SELF_CHECK_RTOL``.
        """
        if self.mode != "fast":
            return
        rtol = self.self_check_rtol if rtol is None else float(rtol)
        weights = torch.linspace(1.0, 0.25, batch_size)  # public, distinct, in (0, 1] as clip factors are
        try:
            norms, _, summed, (batch, scales) = self._book_keeping(loss_fn(torch.arange(batch_size)), check=True)
            self._verify_sums(summed(torch.ones_like(norms)), batch, scales, rtol)
            weighted = summed(weights.to(norms.device))  # a GEMM over recorded tensors, or cached grads: no forward
        finally:
            for rule in self._rules:
                rule.clear()
        params = [p for _, p in self.params]
        self._recording = False  # autograd's weighted sum, in a forward of its own (nothing recorded)
        try:
            losses = loss_fn(torch.arange(batch_size))
            reference = torch.autograd.grad((losses * weights.to(losses.device, losses.dtype)).sum(), params,
                                            allow_unused=True)
        finally:
            self._recording = True
        self._verify_sums(weighted, [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                                     for g, p in zip(reference, params)], scales, rtol, "weighted by clip factors ")
        for i in sorted({0, batch_size - 1}):
            self._recording = False
            try:
                alone = torch.autograd.grad(loss_fn(torch.tensor([i])).sum(), params, allow_unused=True)
            finally:
                self._recording = True
            exact = torch.sqrt(sum(g.double().pow(2).sum() for g in alone if g is not None))
            if _differs(norms[i:i + 1], exact.reshape(1), 1e-6 * float(exact), rtol):
                # no values in the message: check() is meant for public probes, but its caller decides
                self._refuse(f"example {i} of {batch_size} has another gradient norm alone than in the batch "
                             f"(beyond a relative {rtol:g}): a trainable module mixes examples (e.g. a "
                             "sequence-first [T, B, D] input, or an input broadcast over the batch whose output "
                             "is per-example). Make its inputs batch-first, or use finetune.engine_mode=reference")

    def _verify_sums(self, plain: dict[int, Tensor], batch: list[Tensor], scales: list[float], rtol: float,
                     how: str = "") -> None:
        """Refuse unless the engine's sums of per-example gradients ``plain`` equal autograd's ``batch``,
        parameter by parameter, to ``rtol`` of the larger of the two and of the parameter's
        ``scales`` entry (the norm of its sum over |terms|: where the terms cancel, autograd's sum in bf16
        is off by a fraction of them, not of the sum); ``how`` says how both were weighted ("" for not at all)."""
        atol = 1e-6 * float(torch.sqrt(sum(g.double().pow(2).sum() for g in batch)))
        wrong = []
        for (name, p), g, scale in zip(self.params, batch, scales):
            fast = plain.get(id(p), torch.zeros_like(g))
            if _differs(fast, g, atol, rtol, scale):  # by how much stays unsaid: a value of the batch's gradients
                owners = [rule.name for rule in self._rules if any(q is p for q in rule.params.values())]
                wrong.append(f"{name} (module {', '.join(map(repr, owners))})")
        if wrong:
            self._refuse(f"the per-example gradients {how}do not sum to the batch gradient (to a relative "
                         f"{rtol:g}) for {'; '.join(wrong)}. The parameter is probably used outside the module that "
                         "registers it (e.g. a tied weight passed to F.linear), or its module mixes examples. Call "
                         "the module itself, or use finetune.engine_mode=reference")

    def _refuse(self, why: str) -> None:
        self.detach()  # unusable on this model; frees the module for another engine (e.g. reference mode)
        raise EngineSelfCheckError(f"DP engine self-check failed: {why}")

    def _clip_factors(self, norms: Tensor) -> Tensor:
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def _reference(self, losses: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """Per-example gradients materialised by batched autograd (vmap over the backward)."""
        b = losses.shape[0]
        params = [p for _, p in self.params]
        eye = torch.eye(b, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        grads = [
            torch.zeros(b, *p.shape, dtype=torch.float32, device=p.device) if g is None else g.float()
            for g, p in zip(grads, params)
        ]
        norms = torch.cat([g.reshape(b, -1) for g in grads], dim=1).norm(dim=1)
        c = self._clip_factors(norms)
        return norms, {id(p): torch.tensordot(c, g, dims=1) for g, p in zip(grads, params)}

    def _book_keeping(self, losses: Tensor, check: bool = False
                      ) -> tuple[Tensor, dict[int, Tensor], Callable[[Tensor], dict[int, Tensor]] | None,
                                 tuple[list[Tensor], list[float]] | None]:
        """One backward to the layer outputs, per-layer norms, then one clipped GEMM per layer.

        Returns (norms [b], clipped sums, and with ``check`` the function from factors [b] to the
        sums they weight, and for the self-check the batch gradient of every trainable parameter,
        taken in the same backward, with the norm of each one's sum over |terms| (``magnitudes``)).
        """
        b = losses.shape[0]
        edges = [e for rule in self._rules for e in rule.edges()]
        params = [p for _, p in self.params] if check else []
        batch = None
        self._recording = False  # recomputations below (fallback rule) must not be recorded
        try:
            if edges or params:
                grads = list(torch.autograd.grad(losses.sum(), edges + params, allow_unused=True))
                if check:
                    batch = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                             for g, p in zip(grads[len(edges):], params)]
                    del grads[len(edges):]
                for rule in self._rules:
                    n = len(rule.edges())
                    rule.take_grads(grads[:n])
                    del grads[:n]
            active = [rule for rule in self._rules if rule.num_calls > 0]
            sq = torch.zeros(b, dtype=torch.float32, device=losses.device)
            for rule in active:
                sq = sq + rule.sqnorms(b, self._skip[id(rule)]).to(sq.device)
            for pid, uses in self._shared.items():
                total = None
                for rule, local in uses:
                    if rule.num_calls > 0:
                        g = rule.per_example_grads(local, b)
                        total = g if total is None else total + g.to(total.device)
                if total is not None:
                    sq = sq + total.reshape(b, -1).pow(2).sum(dim=1).to(sq.device)
            norms = sq.sqrt()

            def summed(factors: Tensor) -> dict[int, Tensor]:
                out: dict[int, Tensor] = {}
                for rule in active:
                    for local, g in rule.clipped_sums(factors).items():
                        pid = id(rule.params[local])
                        out[pid] = out[pid] + g if pid in out else g
                return out

            reference = None
            if check:
                sizes: dict[int, Tensor] = {}
                for rule in active:
                    for local, m in rule.magnitudes(b).items():
                        pid = id(rule.params[local])
                        sizes[pid] = sizes[pid] + m if pid in sizes else m
                reference = (batch, [float(sizes[id(p)].double().norm()) if id(p) in sizes else 0.0
                                     for _, p in self.params])
            return norms, summed(self._clip_factors(norms)), summed if check else None, reference
        finally:
            self._recording = True

    # ------------------------------------------------------------------ per logical step
    @_full_precision
    def finalize(self, add_noise: bool = True) -> dict[str, float]:
        """Noise once per coordinate, divide by the expected batch size, write ``.grad``.

        ``add_noise=False`` is for data-parallel ranks other than the one that noises: the
        ``.grad`` written are then summed across ranks, so the noise must come from exactly
        one of them (and from a generator that is not shared with the others).

        Returns diagnostics. ``noise_std`` is public; the ``nonprivate_*`` values are
        computed from private data without noise: log them only as non-private diagnostics.
        """
        std = self.noise_multiplier * self.max_grad_norm if add_noise else 0.0
        for _, p in self.params:
            total = self._sums.get(id(p))
            if total is None:
                total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if std > 0:
                total = total + std * self._standard_normal(p.shape).to(p.device)
            p.grad = (total / self.expected_batch_size).to(p.dtype)
        stats = {
            "noise_std": std / self.expected_batch_size,
            "nonprivate_batch_size": float(self._count),
            "nonprivate_clip_fraction": float(self._clipped) / self._count if self._count else 0.0,
            "nonprivate_mean_grad_norm": float(self._norm_sum) / self._count if self._count else 0.0,
        }
        self._sums = {}
        self._reset_stats()
        return stats

    def _standard_normal(self, shape: torch.Size) -> Tensor:
        if self.secure_noise:
            return secure_standard_normal(shape)
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)

    def _reset_stats(self) -> None:
        self._step_norms: list[Tensor] = []  # per micro-batch, for nonfinite_examples
        self._step_finite_losses: list[Tensor | None] = []  # the same, reference mode: which losses are finite
        self._count = 0
        self._clipped: Tensor | int = 0
        self._norm_sum: Tensor | float = 0.0
