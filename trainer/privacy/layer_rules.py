"""Per-layer rules for per-example gradient norms and clipped gradient sums.

A rule covers the trainable parameters registered directly on one module (for
``nn.MultiheadAttention``, also those of its ``out_proj``, which its forward uses
without calling it). During the forward it keeps what it needs from the module's
inputs and routes each output through an identity node (:class:`_Tap`) whose
gradient edge survives in-place edits of the output; after one backward the engine
hands it the output gradients G, and the rule answers, per example i of the
micro-batch:

- ``sqnorms(b, skip)``: ``sum_p ||g_i(p)||^2`` over its parameters p not in ``skip``;
- ``per_example_grads(name, b)``: ``g_i(p)`` instantiated (for parameters shared with
  another rule, whose norms do not decompose per rule);
- ``clipped_sums(c)``: ``sum_i c_i g_i(p)`` for each of its parameters, float32;
- ``magnitudes(b)``: the same sum over the absolute values of its terms (the engine's
  self-check judges rounding against it: a sum whose terms cancel is no more exact than
  its terms).

Assumptions (the engine's contract): every trainable module is called on batch-first
inputs (checked), examples do not interact inside a module (BatchNorm is refused), and a
parameter influences the loss only through the output of the module that registers it.
Inputs, activations and gradients handled here are derived from private examples.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from trainer import kernels


class _Tap(torch.autograd.Function):
    """Identity whose output is a fresh autograd node (not a view of its input).

    The gradient edge of that node is the gradient w.r.t. the module's output as it was
    produced, even if later code edits the output in place (``ReLU(inplace=True)``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        return grad_output


def _detach(tree: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, tree)


def _check_batch_first(x: Tensor, batch_size: int, rule: "LayerRule", what: str) -> None:
    if x.dim() == 0 or x.shape[0] != batch_size:
        raise ValueError(
            f"module {rule.name!r} ({type(rule.module).__name__}) got {what} of shape {tuple(x.shape)}, but the "
            f"micro-batch has {batch_size} examples: trainable modules must be called on batch-first inputs"
        )


class LayerRule:
    """Base class: recording of inputs and output-gradient edges, one entry per call."""

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter], kernel_backend: str):
        self.name = name or "<root>"
        self.module = module
        self.params = params
        self.kernel_backend = kernel_backend
        self._inputs: list[Any] = []
        self._edges: list[list[GradientEdge | None]] = []
        self._grads: list[list[Tensor | None]] = []

    def keep_inputs(self, args: tuple, kwargs: dict) -> Any:
        """What this rule needs from the forward inputs of one call (detached)."""
        raise NotImplementedError

    def capture(self, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward-hook body: keep the inputs, tap every output tensor that requires grad."""
        leaves, spec = tree_flatten(output)
        edges: list[GradientEdge | None] = []
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                leaves[k] = _Tap.apply(leaf)
                edges.append(get_gradient_edge(leaves[k]))
            else:
                edges.append(None)
        if all(e is None for e in edges):
            return None
        self._inputs.append(self.keep_inputs(args, kwargs))
        self._edges.append(edges)
        return tree_unflatten(leaves, spec)

    def edges(self) -> list[GradientEdge]:
        return [e for call in self._edges for e in call if e is not None]

    def take_grads(self, grads: list[Tensor | None]) -> None:
        """Receive the output gradients, in the order of :meth:`edges`."""
        it = iter(grads)
        self._grads = [[next(it) if e is not None else None for e in call] for call in self._edges]

    def clear(self) -> None:
        self._inputs, self._edges, self._grads = [], [], []

    @property
    def num_calls(self) -> int:
        return len(self._edges)

    def sqnorms(self, batch_size: int, skip: set[str]) -> Tensor:
        raise NotImplementedError

    def per_example_grads(self, name: str, batch_size: int) -> Tensor:
        raise NotImplementedError

    def clipped_sums(self, clip_factors: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def magnitudes(self, batch_size: int) -> dict[str, Tensor]:
        """Elementwise sums of |terms| of each parameter's gradient sum: every term of
        ``clipped_sums`` is a product of recorded inputs and output gradients, so the sum over
        their absolute values bounds any cancellation between them (examples, calls, positions)."""
        recorded = self._inputs, self._grads
        try:
            self._inputs = [tree_map(lambda x: x.abs() if isinstance(x, Tensor) else x, x) for x in self._inputs]
            self._grads = [[None if g is None else g.abs() for g in call] for call in self._grads]
            device = next(iter(self.params.values())).device
            return self.clipped_sums(torch.ones(batch_size, dtype=torch.float32, device=device))
        finally:
            self._inputs, self._grads = recorded


class _InstantiatingRule(LayerRule):
    """Rules whose per-example gradients are small (norm affines, fallback): build them, then reduce."""

    _cache: dict[str, Tensor] | None = None

    def all_per_example_grads(self, batch_size: int) -> dict[str, Tensor]:
        """{param name: [b, *param.shape] float32}, summed over the calls of this micro-batch."""
        raise NotImplementedError

    def _cached(self, batch_size: int) -> dict[str, Tensor]:
        if self._cache is None:
            self._cache = self.all_per_example_grads(batch_size)
        return self._cache

    def take_grads(self, grads: list[Tensor | None]) -> None:
        super().take_grads(grads)
        self._cache = None

    def clear(self) -> None:
        super().clear()
        self._cache = None

    def sqnorms(self, batch_size: int, skip: set[str]) -> Tensor:
        grads = self._cached(batch_size)
        out = torch.zeros(batch_size, dtype=torch.float32, device=next(iter(self.params.values())).device)
        for name, g in grads.items():
            if name not in skip:
                out = out + g.reshape(batch_size, -1).pow(2).sum(dim=1).to(out.device)
        return out

    def per_example_grads(self, name: str, batch_size: int) -> Tensor:
        return self._cached(batch_size)[name]

    def clipped_sums(self, clip_factors: Tensor) -> dict[str, Tensor]:
        grads = self._cached(clip_factors.shape[0])
        return {name: torch.tensordot(clip_factors.to(g.device), g, dims=1) for name, g in grads.items()}

    def magnitudes(self, batch_size: int) -> dict[str, Tensor]:
        # the per-example gradients are built in float32 here: only their sum over the batch is judged
        return {name: g.abs().sum(dim=0) for name, g in self._cached(batch_size).items()}


class LinearRule(LayerRule):
    """``nn.Linear`` over [B, ..., d_in], and pointwise (1x1, stride 1) Conv1d/Conv2d.

    Both are a GEMM per position; weight norms come from ``kernels.per_sample_linear_sqnorms``
    (ghost or instantiate by the cost rule) and the clipped sum from one
    ``kernels.clipped_linear_grad`` GEMM. Several calls of the module are concatenated
    along the sequence axis: ``sum_calls G_c^T A_c = [G_1; G_2]^T [A_1; A_2]``.
    """

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter], kernel_backend: str):
        super().__init__(name, module, params, kernel_backend)
        self.is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d))

    def keep_inputs(self, args: tuple, kwargs: dict) -> Tensor | None:
        if "weight" not in self.params:
            return None  # the bias gradient needs only G
        x = args[0] if args else kwargs["input"]
        return x.detach()

    def _as_sequence(self, x: Tensor, batch_size: int, what: str) -> Tensor:
        _check_batch_first(x, batch_size, self, what)
        if self.is_conv:  # [B, C, *spatial] -> [B, positions, C]
            return x.flatten(2).transpose(1, 2)
        return x.reshape(batch_size, -1, x.shape[-1])

    def _input_sequence(self, x: Tensor, batch_size: int) -> Tensor:
        return self._as_sequence(x, batch_size, "an input")

    def _sequences(self, batch_size: int) -> tuple[Tensor | None, Tensor | None]:
        A_parts, G_parts = [], []
        for x, (g,) in zip(self._inputs, self._grads):
            if g is None:
                continue
            G_parts.append(self._as_sequence(g, batch_size, "an output"))
            if x is not None:
                A_parts.append(self._input_sequence(x, batch_size))
        if not G_parts:
            return None, None
        G = G_parts[0] if len(G_parts) == 1 else torch.cat(G_parts, dim=1)
        A = None
        if A_parts:
            A = A_parts[0] if len(A_parts) == 1 else torch.cat(A_parts, dim=1)
        return A, G

    def sqnorms(self, batch_size: int, skip: set[str]) -> Tensor:
        A, G = self._sequences(batch_size)
        device = next(iter(self.params.values())).device
        if G is None:
            return torch.zeros(batch_size, dtype=torch.float32, device=device)
        use_w = "weight" in self.params and "weight" not in skip
        use_b = "bias" in self.params and "bias" not in skip
        if use_w:
            return kernels.per_sample_linear_sqnorms(A, G, method="auto", bias=use_b, backend=self.kernel_backend)
        if use_b:
            return G.float().sum(dim=1).pow(2).sum(dim=1)
        return torch.zeros(batch_size, dtype=torch.float32, device=G.device)

    def per_example_grads(self, name: str, batch_size: int) -> Tensor:
        A, G = self._sequences(batch_size)
        shape = self.params[name].shape
        if G is None:
            return torch.zeros(batch_size, *shape, dtype=torch.float32, device=self.params[name].device)
        if name == "bias":
            return G.float().sum(dim=1)
        return torch.bmm(G.float().transpose(1, 2), A.float()).reshape(batch_size, *shape)

    def clipped_sums(self, clip_factors: Tensor) -> dict[str, Tensor]:
        A, G = self._sequences(clip_factors.shape[0])
        if G is None:
            return {}
        if "weight" in self.params:
            grad_w, grad_b = kernels.clipped_linear_grad(
                A, G, clip_factors, bias="bias" in self.params, backend=self.kernel_backend
            )
            out = {"weight": grad_w.reshape(self.params["weight"].shape)}
            if grad_b is not None:
                out["bias"] = grad_b
            return out
        return {"bias": (G.float() * clip_factors.to(G.device)[:, None, None]).sum(dim=(0, 1))}


class ConvRule(LinearRule):
    """``nn.Conv1d``/``nn.Conv2d`` with any kernel, stride, dilation and padding (groups 1).

    Output position l of example i is ``W @ patch_il + b``, with ``patch_il`` the padded
    input window that produced it (``F.unfold``, flattened channel-major like
    ``weight.reshape(C_out, -1)``): the layer is a GEMM over the sequence of patches, and
    :class:`LinearRule`'s norms and clipped sums apply unchanged.
    """

    def _input_sequence(self, x: Tensor, batch_size: int) -> Tensor:
        m = self.module
        _check_batch_first(x, batch_size, self, "an input")
        spatial = 2 if isinstance(m, nn.Conv2d) else 1
        if x.dim() != 2 + spatial:
            raise ValueError(f"module {self.name!r} ({type(m).__name__}) got an unbatched input of shape {tuple(x.shape)}")
        # The module's own padding (zeros, reflect, ... and "same" even when asymmetric), as in its forward.
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        if spatial == 1:  # [B, C, L] as a one-row image
            x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [B, C_in * prod(kernel), positions]
        return patches.transpose(1, 2)


class LayerNormRule(_InstantiatingRule):
    """``nn.LayerNorm`` affine: g_i(w) = sum_pos G * x_hat, g_i(b) = sum_pos G."""

    def keep_inputs(self, args: tuple, kwargs: dict) -> Tensor:
        return (args[0] if args else kwargs["input"]).detach()

    def all_per_example_grads(self, batch_size: int) -> dict[str, Tensor]:
        m: nn.LayerNorm = self.module
        out = {n: torch.zeros(batch_size, *p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        n_norm = len(m.normalized_shape)
        for x, (g,) in zip(self._inputs, self._grads):
            if g is None:
                continue
            _check_batch_first(x, batch_size, self, "an input")
            if x.dim() <= n_norm:
                raise ValueError(f"module {self.name!r} (LayerNorm) got an unbatched input of shape {tuple(x.shape)}")
            pos_dims = tuple(range(1, x.dim() - n_norm))
            g = g.float()
            if "weight" in out:
                x_hat = F.layer_norm(x.float(), m.normalized_shape, None, None, m.eps)
                out["weight"] += (g * x_hat).sum(dim=pos_dims) if pos_dims else g * x_hat
            if "bias" in out:
                out["bias"] += g.sum(dim=pos_dims) if pos_dims else g
        return out


class GroupNormRule(_InstantiatingRule):
    """``nn.GroupNorm`` affine over [B, C, *]: per-channel sums of G * x_hat and of G."""

    def keep_inputs(self, args: tuple, kwargs: dict) -> Tensor:
        return (args[0] if args else kwargs["input"]).detach()

    def all_per_example_grads(self, batch_size: int) -> dict[str, Tensor]:
        m: nn.GroupNorm = self.module
        out = {n: torch.zeros(batch_size, *p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        for x, (g,) in zip(self._inputs, self._grads):
            if g is None:
                continue
            _check_batch_first(x, batch_size, self, "an input")
            g = g.float().reshape(batch_size, m.num_channels, -1)
            if "weight" in out:
                x_hat = F.group_norm(x.float(), m.num_groups, None, None, m.eps).reshape(g.shape)
                out["weight"] += (g * x_hat).sum(dim=2)
            if "bias" in out:
                out["bias"] += g.sum(dim=2)
        return out


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: the per-example gradient has one row per distinct token id.

    ``||g_i||^2 = sum_v ||sum_{t: id_it = v} G_it||^2``, computed by grouping the rows of
    G by (example, id) with one ``index_add``; ``padding_idx`` rows get no gradient.
    """

    def keep_inputs(self, args: tuple, kwargs: dict) -> Tensor:
        return (args[0] if args else kwargs["input"]).detach()

    def _rows(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(example index [R], token id [R], G row [R, d] float32) over all calls, padding dropped."""
        m: nn.Embedding = self.module
        ex, ids, rows = [], [], []
        for x, (g,) in zip(self._inputs, self._grads):
            if g is None:
                continue
            _check_batch_first(x, batch_size, self, "token ids")
            flat_ids = x.reshape(batch_size, -1)
            ex.append(torch.arange(batch_size, device=x.device).repeat_interleave(flat_ids.shape[1]))
            ids.append(flat_ids.reshape(-1))
            rows.append(g.reshape(-1, m.embedding_dim).float())
        if not rows:
            return None
        ex_t, ids_t, rows_t = torch.cat(ex), torch.cat(ids), torch.cat(rows)
        if m.padding_idx is not None:
            keep = ids_t != m.padding_idx
            ex_t, ids_t, rows_t = ex_t[keep], ids_t[keep], rows_t[keep]
        return ex_t, ids_t, rows_t

    def sqnorms(self, batch_size: int, skip: set[str]) -> Tensor:
        device = self.module.weight.device
        rows = self._rows(batch_size)
        if rows is None or "weight" in skip:
            return torch.zeros(batch_size, dtype=torch.float32, device=device)
        ex, ids, G = rows
        keys, inverse = torch.unique(ex * self.module.num_embeddings + ids, return_inverse=True)
        summed = torch.zeros(keys.shape[0], G.shape[1], dtype=torch.float32, device=G.device).index_add_(0, inverse, G)
        per_key = summed.pow(2).sum(dim=1)
        example_of_key = torch.div(keys, self.module.num_embeddings, rounding_mode="floor")
        return torch.zeros(batch_size, dtype=torch.float32, device=G.device).index_add_(0, example_of_key, per_key)

    def per_example_grads(self, name: str, batch_size: int) -> Tensor:
        m: nn.Embedding = self.module
        out = torch.zeros(batch_size, m.num_embeddings, m.embedding_dim, dtype=torch.float32, device=m.weight.device)
        rows = self._rows(batch_size)
        if rows is not None:
            ex, ids, G = rows
            out.view(-1, m.embedding_dim).index_add_(0, ex * m.num_embeddings + ids, G)
        return out

    def clipped_sums(self, clip_factors: Tensor) -> dict[str, Tensor]:
        m: nn.Embedding = self.module
        rows = self._rows(clip_factors.shape[0])
        if rows is None:
            return {}
        ex, ids, G = rows
        scaled = G * clip_factors.to(G.device)[ex][:, None]
        grad_w = torch.zeros(m.num_embeddings, m.embedding_dim, dtype=torch.float32, device=G.device)
        return {"weight": grad_w.index_add_(0, ids, scaled)}


class FunctionalRule(_InstantiatingRule):
    """Fallback for any other module: per-example gradients by ``vmap(grad(...))``.

    For each recorded call, example i's gradient is ``d/dp <f(p, inputs_i), G_i>`` with
    ``f`` the module run through ``functional_call`` on its stored inputs. A tensor input
    whose leading dimension equals the micro-batch size is taken as batched, the rest as
    shared, and an input once seen with another leading dimension stays shared: a shared
    table of K rows is never split among the examples of a micro-batch that happens to
    hold K (the engine's self-check, on a batch of its own size, sees it first). The
    forward must be deterministic (vmap refuses random ops such as dropout); the engine
    disables its hooks while this recomputation runs.
    """

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter], kernel_backend: str):
        super().__init__(name, module, params, kernel_backend)
        self._shared: set[tuple[str, int]] = set()  # (input structure, leaf index) seen not batched

    def keep_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _detach(args), _detach(kwargs)

    def _batched_leaves(self, leaves: list, structure: str, batch_size: int) -> list[int]:
        tensors = [k for k, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.dim() > 0]
        self._shared.update((structure, k) for k in tensors if leaves[k].shape[0] != batch_size)
        return [k for k in tensors if (structure, k) not in self._shared]

    def all_per_example_grads(self, batch_size: int) -> dict[str, Tensor]:
        params = {n: p.detach() for n, p in self.params.items()}
        out = {n: torch.zeros(batch_size, *p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        for (args, kwargs), grads in zip(self._inputs, self._grads):
            used = [(k, g) for k, g in enumerate(grads) if g is not None]
            if not used:
                continue
            for _, g in used:
                _check_batch_first(g, batch_size, self, "an output")
            leaves, spec = tree_flatten((args, kwargs))
            batched = self._batched_leaves(leaves, str(spec), batch_size)
            out_index = [k for k, _ in used]

            def inner_product(p: dict[str, Tensor], batched_leaves: list[Tensor], out_grads: list[Tensor]) -> Tensor:
                full = list(leaves)
                for k, leaf in zip(batched, batched_leaves):
                    full[k] = leaf.unsqueeze(0)
                call_args, call_kwargs = tree_unflatten(full, spec)
                outputs = tree_flatten(functional_call(self.module, p, call_args, call_kwargs))[0]
                return sum((outputs[k] * g.unsqueeze(0)).sum() for k, g in zip(out_index, out_grads))

            try:
                per_example = vmap(grad(inner_product), in_dims=(None, 0, 0))(
                    params, [leaves[k] for k in batched], [g for _, g in used]
                )
            except RuntimeError as err:
                raise RuntimeError(
                    f"per-example gradients of module {self.name!r} ({type(self.module).__name__}) by "
                    f"torch.func failed; its forward must be deterministic and vmap-able: {err}"
                ) from err
            for n, g in per_example.items():
                out[n] += g.float()
        return out


def _is_plain_conv(m: nn.Module) -> bool:
    """A Conv1d/Conv2d running its own forward, without groups (a GEMM per output position)."""
    return type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward) and m.groups == 1


def _is_pointwise_conv(m: nn.Module) -> bool:
    padding_zero = m.padding == "valid" or m.padding == "same" or all(p == 0 for p in m.padding)
    return all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and padding_zero


def make_rule(name: str, module: nn.Module, params: dict[str, nn.Parameter], kernel_backend: str) -> LayerRule:
    """The rule for ``module``'s trainable params (a dict of local name -> param)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"module {name!r} is a {type(module).__name__} with trainable parameters: batch statistics mix "
            "examples, so per-example gradients are undefined; use GroupNorm/LayerNorm or freeze it"
        )
    standard = set(params) <= {"weight", "bias"}
    if standard and isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return LinearRule(name, module, params, kernel_backend)
    if standard and _is_plain_conv(module):
        if _is_pointwise_conv(module):
            return LinearRule(name, module, params, kernel_backend)
        return ConvRule(name, module, params, kernel_backend)
    if standard and isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        return LayerNormRule(name, module, params, kernel_backend)
    if standard and isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward:
        return GroupNormRule(name, module, params, kernel_backend)
    if standard and isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        if module.max_norm is not None or module.scale_grad_by_freq:
            raise ValueError(
                f"embedding {name!r}: max_norm rewrites the weight from the batch and scale_grad_by_freq "
                "couples examples; neither is supported for a trainable embedding under DP-SGD"
            )
        return EmbeddingRule(name, module, params, kernel_backend)
    return FunctionalRule(name, module, params, kernel_backend)


# Modules whose forward uses a child's parameters without calling the child: their rule
# takes the child's parameters too, and the child gets no rule of its own.
_ABSORBS_CHILDREN = (nn.MultiheadAttention,)


def build_rules(root: nn.Module, kernel_backend: str) -> list[LayerRule]:
    """One rule per module that registers trainable parameters (shared modules once)."""
    rules: list[LayerRule] = []
    absorbed: set[int] = set()
    for name, module in root.named_modules():
        if id(module) in absorbed:
            continue
        if isinstance(module, _ABSORBS_CHILDREN):
            params = {n: p for n, p in module.named_parameters() if p.requires_grad}
            absorbed.update(id(m) for m in module.modules())
        else:
            params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if params:
            rules.append(make_rule(name, module, params, kernel_backend))
    return rules
