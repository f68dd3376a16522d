"""The engine's fast path on the Triton kernels equals its reference mode.

On CUDA the kernels are compiled; without a GPU they run in Triton's CPU interpreter, and
TRITON_INTERPRET must be set before Triton is first imported, so the check runs in a fresh
interpreter process either way.
"""
import os
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent(r'''
    import sys
    import torch, torch.nn.functional as F
    from torch import nn
    import trainer.kernels.triton_norms as tn, trainer.kernels.triton_clipped_grad as tc
    from trainer.privacy import DPGradientEngine

    calls = {"norms": 0, "grad": 0}
    for mod, names, key in ((tn, ("ghost_sqnorms", "instantiate_sqnorms"), "norms"), (tc, ("clipped_grad",), "grad")):
        for name in names:
            real = getattr(mod, name)
            def counted(*a, _real=real, _key=key, **k):
                calls[_key] += 1
                return _real(*a, **k)
            setattr(mod, name, counted)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 1)            # 1x1 conv -> sequence Linear
            self.ln = nn.LayerNorm(12)
            self.q = nn.Linear(12, 12, bias=False)
            self.kv = nn.Linear(5, 24, bias=False)      # T_ctx = 1 (ghost) vs T = 9 (instantiate)
            self.out = nn.Linear(12, 7)
            self.emb = nn.Embedding(4, 5)
        def forward(self, x, y):
            h = self.conv(x).flatten(2).transpose(1, 2)            # [B, 9, 12]
            ctx = self.emb(y)[:, None]                               # [B, 1, 5]
            k, v = self.kv(ctx).chunk(2, dim=-1)
            a = F.scaled_dot_product_attention(self.q(self.ln(h))[:, None], k[:, None], v[:, None])[:, 0]
            return self.out(h + a).pow(2).mean(dim=(1, 2))         # per-example loss [B]

    device = sys.argv[1]
    torch.manual_seed(0)
    net = Net().to(device)
    x, y = torch.randn(13, 3, 3, 3) * torch.linspace(0.1, 3, 13).view(-1, 1, 1, 1), torch.randint(0, 4, (13,))
    x, y = x.to(device), y.to(device)
    grads = {}
    for mode, backend in (("reference", "torch"), ("fast", "triton")):
        engine = DPGradientEngine(net, 0.5, 0.0, 10.0, mode=mode, kernel_backend=backend)
        for sl in (slice(0, 6), slice(6, 6), slice(6, 13)):
            engine.accumulate(net(x[sl], y[sl]))
        engine.finalize()
        engine.detach()
        grads[mode] = torch.cat([p.grad.flatten() for p in net.parameters()])
        net.zero_grad(set_to_none=True)
    err = float((grads["fast"] - grads["reference"]).norm() / grads["reference"].norm())
    assert calls["norms"] > 0 and calls["grad"] > 0, calls
    print("REL_ERR", err, calls)
''')


def test_fast_path_on_triton_kernels_equals_reference_mode():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, device], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("REL_ERR")][0]
    assert float(line.split()[1]) <= 1e-5, line
