"""interpkernels.attribution against float64 oracles written with dense autograd.

Node oracle: at every site the code is built densely from the reference
encoder (``[N, M]``), decoded by a matmul, the error added as a leaf; the node
scores are ``(F_p - F_c) * dm/dF`` and ``(eps_p - eps_c) . dm/deps``. By
default the site's real output receives its reconstruction's gradient, as
feature-circuits' ``_pe_attrib`` does (saprmarks/feature-circuits,
attribution.py: ``x_recon = x_hat + residual; ...; x.grad = x_recon.grad``),
written here as an autograd Function that hands x_recon's gradient to x;
with ``gradient="through_coders"`` the code is differentiable in the site's
input and nothing else reaches it.
IG oracle: the explicit S-step loop over interpolated dense codes.
Edge oracle: the gradient at zero of an edge mask (auto-circuit's EAP), on a
model written out block by block.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interpkernels import reference
from interpkernels.attribution import attribute
from interpkernels.nn import TopKSAE, Transcoder

D, M, K, VOCAB, T = 12, 40, 4, 23, 7


class MixingBlock(nn.Module):
    """A residual block with an MLP and a causal running mean across tokens."""

    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        positions = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return x + self.mlp(x) + self.mix(x.cumsum(1) / positions)


class ToyModel(nn.Module):
    def __init__(self, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(MixingBlock(D) for _ in range(layers))
        self.unembed = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def logit_difference(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def make_sae(seed: int, d: int = D) -> TopKSAE:
    sae = TopKSAE(d, M, K, seed=seed).double()
    with torch.no_grad():  # away from the tied initialisation, so encoder and decoder differ
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# The dense oracle.


def dense_code(coder, x):
    pre_bias = None if isinstance(coder, Transcoder) else coder.b_dec
    values, indices = reference.topk_encode(x, coder.W_enc, coder.b_enc, coder.k, pre_bias=pre_bias)
    return reference.densify(values, indices, coder.num_latents)


class GradientToOutput(torch.autograd.Function):
    """feature-circuits' ``x.grad = x_recon.grad``: the value of x_recon, whose
    gradient also goes to the submodule's real output x."""

    @staticmethod
    def forward(ctx, x, x_recon):
        return x_recon.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def dense_site(coder, args, output):
    """(dense code F, error) at a site; F differentiable in the site's input."""
    read = args[0] if isinstance(coder, Transcoder) else output
    F = dense_code(coder, read)
    return F, (output - F @ coder.W_dec - coder.b_dec).detach()


def run_with(model, sites, inputs, site_fn):
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda module, args, output, name=name: site_fn(name, sites[name], args, output)) for name in sites]
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(inputs)
    finally:
        for handle in handles:
            handle.remove()


def first(output):
    return output[0] if isinstance(output, tuple) else output


def with_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def dense_oracle(model, sites, clean, patched, metric, *, ig_site=None, alpha=0.0, gradient="straight_through"):
    """Per site: (F_p - F_c, dm/dF, eps_p - eps_c, dm/deps). With ig_site, that
    site's code and error are the interpolations at alpha (the others spliced)."""
    recorded = {}

    def record(name, coder, args, output):
        recorded[name] = dense_site(coder, args, first(output))

    with torch.no_grad():
        run_with(model, sites, patched, record)
    clean_sites = {}

    def record_clean(name, coder, args, output):
        clean_sites[name] = dense_site(coder, args, first(output))

    with torch.no_grad():
        run_with(model, sites, clean, record_clean)
    leaves = {}

    def splice(name, coder, args, output):
        if name == ig_site:
            (F_c, eps_c), (F_p, eps_p) = clean_sites[name], recorded[name]
            F = (F_c + alpha * (F_p - F_c)).requires_grad_()
            eps = (eps_c + alpha * (eps_p - eps_c)).requires_grad_()
        elif gradient == "straight_through":
            x = first(output)
            F, eps = dense_site(coder, (args[0].detach(),), x.detach())
            F.requires_grad_()
            eps.requires_grad_()
            leaves[name] = (F, eps)
            return with_first(output, GradientToOutput.apply(x, F @ coder.W_dec + coder.b_dec + eps))
        else:
            F, eps = dense_site(coder, args, first(output))
            eps.requires_grad_()
        leaves[name] = (F, eps)
        return with_first(output, F @ coder.W_dec + coder.b_dec + eps)

    value = metric(run_with(model, sites, clean, splice)).sum()
    names = list(sites)
    grads = torch.autograd.grad(value, [leaves[n][0] for n in names] + [leaves[n][1] for n in names],
                                allow_unused=True, materialize_grads=True)
    out = {}
    for i, name in enumerate(names):
        (F_c, eps_c), (F_p, eps_p) = clean_sites[name], recorded[name]
        out[name] = (F_p - F_c, grads[i], eps_p - eps_c, grads[len(names) + i])
    return out


def check_nodes(result, oracle, atol=1e-10):
    for name, (dF, gF, deps, geps) in oracle.items():
        scores = result.nodes[name]
        expected = dF * gF
        assert scores.latents.is_sparse
        torch.testing.assert_close(scores.latents.to_dense().to(expected.dtype), expected, atol=atol, rtol=1e-8)
        torch.testing.assert_close(scores.error.to(geps.dtype), (deps * geps).sum(-1), atol=atol, rtol=1e-8)
        assert expected.abs().max() > 1e-6  # a test that could not fail otherwise


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = ToyModel().double()
    sites = {"blocks.0": make_sae(1), "blocks.1.mlp": Transcoder(D, M, K, d_out=D, seed=2).double(),
             "blocks.2": make_sae(3)}
    with torch.no_grad():
        sites["blocks.1.mlp"].W_dec.mul_(0.5)
    return model, sites


@pytest.mark.parametrize("gradient", ["straight_through", "through_coders"])
def test_atp_nodes_match_dense_autograd(toy, gradient):
    model, sites = toy
    clean, patched = tokens(seed=1), tokens(seed=2)
    result = attribute(model, sites, clean, patched, logit_difference, gradient=gradient)
    check_nodes(result, dense_oracle(model, sites, clean, patched, logit_difference, gradient=gradient))
    assert not any(m._forward_hooks for m in model.modules())
    # The scores estimate the metric's change; the attribute's own metric values are the model's.
    with torch.no_grad():
        assert result.metric_clean == pytest.approx(float(logit_difference(model(clean)).sum()), rel=1e-9)
        assert result.metric_patched == pytest.approx(float(logit_difference(model(patched)).sum()), rel=1e-9)


def test_reductions_sum_the_per_token_scores(toy):
    model, sites = toy
    clean, patched = tokens(seed=1), tokens(seed=2)
    per_token = attribute(model, sites, clean, patched, logit_difference)
    summed = attribute(model, sites, clean, patched, logit_difference, reduce="sum")
    mean_abs = attribute(model, sites, clean, patched, logit_difference, reduce="mean_abs")
    for name in sites:
        dense = per_token.nodes[name].latents.to_dense()
        torch.testing.assert_close(summed.nodes[name].latents, dense.sum((0, 1)).to(summed.nodes[name].latents.dtype))
        torch.testing.assert_close(mean_abs.nodes[name].latents,
                                   dense.abs().mean((0, 1)).to(mean_abs.nodes[name].latents.dtype))
        torch.testing.assert_close(summed.nodes[name].error, per_token.nodes[name].error.sum())
    top = summed.top_latents("blocks.2", 3)
    assert abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1]) > 0


def test_ig_matches_the_explicit_step_loop(toy):
    model, sites = toy
    clean, patched = tokens(seed=1), tokens(seed=2)
    steps = 3
    result = attribute(model, sites, clean, patched, logit_difference, method="ig", steps=steps)
    for name in sites:
        latents = errors = 0
        for step in range(steps):
            dF, gF, deps, geps = dense_oracle(model, sites, clean, patched, logit_difference, ig_site=name,
                                              alpha=step / steps)[name]
            latents = latents + dF * gF / steps
            errors = errors + (deps * geps).sum(-1) / steps
        torch.testing.assert_close(result.nodes[name].latents.to_dense(), latents, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(result.nodes[name].error, errors, atol=1e-10, rtol=1e-8)
    # With one step IG is AtP.
    atp = attribute(model, sites, clean, patched, logit_difference)
    ig1 = attribute(model, sites, clean, patched, logit_difference, method="ig", steps=1)
    for name in sites:
        torch.testing.assert_close(ig1.nodes[name].latents.to_dense(), atp.nodes[name].latents.to_dense())


def edge_mask_oracle(model, saes, clean, patched, metric, dst_latents):
    """Edges blocks.0 -> blocks.1 as d metric / d mask at mask = 0, where the
    mask lets source latent j (or the source error) take its patched value on
    the path into destination latent b only (EAP as feature-circuits computes
    it: the metric's gradient crosses the later site blocks.2 straight
    through). Written out block by block."""
    src, dst = saes["blocks.0"], saes["blocks.1"]
    blocks = model.blocks

    def codes(inputs):
        x0 = model.embed(inputs)
        x1 = blocks[0](x0)
        F0, eps0 = dense_site(src, (x0,), x1)
        return F0, eps0

    with torch.no_grad():
        F0_p, eps0_p = codes(patched)
    F0, eps0 = codes(clean)
    F0, eps0 = F0.detach(), eps0.detach()
    x1 = F0 @ src.W_dec + src.b_dec + eps0
    rows, error_rows = [], []
    for b in dst_latents.tolist():
        mask = torch.zeros(M, dtype=torch.float64, requires_grad=True)
        error_mask = torch.zeros((), dtype=torch.float64, requires_grad=True)
        x1_masked = x1 + (mask * (F0_p - F0)) @ src.W_dec + error_mask * (eps0_p - eps0)
        F1, eps1 = dense_site(dst, None, blocks[1](x1))
        F1_masked, _ = dense_site(dst, None, blocks[1](x1_masked))
        only_b = torch.zeros(M, dtype=torch.float64)
        only_b[b] = 1
        F1 = F1 + only_b * (F1_masked - F1)
        x2 = F1 @ dst.W_dec + dst.b_dec + eps1
        # The last site's spliced output is x3 in value, and its gradient goes straight to x3.
        logits = model.unembed(blocks[2](x2))
        grads = torch.autograd.grad(metric(logits).sum(), [mask, error_mask])
        rows.append(grads[0])
        error_rows.append(grads[1])
    return torch.stack(rows), torch.stack(error_rows)


def test_full_edges_equal_the_edge_mask_gradient():
    torch.manual_seed(0)
    model = ToyModel().double()
    saes = {f"blocks.{i}": make_sae(10 + i) for i in range(3)}
    clean, patched = tokens(seed=3), tokens(seed=4)
    result = attribute(model, saes, clean, patched, logit_difference, edges="full", edge_features=None,
                       edge_batch_size=5)
    edges = result.edges[("blocks.0", "blocks.1")]
    assert len(edges.dst_latents) > 5  # several batches of destinations
    expected, expected_error = edge_mask_oracle(model, saes, clean, patched, logit_difference, edges.dst_latents)
    torch.testing.assert_close(edges.latents.to_dense(), expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(edges.error, expected_error, atol=1e-10, rtol=1e-8)
    assert expected.abs().max() > 1e-6
    # edge_features keeps the destinations with the largest |node score|.
    top = attribute(model, saes, clean, patched, logit_difference, edges="full", edge_features=3)
    chosen = top.edges[("blocks.0", "blocks.1")].dst_latents
    node_totals = result.nodes["blocks.1"].latents.to_dense().sum((0, 1)).abs()
    assert set(chosen.tolist()) <= set(edges.dst_latents.tolist())
    assert node_totals[chosen].min() >= node_totals[edges.dst_latents].sort(descending=True).values[2]


class IdentityBetween(nn.Module):
    """Two residual sites with nothing but the residual between them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.block = MixingBlock(D)
        self.same = nn.Identity()
        self.unembed = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        return self.unembed(torch.tanh(self.same(self.block(self.embed(tokens)))))


def test_direct_edges_are_the_full_edges_across_a_pure_residual_path():
    torch.manual_seed(0)
    model = IdentityBetween().double()
    saes = {"block": make_sae(20), "same": make_sae(21)}
    clean, patched = tokens(seed=5), tokens(seed=6)
    full = attribute(model, saes, clean, patched, logit_difference, edges="full", edge_features=None)
    direct = attribute(model, saes, clean, patched, logit_difference, edges="direct")
    full_edges, direct_edges = full.edges[("block", "same")], direct.edges[("block", "same")]
    per_token = direct_edges.latents.to_dense()
    assert per_token.shape == (3, T, M, M)
    summed = per_token.sum((0, 1))[full_edges.dst_latents]
    torch.testing.assert_close(summed.to(torch.float64), full_edges.latents.to_dense(), atol=1e-10, rtol=1e-8)
    pruned = attribute(model, saes, clean, patched, logit_difference, edges="direct", top_k=2)
    kept = pruned.edges[("block", "same")].latents.coalesce()
    assert (kept.indices()[:3].T.unique(dim=0, return_counts=True)[1] <= 2).all()


def hooked_edge_mask_oracle(model, sites, clean, patched, metric, src_name, dst_name, dst_latents):
    """Edges src -> dst for any hooked model: d/dmask of sum_n dm/dF_dst[n, b] * F_dst[n, b]
    where the mask scales the source's patched-minus-clean code (and error) added
    at the source site; dm/dF_dst from :func:`dense_oracle` (the product rule
    splits the edge mask's derivative at zero into these two factors)."""
    gF_dst = dense_oracle(model, sites, clean, patched, metric)[dst_name][1]
    dF_src, _, deps_src, _ = dense_oracle(model, sites, clean, patched, metric)[src_name]
    mask = torch.zeros(M, dtype=torch.float64, requires_grad=True)
    error_mask = torch.zeros((), dtype=torch.float64, requires_grad=True)
    captured = {}

    def splice(name, coder, args, output):
        F, eps = dense_site(coder, args, first(output))
        x = F @ coder.W_dec + coder.b_dec + eps
        if name == src_name:
            x = x + (mask * dF_src) @ coder.W_dec + error_mask * deps_src
        captured[name] = F
        return with_first(output, x)

    run_with(model, sites, clean, splice)
    rows, error_rows = [], []
    for b in dst_latents.tolist():
        target = (gF_dst[..., b] * captured[dst_name][..., b]).sum()
        grads = torch.autograd.grad(target, [mask, error_mask], retain_graph=True)
        rows.append(grads[0])
        error_rows.append(grads[1])
    return torch.stack(rows), torch.stack(error_rows)


# ---------------------------------------------------------------------------
# Real model classes, built from tiny random configs (nothing downloaded).


def test_gpt2_atp_ig_and_edges_match_dense_autograd():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    sites = {"transformer.h.0": make_sae(30, 16), "transformer.h.1": make_sae(31, 16)}
    clean, patched = {"input_ids": tokens(2, seed=7)}, {"input_ids": tokens(2, seed=8)}

    def metric(output):
        return logit_difference(output.logits)

    result = attribute(model, sites, clean, patched, metric, edges="full", edge_features=None, edge_batch_size=4)
    check_nodes(result, dense_oracle(model, sites, clean, patched, metric))
    edges = result.edges[("transformer.h.0", "transformer.h.1")]
    expected, expected_error = hooked_edge_mask_oracle(model, sites, clean, patched, metric, "transformer.h.0",
                                                       "transformer.h.1", edges.dst_latents)
    torch.testing.assert_close(edges.latents.to_dense(), expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(edges.error, expected_error, atol=1e-10, rtol=1e-8)
    assert len(edges.dst_latents) > 4 and expected.abs().max() > 1e-6  # two batches of destinations
    ig = attribute(model, sites, clean, patched, metric, method="ig", steps=2)
    name = "transformer.h.0"
    expected = sum(dF * gF / 2 for dF, gF, _, _ in
                   (dense_oracle(model, sites, clean, patched, metric, ig_site=name, alpha=a)[name] for a in (0, .5)))
    torch.testing.assert_close(ig.nodes[name].latents.to_dense(), expected, atol=1e-10, rtol=1e-8)


def test_transformer_lens_atp_and_edges_match_dense_autograd():
    lens = pytest.importorskip("transformer_lens")
    config = lens.HookedTransformerConfig(n_layers=2, d_model=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=VOCAB,
                                          n_ctx=16, act_fn="gelu", dtype=torch.float64, seed=0)
    model = lens.HookedTransformer(config).eval()
    sites = {"blocks.0.hook_resid_post": make_sae(40, 16), "blocks.1.hook_resid_mid": make_sae(41, 16)}
    clean, patched = tokens(2, seed=9), tokens(2, seed=10)
    result = attribute(model, sites, clean, patched, logit_difference, edges="full")
    check_nodes(result, dense_oracle(model, sites, clean, patched, logit_difference))
    edges = result.edges[("blocks.0.hook_resid_post", "blocks.1.hook_resid_mid")]
    expected, expected_error = hooked_edge_mask_oracle(model, sites, clean, patched, logit_difference,
                                                       "blocks.0.hook_resid_post", "blocks.1.hook_resid_mid",
                                                       edges.dst_latents)
    torch.testing.assert_close(edges.latents.to_dense(), expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(edges.error, expected_error, atol=1e-10, rtol=1e-8)
    assert expected.abs().max() > 1e-6


# ---------------------------------------------------------------------------
# Bad input.


def test_bad_input_names_the_argument(toy):
    model, sites = toy
    clean, patched = tokens(seed=1), tokens(seed=2)
    with pytest.raises(KeyError, match="blocks.9"):
        attribute(model, {"blocks.9": sites["blocks.0"]}, clean, patched, logit_difference)
    with pytest.raises(ValueError, match="patched"):
        attribute(model, sites, clean, tokens(batch=2, seed=2), logit_difference)
    with pytest.raises(ValueError, match=r"sites\['blocks.0'\].*width"):
        attribute(model, {"blocks.0": make_sae(5, d=D + 1)}, clean, patched, logit_difference)
    with pytest.raises(ValueError, match="method"):
        attribute(model, sites, clean, patched, logit_difference, method="eap")
    with pytest.raises(ValueError, match="steps"):
        attribute(model, sites, clean, patched, logit_difference, method="ig", steps=0)
    with pytest.raises(ValueError, match="reduce"):
        attribute(model, sites, clean, patched, logit_difference, reduce="max")
    with pytest.raises(ValueError, match="edges"):
        attribute(model, sites, clean, patched, logit_difference, edges="all")
    with pytest.raises(ValueError, match="gradient"):
        attribute(model, sites, clean, patched, logit_difference, gradient="through")
    with pytest.raises(TypeError, match="sites"):
        attribute(model, {"blocks.0": nn.Linear(D, D)}, clean, patched, logit_difference)
    with pytest.raises(TypeError, match="metric"):
        attribute(model, sites, clean, patched, lambda logits: 1.0)
    model.unused = nn.Identity()
    with pytest.raises(ValueError, match="never ran"):
        attribute(model, {"blocks.0": sites["blocks.0"], "unused": sites["blocks.2"]}, clean, patched,
                  logit_difference)


def test_hooks_are_removed_when_the_metric_fails(toy):
    model, sites = toy

    def failing(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribute(model, sites, tokens(seed=1), tokens(seed=2), failing)
    assert not any(m._forward_hooks for m in model.modules())


def test_an_accelerated_sparsify_coder_is_a_site():
    """A peer SAE through its public adapter: the same scores as interpkernels' TopKSAE holding its weights."""
    sparsify = pytest.importorskip("sparsify")
    from interpkernels.integrations import sparsify as adapter

    torch.manual_seed(0)
    model = ToyModel().double()
    peer = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=M, k=K), device="cpu",
                                dtype=torch.float64)
    ours = make_sae(50)
    with torch.no_grad():
        peer.encoder.weight.copy_(ours.W_enc)
        peer.encoder.bias.copy_(ours.b_enc)
        peer.W_dec.copy_(ours.W_dec)
        peer.b_dec.copy_(ours.b_dec)
    clean, patched = tokens(seed=11), tokens(seed=12)
    expected = attribute(model, {"blocks.1": ours}, clean, patched, logit_difference, edges=None)
    got = attribute(model, {"blocks.1": adapter.accelerate(peer)}, clean, patched, logit_difference)
    torch.testing.assert_close(got.nodes["blocks.1"].latents.to_dense(), expected.nodes["blocks.1"].latents.to_dense())
    torch.testing.assert_close(got.nodes["blocks.1"].error, expected.nodes["blocks.1"].error)
    assert expected.nodes["blocks.1"].latents.to_dense().abs().max() > 1e-6
