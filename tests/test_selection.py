"""Parameter selection policies: which tensors DP fine-tuning trains, counted independently."""
import pytest
import torch
from conftest import assert_engine_matches_brute_force

from trainer.config import load_config
from trainer.models import AttentionBlock, SpatialTransformer
from trainer.models.unet import timestep_embedding
from trainer.selection import select_trainable
from trainer.stages.common import build_ldm


def tiny_ldm(attention_blocks: bool = False):
    unet = ["ldm.unet.model_channels=32", "ldm.unet.channel_mult=[1,2]", "ldm.unet.attention_resolutions=[1,2]"]
    if attention_blocks:
        unet += ["ldm.unet.use_spatial_transformer=false", "ldm.unet.context_dim=null", "ldm.conditioner.type=none"]
    return build_ldm(load_config("demo", unet))


def count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def test_attention_policy_trains_every_spatial_transformer_and_the_embedder():
    ldm = tiny_ldm()
    sel = select_trainable(ldm, "attention")
    blocks = [m for m in ldm.unet.modules() if isinstance(m, SpatialTransformer)]
    assert len(blocks) == 7  # input: 1 per level (2), middle (1), output: num_res_blocks + 1 per level (4)
    assert sel.trainable_count == count(blocks) + count([ldm.cond_stage_model])
    assert sel.total_count == sum(p.numel() for p in ldm.parameters())
    assert all(n.startswith("cond_stage_model.") or ".transformer_blocks." in n or ".proj_" in n or ".norm." in n
               for n in sel.trainable)
    frozen = [n for n, p in ldm.named_parameters() if not p.requires_grad]
    assert any(n.startswith("unet.input_blocks.0.") for n in frozen) and "unet.time_embed.0.weight" in frozen


def test_attention_from_k_counts_from_one_in_unet_order():
    ldm = tiny_ldm()
    names = [n for n, m in ldm.unet.named_modules() if isinstance(m, SpatialTransformer)]
    sel = select_trainable(ldm, "attention", attention_from=3)
    trained_blocks = {n for n in names if any(t.startswith(f"unet.{n}.") for t in sel.trainable)}
    assert trained_blocks == set(names[2:])
    with pytest.raises(ValueError, match="attention_from"):
        select_trainable(ldm, "attention", attention_from=len(names) + 1)


def test_embedder_only_and_full():
    ldm = tiny_ldm()
    sel = select_trainable(ldm, "embedder_only")
    assert sel.trainable == ["cond_stage_model.embedding.weight"]
    sel = select_trainable(ldm, "full")
    assert sel.trainable_count == sel.total_count


def test_attention_blocks_for_unconditional_models():
    ldm = tiny_ldm(attention_blocks=True)
    with pytest.raises(ValueError, match="no SpatialTransformer"):
        select_trainable(ldm, "attention")
    sel = select_trainable(ldm, "attention_blocks")
    blocks = [m for m in ldm.unet.modules() if isinstance(m, AttentionBlock)]
    assert blocks and sel.trainable_count == count(blocks)


def test_policy_changes_gradients_only_where_selected():
    ldm = tiny_ldm()
    select_trainable(ldm, "attention", attention_from=2)
    z = torch.randn(2, 4, 8, 8)
    ldm.loss(z, torch.tensor([1, 2]), torch.Generator().manual_seed(0)).sum().backward()
    for name, p in ldm.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_lora_policy_adds_zero_initialised_adapters_and_trains_only_them_and_the_embedder():
    from trainer.models import CrossAttention, LoRALinear
    ldm = tiny_ldm()
    torch.manual_seed(0)
    x, t, labels = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.tensor([1, 2])
    before = ldm.eps(x, t, ldm.context(labels)).detach()
    sel = select_trainable(ldm, "lora", attention_from=2, lora_rank=3)
    blocks = [m for m in ldm.unet.modules() if isinstance(m, SpatialTransformer)]
    adapters = [m for b in blocks[1:] for m in b.modules() if isinstance(m, LoRALinear)]
    attentions = [m for b in blocks[1:] for m in b.modules() if isinstance(m, CrossAttention)]
    assert len(adapters) == 4 * len(attentions) and not any(isinstance(m, LoRALinear) for m in blocks[0].modules())
    want = sum(a.lora_down.weight.numel() + a.lora_up.weight.numel() for a in adapters) + count([ldm.cond_stage_model])
    assert sel.trainable_count == want and all(a.lora_down.weight.shape[0] == 3 for a in adapters)
    assert all("lora_" in n or n.startswith("cond_stage_model.") for n in sel.trainable)
    assert not any(p.requires_grad for a in adapters for p in a.base.parameters())
    assert sel.lora == {"rank": 3, "alpha": None, "attention_from": 2}
    assert torch.equal(ldm.eps(x, t, ldm.context(labels)), before), "an adapted model starts equal to its base"


def _perturbed_tiny_ldm():
    torch.manual_seed(0)
    ldm = tiny_ldm()
    with torch.no_grad():  # zero-initialised output layers would give zero gradients
        for p in ldm.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ldm.eval()


def _assert_exact_under_the_engine(ldm) -> None:
    """The engine's clipped sum (fast and reference modes) against a brute-force loop over 5 examples."""
    n, g = 5, torch.Generator().manual_seed(1)
    z0, noise = torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 4, 4, 4, generator=g)
    t, labels = torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)

    def losses_of(rows: torch.Tensor) -> torch.Tensor:
        x_t = ldm.schedule.q_sample(z0[rows], t[rows], noise[rows])
        return (ldm.eps(x_t, t[rows], ldm.context(labels[rows])) - noise[rows]).pow(2).flatten(1).mean(dim=1)

    assert_engine_matches_brute_force(ldm, losses_of, n)


def test_lora_fine_tuning_is_exact_against_a_brute_force_loop():
    """The engine clips the adapters' per-example gradients exactly (fast and reference modes)."""
    ldm = _perturbed_tiny_ldm()
    select_trainable(ldm, "lora", lora_rank=2)
    with torch.no_grad():  # zero-initialised adapter ups would give zero gradients
        for name, p in ldm.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.1)
    _assert_exact_under_the_engine(ldm)


def _grads(ldm, loss):
    params = [p for p in ldm.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_context_grad_trainable_stops_the_conditioning_gradient_at_frozen_transformers():
    """Against a hand-written UNet forward in which the encoder's blocks get a detached context."""
    ldm = _perturbed_tiny_ldm()
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t, labels = torch.tensor([10, 400, 900]), torch.tensor([1, 2, 3])

    def loss() -> torch.Tensor:
        return (ldm.eps(x, t, ldm.context(labels)) - noise).pow(2).mean()

    def loss_by_hand() -> torch.Tensor:  # attention_from=4: the input and middle blocks' 3 transformers are frozen
        unet, context = ldm.unet, ldm.context(labels)
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
        h, skips = x, []
        for block in unet.input_blocks:
            h = block(h, emb, context.detach())
            skips.append(h)
        h = unet.middle_block(h, emb, context.detach())
        for block in unet.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return (unet.out(h) - noise).pow(2).mean()

    select_trainable(ldm, "attention", attention_from=4)
    exact, by_hand = _grads(ldm, loss()), _grads(ldm, loss_by_hand())
    select_trainable(ldm, "attention", attention_from=4, context_grad="trainable")
    stopped = _grads(ldm, loss())
    assert torch.allclose(stopped, by_hand, rtol=1e-5, atol=1e-7)
    n_embedder = ldm.cond_stage_model.embedding.weight.numel()
    assert not torch.allclose(stopped[-n_embedder:], exact[-n_embedder:], rtol=1e-3)  # the embedder's rows differ
    # the transformers' own gradients do not (up to rounding: without a gradient to record, the frozen
    # blocks take the CPU's small-map paths, trainer/models/small_maps.py)
    own, own_exact = stopped[:-n_embedder], exact[:-n_embedder]
    assert (own - own_exact).abs().max() <= 1e-5 * own_exact.abs().max()
    needs_grad = []  # the backward never enters the encoder: its output needs no gradient
    handle = ldm.unet.middle_block.register_forward_hook(lambda m, args, out: needs_grad.append(out.requires_grad))
    loss()
    select_trainable(ldm, "attention", attention_from=4)  # back to all: the hooks are gone
    assert torch.equal(_grads(ldm, loss()), exact)
    handle.remove()
    assert needs_grad == [False, True]
    select_trainable(ldm, "attention", attention_from=1, context_grad="trainable")  # nothing frozen, nothing stopped
    all_trainable = _grads(ldm, loss())
    select_trainable(ldm, "attention", attention_from=1)
    assert torch.equal(all_trainable, _grads(ldm, loss()))


def test_context_grad_trainable_is_exact_under_the_engine_and_refused_without_trainable_transformers():
    ldm = _perturbed_tiny_ldm()
    select_trainable(ldm, "attention", attention_from=4, context_grad="trainable")
    _assert_exact_under_the_engine(ldm)
    for policy in ("full", "embedder_only"):
        with pytest.raises(ValueError, match="context_grad=trainable needs finetune.policy attention or lora"):
            select_trainable(ldm, policy, context_grad="trainable")
    with pytest.raises(ValueError, match="finetune.context_grad must be one of"):
        select_trainable(ldm, "attention", context_grad="none")
