"""Both ops inside torch.compile(fullgraph=True): forward and backward of a
TopK SAE step, with no graph break (fullgraph raises on one), matching eager."""

import functools

import pytest
import torch
from devices import op_targets

import interpkernels

# The C++ CPU kernels once (the ISA level does not change what compiles), and each GPU backend.
COMPILE_TARGETS = [t for t in op_targets() if t.cpu_isa in (None, interpkernels.cpu_isa())]


def sae_loss(x, W_enc, b_enc, W_dec, b_dec, k, backend):
    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k, pre_bias=b_dec, backend=backend)
    reconstruction = interpkernels.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
    return (reconstruction - x).square().sum() / x.square().sum()


@pytest.mark.slow
@pytest.mark.parametrize("target", COMPILE_TARGETS, ids=str)
@pytest.mark.parametrize("dynamic", [False, True])
def test_sae_step_compiles_without_graph_breaks(dynamic, target):
    torch._dynamo.reset()
    d, M, k = 16, 96, 5
    params = target.put(torch.randn(M, d) / 4, torch.randn(M) / 10, torch.randn(M, d) / 4, torch.randn(d) / 10)
    loss_on_target = functools.partial(sae_loss, backend=target.backend)
    compiled = torch.compile(loss_on_target, fullgraph=True, dynamic=dynamic)
    for batch in target.put(torch.randn(2, 7, d), torch.randn(3, 5, d)):
        results = []
        for fn in (loss_on_target, compiled):
            leaves = [p.clone().requires_grad_() for p in params]
            loss = fn(batch, leaves[0], leaves[1], leaves[2], leaves[3], k)
            loss.backward()
            results.append([loss.detach(), *(leaf.grad for leaf in leaves)])
        for eager, compiled_result in zip(*results):
            torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_topk_sae_module_with_auxk_compiles_without_graph_breaks():
    """The module path: encode, decode, the FVU op, AuxK with a dead mask, backward."""
    from interpkernels.nn import TopKSAE

    torch._dynamo.reset()
    module = TopKSAE(12, 64, 4, k_aux=6, seed=0)
    x = torch.randn(40, 12)
    dead = torch.arange(64) % 3 == 0

    def loss(x, dead):
        out = module(x, dead_mask=dead)
        return out.fvu + out.auxk_loss

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        module.zero_grad()
        value = fn(x, dead)
        value.backward()
        results.append([value.detach(), *(p.grad.clone() for p in module.parameters())])
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6)
