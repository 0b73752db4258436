"""interpkernels.evaluation against a hand computation of SAELens' definitions.

The oracle (``hand_evaluation``) follows the definitions as SAELens writes
them (decoderesearch/SAELens, sae_lens/evals.py): ``get_recons_loss`` splices
``sae.decode(sae.encode(x))`` (no error term) or zeros at the hook and takes
the per-token next-token cross-entropy; ``_kl`` is
``kl_div(log_softmax(new), softmax(original)).sum(-1)``, i.e. KL(original || new)
summed over the vocabulary, averaged over tokens; ``ce_loss_score`` is
``(L_ablation - L_sae) / (L_ablation - L_clean)``;
``ExplainedVarianceCalculator`` is ``1 - E||x - x_hat||^2 / Var(x)`` with the
mean over all evaluated tokens; ``l0`` counts ``acts != 0`` per token;
``feature_density`` is the share of tokens a latent fires on (dead: 0). It
builds every code densely from the coders' formulas (TopK: Gao et al. 2024;
BatchTopK: Bussmann et al. 2024; JumpReLU: Rajamanoharan et al. 2024; a
transcoder reads the MLP input; a cross-layer transcoder writes each source
layer's code to every later layer) and concatenates all tokens of all batches
before reducing, so running sums are checked too.

SAELens' own ``run_evals`` is then run on a tiny random HookedTransformer with
a SAELens TopKSAE holding the same weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interpkernels.evaluation import SiteReport, evaluate
from interpkernels.nn import BatchTopKSAE, CrossLayerTranscoder, JumpReLUSAE, TopKSAE, Transcoder

D, M, K, VOCAB, T = 12, 40, 4, 23, 9


class CausalBlock(nn.Module):
    """An MLP and a causal running mean over the tokens (the model never looks ahead)."""

    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.mlp(x)
        positions = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return x + self.mix(x.cumsum(1) / positions)


class TinyCausalLM(nn.Module):
    def __init__(self, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(CausalBlock(D) for _ in range(layers))
        self.unembed = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):  # causal: padding at the end cannot reach real tokens
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCausalLM().double().eval()


def token_batches(sizes=(3, 2), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (size, T), generator=generator) for size in sizes]


def perturb_(coder, seed, dead_latents=5):
    """Away from the tied initialisation; a few latents that can never fire, and
    negative biases so some rows have fewer than k positive pre-activations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in coder.named_parameters():
            if name.startswith(("W_enc", "b_enc", "b_dec", "W_skip")):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        for b_enc in (coder.b_enc if isinstance(coder.b_enc, nn.ParameterList) else [coder.b_enc]):
            b_enc.sub_(1.5)
            b_enc[:dead_latents] = -1e3
    return coder


# ---------------------------------------------------------------------------
# Dense codes from the papers' formulas.


def keep_largest(pre, count, dims):
    """pre with all but its `count` largest entries over `dims` set to 0."""
    flat = pre.flatten(-dims)
    top = flat.topk(count, dim=-1)
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)


def dense_code(coder, x):
    """[n, M] code of the rows x."""
    if isinstance(coder, Transcoder):
        pre = torch.relu(x @ coder.W_enc.T + coder.b_enc)  # no pre-bias: input and output differ
    else:
        pre = torch.relu((x - coder.b_dec) @ coder.W_enc.T + coder.b_enc)
    if isinstance(coder, BatchTopKSAE):  # the n*k largest over the batch
        return keep_largest(pre, x.shape[0] * coder.k, 2)
    if isinstance(coder, JumpReLUSAE):  # pre * 1[pre > threshold] (k = M: no cap)
        return pre * (pre > coder.log_threshold.exp())
    return keep_largest(pre, coder.k, 1)


def dense_reconstruction(coder, x):
    code = dense_code(coder, x)
    x_hat = code @ coder.W_dec + coder.b_dec
    if isinstance(coder, Transcoder) and coder.W_skip is not None:
        x_hat = x_hat + x @ coder.W_skip.T
    return x_hat, code


# ---------------------------------------------------------------------------
# The hand computation.


def capture(model, name, batch, reads_input):
    seen = {}

    def hook(module, args, output):
        seen["read"], seen["written"] = (args[0] if reads_input else output), output

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        logits = model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        handle.remove()
    return logits, seen["read"], seen["written"]


def run_replacing(model, replacements, batch):
    """The model with submodule name's output replaced by replacements[name](input, output)."""
    handles = [model.get_submodule(name).register_forward_hook(lambda m, a, o, f=f: f(a[0], o))
               for name, f in replacements.items()]
    try:
        return model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for handle in handles:
            handle.remove()


def predicted_ce(logits, ids, mask):
    """Per-position cross-entropy of token t+1, where t and t+1 are real tokens."""
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce[(mask[:, :-1] & mask[:, 1:]).reshape(-1)]


def kl_per_token(clean_logits, new_logits, mask):
    p = clean_logits.softmax(-1)
    return (p * (clean_logits.log_softmax(-1) - new_logits.log_softmax(-1))).sum(-1)[mask]


def hand_evaluation(model, name, coder, batches, reads_input=False):
    """SAELens' definitions over all tokens of all batches, concatenated."""
    ce = {"clean": [], "spliced": [], "zero": []}
    kl = {"spliced": [], "zero": []}
    xs, x_hats, codes = [], [], []
    for batch in batches:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        mask = batch["attention_mask"].bool() if isinstance(batch, dict) else torch.ones_like(ids, dtype=torch.bool)
        clean_logits, read, written = capture(model, name, batch, reads_input)
        x_hat, code = dense_reconstruction(coder, read[mask])

        def splice(_, output, x_hat=x_hat, mask=mask):
            output = output.clone()
            output[mask] = x_hat
            return output

        spliced_logits = run_replacing(model, {name: splice}, batch)
        zero_logits = run_replacing(model, {name: lambda _, output: torch.zeros_like(output)}, batch)
        for kind, logits in (("clean", clean_logits), ("spliced", spliced_logits), ("zero", zero_logits)):
            ce[kind].append(predicted_ce(logits, ids, mask))
        kl["spliced"].append(kl_per_token(clean_logits, spliced_logits, mask))
        kl["zero"].append(kl_per_token(clean_logits, zero_logits, mask))
        xs.append(written[mask])
        x_hats.append(x_hat)
        codes.append(code)
    return metrics_from(ce, kl, torch.cat(xs), torch.cat(x_hats), torch.cat(codes))


def metrics_from(ce, kl, x, x_hat, code):
    loss = {kind: torch.cat(values).mean().item() for kind, values in ce.items()}
    fvu = ((x_hat - x).square().sum() / (x - x.mean(0)).square().sum()).item()
    return dict(
        loss_clean=loss["clean"], loss_spliced=loss["spliced"], loss_zero_ablation=loss["zero"],
        loss_recovered=(loss["zero"] - loss["spliced"]) / (loss["zero"] - loss["clean"]),
        kl_div=torch.cat(kl["spliced"]).mean().item(), kl_div_zero_ablation=torch.cat(kl["zero"]).mean().item(),
        fvu=fvu, explained_variance=1 - fvu, l0=(code != 0).sum(-1).double().mean().item(),
        dead_fraction=(~(code != 0).any(0)).double().mean().item(), tokens=x.shape[0])


def assert_report_matches(report: SiteReport, expected: dict, rel=1e-9):
    for field, value in expected.items():
        assert getattr(report, field) == pytest.approx(value, rel=rel, abs=1e-12), field


def make_coder(kind, seed=3):
    if kind == "topk":
        return perturb_(TopKSAE(D, M, K, seed=seed).double(), seed)
    if kind == "batch_topk":
        return perturb_(BatchTopKSAE(D, M, K, max_per_row=M, seed=seed).double(), seed)
    if kind == "jumprelu":
        return perturb_(JumpReLUSAE(D, M, M, initial_threshold=0.2, seed=seed).double(), seed)
    if kind == "transcoder":
        return perturb_(Transcoder(D, M, K, skip=True, seed=seed).double(), seed)
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# Against the hand computation.


@pytest.mark.parametrize("kind, site", [("topk", "blocks.1"), ("batch_topk", "blocks.1"), ("jumprelu", "blocks.0"),
                                        ("transcoder", "blocks.1.mlp")])
def test_every_field_matches_the_hand_computation(model, kind, site):
    coder = make_coder(kind)
    batches = token_batches()
    report = evaluate(model, {site: coder}, batches, progress=False)[site]
    expected = hand_evaluation(model, site, coder, batches, reads_input=kind == "transcoder")
    assert_report_matches(report, expected)
    # Not a vacuous case: the coder changes the model, fires unevenly, and some latents die.
    assert 0 < report.kl_div and report.loss_spliced != report.loss_clean
    assert 0 < report.dead_fraction < 1 and report.fired.shape == (M,)
    if kind == "topk":
        assert report.l0 < K  # zero-valued slots are not counted


def test_sites_are_spliced_alone(model):
    """Two sites in one call report what each reports alone (the other not spliced)."""
    first, second = make_coder("topk", seed=3), make_coder("transcoder", seed=4)
    batches = token_batches()
    both = evaluate(model, {"blocks.0": first, "blocks.2.mlp": second}, batches, progress=False)
    assert_report_matches(both["blocks.0"], hand_evaluation(model, "blocks.0", first, batches))
    assert_report_matches(both["blocks.2.mlp"], hand_evaluation(model, "blocks.2.mlp", second, batches,
                                                                reads_input=True))


def test_padding_is_not_evaluated(model):
    """A right-padded batch reports what its sequences report unpadded, one by one."""
    coder = make_coder("topk")
    lengths = [T, 5, 3]
    ids = torch.randint(0, VOCAB, (len(lengths), T), generator=torch.Generator().manual_seed(7))
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    padded = evaluate(model, {"blocks.1": coder}, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    one_by_one = evaluate(model, {"blocks.1": coder}, [row[None, :n] for row, n in zip(ids, lengths)],
                          progress=False)
    expected = {field: getattr(one_by_one["blocks.1"], field) for field in
                ("loss_clean", "loss_spliced", "loss_zero_ablation", "loss_recovered", "kl_div",
                 "kl_div_zero_ablation", "fvu", "l0", "dead_fraction", "tokens")}
    assert_report_matches(padded["blocks.1"], expected)
    assert padded["blocks.1"].tokens == sum(lengths)


def test_a_padded_batch_of_a_hugging_face_gpt2():
    """A random GPT-2 from transformers (output .logits, dict batches): padded = unpadded one by one."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=2, n_head=2)).double().eval()
    coder = make_coder("topk")
    lengths = [T, 5, 3]
    ids = torch.randint(0, VOCAB, (len(lengths), T), generator=torch.Generator().manual_seed(9))
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    padded = evaluate(gpt2, {"transformer.h.0": coder}, [{"input_ids": ids, "attention_mask": mask}],
                      progress=False)["transformer.h.0"]
    one_by_one = evaluate(gpt2, {"transformer.h.0": coder}, [{"input_ids": row[None, :n]} for row, n in
                                                             zip(ids, lengths)], progress=False)["transformer.h.0"]
    assert_report_matches(padded, {field: getattr(one_by_one, field) for field in
                                   ("loss_clean", "loss_spliced", "loss_zero_ablation", "kl_div", "fvu", "l0",
                                    "dead_fraction", "tokens")})
    assert padded.kl_div > 0


def test_padding_does_not_compete_in_the_batch_top_k(model):
    """BatchTopK keeps the n*k largest over the batch's real tokens only."""
    coder = make_coder("batch_topk")
    ids = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(8))
    mask = (torch.arange(T) < torch.tensor([T, 4, 6])[:, None]).long()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    assert_report_matches(evaluate(model, {"blocks.1": coder}, batches, progress=False)["blocks.1"],
                          hand_evaluation(model, "blocks.1", coder, batches))


# ---------------------------------------------------------------------------
# The cross-layer transcoder: one replacement model.


def hand_replacement_model(model, clt, names, batches):
    """Every MLP replaced at once; layer l's code read from the input the replaced pass
    gives it and written to layers l..L-1. fvu / l0 / dead on the clean run, all layers together."""
    ce = {"clean": [], "spliced": [], "zero": []}
    kl = {"spliced": [], "zero": []}
    errors = variances = 0.0
    codes = []
    for ids in batches:
        mask = torch.ones_like(ids, dtype=torch.bool)
        pending = [0.0] * len(names)

        def replace(layer, mlp_input, _):
            pre = torch.relu(mlp_input @ clt.W_enc[layer].T + clt.b_enc[layer])
            code = keep_largest(pre, clt.config["k"], 1)
            for offset in range(len(names) - layer):
                pending[layer + offset] = pending[layer + offset] + code @ clt.W_dec[layer][:, offset]
            return pending[layer] + clt.b_dec[layer]

        clean_logits = model(ids)
        spliced_logits = run_replacing(model, {name: lambda i, o, layer=layer: replace(layer, i, o)
                                               for layer, name in enumerate(names)}, ids)
        zero_logits = run_replacing(model, {name: lambda _, o: torch.zeros_like(o) for name in names}, ids)
        for kind, logits in (("clean", clean_logits), ("spliced", spliced_logits), ("zero", zero_logits)):
            ce[kind].append(predicted_ce(logits, ids, mask))
        kl["spliced"].append(kl_per_token(clean_logits, spliced_logits, mask))
        kl["zero"].append(kl_per_token(clean_logits, zero_logits, mask))
        inputs = [capture(model, name, ids, True)[1].reshape(-1, D) for name in names]
        targets = [capture(model, name, ids, False)[2].reshape(-1, D) for name in names]
        codes.append(torch.stack([keep_largest(torch.relu(x @ clt.W_enc[layer].T + clt.b_enc[layer]),
                                               clt.config["k"], 1) for layer, x in enumerate(inputs)]))
        clean = clt(inputs, targets)
        errors += sum((x_hat - y).square().sum() for x_hat, y in zip(clean.reconstruction, targets))
    all_targets = [torch.cat([capture(model, name, ids, False)[2].reshape(-1, D) for ids in batches])
                   for name in names]
    variances = sum((y - y.mean(0)).square().sum() for y in all_targets)
    code = torch.cat(codes, dim=1)  # [L, tokens, M]
    expected = metrics_from(ce, kl, torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, M))
    fvu = (errors / variances).item()
    expected.update(fvu=fvu, explained_variance=1 - fvu, l0=(code != 0).sum(-1).double().mean().item(),
                    dead_fraction=(~(code != 0).any(1)).double().mean().item(), tokens=code.shape[1])
    return expected


def test_cross_layer_transcoder_is_one_replacement_model(model):
    names = ("blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp")
    clt = perturb_(CrossLayerTranscoder(3, D, M, K, seed=5).double(), 5)
    batches = token_batches()
    report = evaluate(model, {names: clt}, batches, progress=False)[names]
    assert_report_matches(report, hand_replacement_model(model, clt, names, batches))
    assert report.fired.shape == (3, M) and 0 < report.dead_fraction < 1


def test_an_sae_and_a_cross_layer_transcoder_on_one_mlp(model):
    """The SAE reads the MLP's output although the transcoder reads its input."""
    names = ("blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp")
    clt = perturb_(CrossLayerTranscoder(3, D, M, K, seed=5).double(), 5)
    sae = make_coder("topk")
    batches = token_batches()
    both = evaluate(model, {names: clt, "blocks.1.mlp": sae}, batches, progress=False)
    assert_report_matches(both["blocks.1.mlp"], hand_evaluation(model, "blocks.1.mlp", sae, batches))


def test_cross_layer_transcoder_fvu_is_its_training_fvu(model):
    """One batch: fvu is CrossLayerTranscoder.forward's on the clean activations."""
    names = ("blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp")
    clt = perturb_(CrossLayerTranscoder(3, D, M, K, seed=5).double(), 5)
    ids = token_batches(sizes=(4,))[0]
    inputs = [capture(model, name, ids, True)[1] for name in names]
    targets = [capture(model, name, ids, False)[2] for name in names]
    expected = clt(inputs, targets)
    report = evaluate(model, {names: clt}, [ids], progress=False)[names]
    assert report.fvu == pytest.approx(expected.fvu.item(), rel=1e-6)  # forward sums in float32
    assert report.l0 == pytest.approx(expected.l0.item(), rel=1e-6)  # a float32 mean


# ---------------------------------------------------------------------------
# Peers' SAEs through the adapters: the same numbers as ours holding their weights.


def sparsify_coder(ours):
    sparsify = pytest.importorskip("sparsify")
    from interpkernels.integrations import sparsify as adapter

    peer = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=M, k=K), device="cpu", dtype=torch.float64)
    with torch.no_grad():
        peer.encoder.weight.copy_(ours.W_enc)
        peer.encoder.bias.copy_(ours.b_enc)
        peer.W_dec.copy_(ours.W_dec)
        peer.b_dec.copy_(ours.b_dec)
    return adapter.accelerate(peer)


def saelens_coder(ours, hook_name=None):
    sae_lens = pytest.importorskip("sae_lens")
    from interpkernels.integrations import saelens as adapter
    from sae_lens.saes.sae import SAEMetadata

    peer = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=M, k=K, rescale_acts_by_decoder_norm=False,
                                                   dtype="float64", metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        peer.W_enc.copy_(ours.W_enc.T)
        peer.b_enc.copy_(ours.b_enc)
        peer.W_dec.copy_(ours.W_dec)
        peer.b_dec.copy_(ours.b_dec)
    return adapter.accelerate(peer)


def dictionary_learning_coder(ours):
    top_k = pytest.importorskip("dictionary_learning.trainers.top_k")
    from interpkernels.integrations import dictionary_learning as adapter

    peer = top_k.AutoEncoderTopK(D, M, K).double()
    with torch.no_grad():
        peer.encoder.weight.copy_(ours.W_enc)
        peer.encoder.bias.copy_(ours.b_enc)
        peer.decoder.weight.copy_(ours.W_dec.T)
        peer.b_dec.copy_(ours.b_dec)
    return adapter.accelerate(peer)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("peer", [sparsify_coder, saelens_coder, dictionary_learning_coder],
                         ids=["sparsify", "saelens", "dictionary_learning"])
def test_peer_saes_through_the_adapters(model, peer):
    ours = make_coder("topk")
    batches = token_batches()
    expected = evaluate(model, {"blocks.1": ours}, batches, progress=False)["blocks.1"]
    got = evaluate(model, {"blocks.1": peer(ours)}, batches, progress=False)["blocks.1"]
    assert_report_matches(got, {field: getattr(expected, field) for field in
                                ("loss_spliced", "kl_div", "fvu", "l0", "dead_fraction", "tokens")})
    assert torch.equal(got.fired, expected.fired)


# ---------------------------------------------------------------------------
# Against SAELens' run_evals on a HookedTransformer.


class TokenStore:
    """What run_evals reads of an ActivationsStore: the same fixed batches on every pass."""

    def __init__(self, batches):
        self.batches, self.next = batches, 0
        self.context_size, self.store_batch_size_prompts = batches[0].shape[1], batches[0].shape[0]

    def get_batch_tokens(self, batch_size):
        batch = self.batches[self.next]
        self.next += 1
        return batch

    def reset_input_dataset(self):
        self.next = 0


BOS, SEPARATOR = 0, 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("excluded", [(), (BOS, SEPARATOR)], ids=["every-token", "special-tokens-excluded"])
def test_matches_saelens_run_evals_on_a_hooked_transformer(excluded):
    """SAELens' exclude_special_tokens=[ids] is exclude_tokens: neither spliced nor counted."""
    transformer_lens = pytest.importorskip("transformer_lens")
    pytest.importorskip("sae_lens")
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    config = transformer_lens.HookedTransformerConfig(
        n_layers=2, d_model=D, n_ctx=T, d_head=4, n_heads=3, d_mlp=2 * D, d_vocab=VOCAB, act_fn="gelu",
        normalization_type="LN", seed=0, dtype=torch.float64)
    hooked = transformer_lens.HookedTransformer(config).eval()
    site = "blocks.0.hook_resid_post"
    ours = make_coder("topk")
    batches = token_batches(sizes=(3, 3, 3))
    for batch in batches:  # a BOS in front, separators inside (also as prediction targets)
        batch[:, 0] = BOS
        batch[:, 4] = SEPARATOR
    eval_config = EvalConfig(
        n_eval_reconstruction_batches=len(batches), n_eval_sparsity_variance_batches=len(batches), compute_kl=True,
        compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True)
    metrics, features = run_evals(saelens_coder(ours, site), TokenStore(batches), hooked, ActivationScaler(),
                                  eval_config, exclude_special_tokens=list(excluded) or False)

    report = evaluate(hooked, {site: ours}, batches, exclude_tokens=excluded, progress=False)[site]
    performance, behaviour = metrics["model_performance_preservation"], metrics["model_behavior_preservation"]
    assert_report_matches(report, dict(
        loss_clean=performance["ce_loss_without_sae"], loss_spliced=performance["ce_loss_with_sae"],
        loss_zero_ablation=performance["ce_loss_with_ablation"], loss_recovered=performance["ce_loss_score"],
        kl_div=behaviour["kl_div_with_sae"], kl_div_zero_ablation=behaviour["kl_div_with_ablation"],
        explained_variance=metrics["reconstruction_quality"]["explained_variance"], l0=metrics["sparsity"]["l0"],
        dead_fraction=sum(density == 0 for density in features["feature_density"]) / M), rel=1e-7)
    assert 0 < report.dead_fraction < 1 and report.kl_div > 0
    kept = ~torch.isin(torch.cat(batches), torch.tensor(excluded, dtype=torch.long))
    assert report.tokens == kept.sum() and bool(kept.all()) == (not excluded)


# ---------------------------------------------------------------------------
# The rest of the interface.


def test_custom_loss_is_averaged_over_batches(model):
    coder = make_coder("topk")
    batches = token_batches(sizes=(3, 1, 2))

    def last_logit(logits, ids):  # any scalar of (output, batch)
        return logits[:, -1, 0].mean()

    report = evaluate(model, {"blocks.1": coder}, batches, loss_fn=last_logit, progress=False)["blocks.1"]
    expected = sum(model(ids)[:, -1, 0].mean().item() for ids in batches) / len(batches)
    assert report.loss_clean == pytest.approx(expected, rel=1e-12)
    assert report.kl_div == pytest.approx(hand_evaluation(model, "blocks.1", coder, batches)["kl_div"], rel=1e-9)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 1))

    def forward(self, x):
        return {"prediction": self.net(x)}


def test_a_model_without_logits_reports_no_kl():
    torch.manual_seed(0)
    regressor = Regressor().double()
    coder = make_coder("topk")
    batches = [torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    def loss_fn(output, x):
        return output["prediction"].square().mean()

    report = evaluate(regressor, {"net.1": coder}, batches, loss_fn=loss_fn, progress=False)["net.1"]
    assert report.tokens == 10 and math.isfinite(report.loss_recovered)
    assert report.kl_div is None and report.kl_div_zero_ablation is None


class LastTokenLogits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids)[:, -1]


def test_the_default_loss_needs_logits_per_position(model):
    with pytest.raises(ValueError, match="logits"):
        evaluate(LastTokenLogits(model), {"lm.blocks.1": make_coder("topk")}, token_batches(), progress=False)


def test_progress_lines_in_a_log(model, capsys):
    evaluate(model, {"blocks.1": make_coder("topk")}, token_batches(), progress=True)
    err = capsys.readouterr().err
    assert "evaluated 2 of 2 batches" in err and "45 tokens" in err and "\r" not in err


def test_bad_inputs_name_the_argument(model):
    coder = make_coder("topk")
    batches = token_batches()
    with pytest.raises(KeyError, match="sites"):
        evaluate(model, {"blocks.9": coder}, batches, progress=False)
    with pytest.raises(TypeError, match="sites"):
        evaluate(model, {"blocks.1": nn.Linear(D, D)}, batches, progress=False)
    with pytest.raises(TypeError, match="sites"):
        evaluate(model, {}, batches, progress=False)
    with pytest.raises(TypeError, match="model"):
        evaluate(lambda x: x, {"blocks.1": coder}, batches, progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        evaluate(model, {"blocks.1": coder}, batches, loss_fn="ce", progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        evaluate(model, {"blocks.1": coder}, [b.double() for b in batches], progress=False)
    with pytest.raises(TypeError, match="exclude_tokens"):
        evaluate(model, {"blocks.1": coder}, batches, exclude_tokens=["<bos>"], progress=False)
    with pytest.raises(TypeError, match="exclude_tokens"):
        evaluate(model, {"blocks.1": coder}, [(b,) for b in batches], exclude_tokens=[0], progress=False,
                 loss_fn=lambda logits, batch: logits.mean())
    with pytest.raises(ValueError, match="batches"):
        evaluate(model, {"blocks.1": coder}, [], progress=False)
    with pytest.raises(ValueError, match="batches"):
        evaluate(model, {"blocks.1": coder}, [{"input_ids": batches[0], "attention_mask": 0 * batches[0]}],
                 progress=False)
    clt = CrossLayerTranscoder(3, D, M, K, seed=5).double()
    with pytest.raises(ValueError, match="tuple"):
        evaluate(model, {"blocks.0.mlp": clt}, batches, progress=False)
    with pytest.raises(TypeError, match="tuple"):
        evaluate(model, {("blocks.0", "blocks.1"): coder}, batches, progress=False)
    with pytest.raises(ValueError, match="layer order"):
        evaluate(model, {("blocks.1.mlp", "blocks.0.mlp", "blocks.2.mlp"): clt}, batches, progress=False)
    with pytest.raises(ValueError, match="never ran"):
        model.unused = nn.Identity()
        evaluate(model, {"unused": coder}, batches, progress=False)
    assert not any(m._forward_hooks for m in model.modules())


def test_a_submodule_run_twice_per_pass_is_refused():
    """Its reconstruction comes from one clean activation: a second call would splice a stale one."""
    shared = nn.Linear(D, D).double()
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(ValueError, match="ran twice"):
        evaluate(twice, {"0": make_coder("topk")}, [torch.randn(4, D, dtype=torch.float64)],
                 loss_fn=lambda output, batch: output.square().mean(), progress=False)
    assert not shared._forward_hooks
