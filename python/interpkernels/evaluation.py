"""How much of a model survives its sparse coders: SAELens' evaluation metrics for any nn.Module.

    report = evaluate(model, {"blocks.3": sae, "blocks.5.mlp": transcoder}, batches)
    report["blocks.3"].loss_recovered, report["blocks.3"].kl_div, report["blocks.3"].fvu

Every site is spliced *alone*: per batch, one clean forward pass, then per site
one pass with that site's output replaced by the coder's reconstruction (no
error term) and one with it replaced by zeros. Over all evaluated tokens
(positions where the batch's ``attention_mask`` is nonzero, all positions
without one, less those whose id is in ``exclude_tokens``; only evaluated
tokens are spliced):

- ``loss_*``: the default loss is next-token cross-entropy averaged over the
  predicted positions (position t, evaluated, predicts token t+1, a real
  token), for a model whose output is logits ``[batch, seq, vocab]`` (or has
  them as ``.logits`` / first element) and batches of token ids (a tensor, or
  a dict with ``input_ids``). With ``loss_fn(output, batch) -> scalar`` the
  losses are the mean of its values over the batches.
- ``loss_recovered = (L_zero - L_spliced) / (L_zero - L_clean)`` (SAELens'
  ``ce_loss_score``).
- ``kl_div`` / ``kl_div_zero_ablation``: KL(clean || spliced) of the softmax
  over the last axis of the logits, summed over the vocabulary and averaged
  over tokens (SAELens' ``kl_div_with_sae`` / ``kl_div_with_ablation``);
  None when the output has no logits tensor.
- ``fvu = sum ||x_hat - x||^2 / sum ||x - mean(x)||^2``, ``explained_variance
  = 1 - fvu`` (SAELens' ``explained_variance``), x the site's output on the
  clean run (a transcoder's target), the mean over all evaluated tokens.
- ``l0``: mean nonzero code entries per token; ``dead_fraction``: the share of
  latents that never fire (a nonzero code entry) over the evaluation.

Coders are duck-typed as in interpkernels.attribution: ``encode(x)`` returns
a sparse code ``(values, indices, ...)`` (interpkernels.nn; sparsify's
``EncoderOutput``) reconstructed by ``reconstruct(x, values, indices)`` or
``decode(values, indices)``, or a dense ``[..., M]`` tensor reconstructed by
``decode(acts)`` (SAELens, dictionary_learning). interpkernels.nn Transcoders
read the submodule's input. A CrossLayerTranscoder is given under a tuple of
its layers' MLP names, in layer order, and is spliced as one replacement
model: every layer's MLP output replaced at once, each layer's code read from
the input the spliced pass reaches it with; its fvu, l0 and dead_fraction are
measured on the clean run as its training loss does (all layers together).

The model's forward pass must be deterministic (eval mode): a site's
reconstruction is computed once, on the clean pass, and spliced in as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from interpkernels._hooks import forward_hooks
from interpkernels._progress import Progress
from interpkernels.activations import call_model, output_tensor
from interpkernels.attribution.sites import reads_input, reconstruct, replace_output
from interpkernels.nn import CrossLayerTranscoder

__all__ = ["SiteReport", "evaluate"]


@dataclass(frozen=True)
class SiteReport:
    """One site's metrics (module docstring for the definitions)."""

    loss_clean: float
    loss_spliced: float
    loss_zero_ablation: float
    loss_recovered: float
    kl_div: float | None
    kl_div_zero_ablation: float | None
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    tokens: int  # evaluated tokens (the rows fvu, l0 and dead_fraction are taken over)
    fired: torch.Tensor  # bool [M] ([L, M] for a CrossLayerTranscoder): latents that fired at least once


# ---------------------------------------------------------------------------
# Batches, outputs and losses.


def token_mask(batch: object) -> torch.Tensor | None:
    """``attention_mask != 0`` of a dict batch, else None (every position is a real token)."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return None


def evaluated_mask(batch: object, real: torch.Tensor | None, excluded: torch.Tensor | None) -> torch.Tensor | None:
    """The real tokens whose id is not ``excluded`` (None: every position)."""
    if excluded is None:
        return real
    ids = token_ids(batch, "exclude_tokens")
    kept = ~torch.isin(ids, excluded.to(ids.device))
    return kept if real is None else kept & real


def logits_of(output: object) -> torch.Tensor | None:
    """The model's logits: the output itself, its ``.logits`` / ``["logits"]``, or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = output.get("logits")
    elif hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def token_ids(batch: object, needed_by: str = "loss_fn") -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
        remedy = ("pass loss_fn(output, batch) -> scalar for other batches" if needed_by == "loss_fn"
                  else "exclude_tokens reads the ids of such batches only")
        raise TypeError(f"{needed_by}: needs batches of token ids [batch, seq] (a tensor or a dict with "
                        f"input_ids); {remedy}")
    return ids


def next_token_loss(output: object, batch: object, real: torch.Tensor | None, evaluated: torch.Tensor | None
                    ) -> tuple[torch.Tensor, int]:
    """(sum, count) of the cross-entropy of token t+1 given positions <= t, over the
    positions t that are evaluated and whose t+1 is a real token (SAELens masks
    the predicting position only; padding is never a target)."""
    ids, logits = token_ids(batch), logits_of(output)
    if logits is None or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = None if logits is None else list(logits.shape)
        raise ValueError(f"loss_fn: the default next-token loss needs logits [batch, seq, vocab] for token ids "
                         f"{list(ids.shape)}, the model returned {shape}; pass loss_fn(output, batch) -> scalar")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    if evaluated is None:
        return per_token.double().sum(), per_token.numel()
    predicted = evaluated[:, :-1] if real is None else evaluated[:, :-1] & real[:, 1:]
    predicted = predicted.flatten()
    return per_token[predicted].double().sum(), int(predicted.sum())


def kl_divergence(clean: torch.Tensor, spliced: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum, count) over tokens of KL(softmax(clean) || softmax(spliced)), summed over the last axis."""
    dtype = torch.promote_types(clean.dtype, torch.float32)
    per_token = F.kl_div(spliced.to(dtype).log_softmax(-1), clean.to(dtype).log_softmax(-1), reduction="none",
                         log_target=True).sum(-1)
    if mask is not None and per_token.shape == mask.shape:
        per_token = per_token[mask]
    return per_token.double().sum(), per_token.numel()


# ---------------------------------------------------------------------------
# Running sums.


class RunningMean:
    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, total: torch.Tensor | float, count: int) -> None:
        self.total, self.count = self.total + total, self.count + count

    def value(self) -> float:
        return float(self.total) / self.count if self.count else float("nan")


class RunningVariance:
    """``sum ||x - mean(x)||^2`` over every row added, merged batch by batch in
    float64 (Chan, Golub and LeVeque), so no ``E[x^2] - E[x]^2`` cancellation."""

    def __init__(self) -> None:
        self.rows, self.mean, self.sum_squares = 0, None, 0.0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(0)
        sum_squares = (rows - mean).square().sum()
        if self.mean is None:
            self.rows, self.mean, self.sum_squares = n, mean, sum_squares
            return
        total = self.rows + n
        delta = mean - self.mean
        self.sum_squares = self.sum_squares + sum_squares + delta.square().sum() * (self.rows * n / total)
        self.mean = self.mean + delta * (n / total)
        self.rows = total


class CoderStatistics:
    """The clean-run reconstruction metrics of one site, accumulated over batches."""

    def __init__(self, targets: int) -> None:
        self.squared_error: torch.Tensor | float = 0.0
        self.variances = [RunningVariance() for _ in range(targets)]
        self.active = RunningMean()  # nonzero code entries per (layer and) token
        self.fired: torch.Tensor | None = None

    def add(self, target: int, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.squared_error = self.squared_error + (x_hat.double() - x.double()).square().sum()
        self.variances[target].add(x)

    def add_code(self, active_entries: torch.Tensor, rows: int, fired: torch.Tensor) -> None:
        self.active.add(active_entries.double(), rows)
        self.fired = fired if self.fired is None else self.fired | fired

    def fvu(self) -> float:
        """nan where the activations do not vary (a single token)."""
        variance = float(sum(variance.sum_squares for variance in self.variances))
        return float(self.squared_error) / variance if variance else float("nan")


# ---------------------------------------------------------------------------
# Coders.


def rows_of(name: str, tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[tokens, d]``: the evaluated tokens' rows of a site's activation."""
    if mask is None:
        return tensor.reshape(-1, tensor.shape[-1])
    if tensor.shape[:-1] != mask.shape:
        raise ValueError(f"sites: submodule {name!r} has activations {list(tensor.shape)}, which do not match the "
                         f"batch's token mask {list(mask.shape)} plus a feature axis")
    return tensor[mask]


def scatter_rows(template: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``template`` with the evaluated tokens' rows replaced by ``rows`` (padding keeps its values)."""
    rows = rows.to(template.dtype)
    if mask is None:
        return rows.reshape(template.shape)
    spliced = template.clone()
    spliced[mask] = rows
    return spliced


def coder_dtype(coder: nn.Module, default: torch.dtype) -> torch.dtype:
    return next((p.dtype for p in coder.parameters() if p.is_floating_point()), default)


def num_latents(coder: nn.Module) -> int:
    count = getattr(coder, "num_latents", None)
    if isinstance(count, int):
        return count
    return coder.W_dec.shape[0]


def encode_and_reconstruct(coder: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat [n, d_out], nonzero code entries summed over the rows, fired latents [M] bool)."""
    rows = rows.to(coder_dtype(coder, rows.dtype))
    code = coder.encode(rows)
    if isinstance(code, torch.Tensor):  # dense activations [n, M] (SAELens, dictionary_learning)
        active = (code.to_dense() if code.is_sparse else code) != 0
        return coder.decode(code), active.sum(), active.any(0)
    values, indices = code[0], code[1]
    return reconstruct(coder, rows, values, indices), *sparse_activity(values, indices, num_latents(coder))


def sparse_activity(values: torch.Tensor, indices: torch.Tensor, latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonzero entries of a sparse code, the latents [M] bool it fires); zero-valued slots fire nothing."""
    active = values != 0
    fired = torch.zeros(latents, dtype=torch.bool, device=values.device)
    fired[indices[active]] = True
    return active.sum(), fired


class Site:
    """One sparse coder at one submodule; spliced with the reconstruction of the clean pass."""

    def __init__(self, key: str, coder: nn.Module) -> None:
        self.key, self.names, self.coder = key, (key,), coder
        self.statistics = CoderStatistics(1)
        self.reconstruction: torch.Tensor | None = None

    def measure(self, captured: Mapping[str, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None) -> None:
        written = captured[self.key][1]
        read = input_of(self.key, self.key, captured) if reads_input(self.coder) else written
        x_hat, active, fired = encode_and_reconstruct(self.coder, rows_of(self.key, read, mask))
        x = rows_of(self.key, written, mask)
        if x_hat.shape != x.shape:
            raise ValueError(f"sites[{self.key!r}]: the coder reconstructs {list(x_hat.shape[1:])} per token, the "
                             f"submodule outputs {list(x.shape[1:])}")
        self.statistics.add(0, x, x_hat)
        self.statistics.add_code(active, x.shape[0], fired)
        self.reconstruction = x_hat

    def splice_hooks(self, mask: torch.Tensor | None) -> dict:
        def splice(module, args, output):
            return replace_output(output, scatter_rows(output_tensor(self.key, output), self.reconstruction, mask))

        return {self.key: splice}


class CrossLayerSite:
    """A CrossLayerTranscoder over the MLPs ``names`` (layer order), spliced as one replacement model."""

    def __init__(self, key: tuple[str, ...], coder: CrossLayerTranscoder) -> None:
        self.key, self.names, self.coder = key, key, coder
        self.statistics = CoderStatistics(len(key))

    def measure(self, captured: Mapping[str, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None) -> None:
        dtype = coder_dtype(self.coder, torch.float32)
        inputs = [rows_of(name, input_of(self.key, name, captured), mask).to(dtype) for name in self.names]
        codes = self.coder.encode(inputs)
        for layer, (name, x_hat) in enumerate(zip(self.names, self.coder.decode(codes))):
            self.statistics.add(layer, rows_of(name, captured[name][1], mask), x_hat)
        active, fired = zip(*(sparse_activity(values, indices, self.coder.num_latents) for values, indices in codes))
        # l0 per layer and token, as CrossLayerTranscoder.forward reports it.
        self.statistics.add_code(sum(active), len(codes) * inputs[0].shape[0], torch.stack(fired))

    def splice_hooks(self, mask: torch.Tensor | None) -> dict:
        codes: list[tuple[torch.Tensor, torch.Tensor]] = []
        dtype = coder_dtype(self.coder, torch.float32)

        def splice(layer, name, module, args, output):
            if len(codes) != layer:
                raise ValueError(f"sites[{self.key!r}]: the forward pass ran {name!r} out of layer order")
            if not args:
                raise ValueError(f"sites[{self.key!r}]: submodule {name!r} was called without a positional input")
            codes.append(self.coder.encode_layer(layer, rows_of(name, args[0], mask).to(dtype)))
            # The sum of the contributions of layers <= this one; later layers' codes do not exist yet.
            x_hat = self.coder.decode(codes)[layer]
            return replace_output(output, scatter_rows(output_tensor(name, output), x_hat, mask))

        return {name: (lambda m, a, o, layer=layer, name=name: splice(layer, name, m, a, o))
                for layer, name in enumerate(self.names)}


def zero_hooks(names: tuple[str, ...]) -> dict:
    return {name: lambda module, args, output, name=name: replace_output(
        output, torch.zeros_like(output_tensor(name, output))) for name in names}


def build_sites(model: nn.Module, sites: Mapping) -> list[Site | CrossLayerSite]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sites, Mapping) or not sites:
        raise TypeError("sites: expected a non-empty mapping {module name: sparse coder}")
    modules = dict(model.named_modules())
    built = []
    for key, coder in sites.items():
        names = key if isinstance(key, tuple) else (key,)
        unknown = [name for name in names if name not in modules]
        if unknown:
            known = [n for n in modules if n][:8]
            raise KeyError(f"sites: the model has no submodules {unknown} (it has e.g. {known})")
        if isinstance(coder, CrossLayerTranscoder):
            if not isinstance(key, tuple) or len(key) != coder.config["num_layers"]:
                raise ValueError(f"sites[{key!r}]: a CrossLayerTranscoder of {coder.config['num_layers']} layers "
                                 "is given under a tuple of that many MLP names, in layer order")
            built.append(CrossLayerSite(key, coder))
            continue
        if not isinstance(key, str):
            raise TypeError(f"sites[{key!r}]: a tuple of names is for a CrossLayerTranscoder; a "
                            f"{type(coder).__name__} sits at one submodule name")
        if not (hasattr(coder, "encode") and hasattr(coder, "decode")):
            raise TypeError(f"sites[{key!r}]: expected a sparse coder with encode/decode, got {type(coder).__name__}")
        built.append(Site(key, coder))
    return built


def capture_hooks(sites: list[Site | CrossLayerSite], captured: dict) -> dict:
    """Hooks recording (first positional input or None, output) at every site's submodules, on the clean pass."""

    def capture(name, module, args, output):
        if name in captured:
            raise ValueError(f"sites: submodule {name!r} ran twice in one forward pass; its coder cannot be spliced "
                             "from one clean activation")
        captured[name] = (args[0] if args else None, output_tensor(name, output))

    return {name: (lambda m, a, o, name=name: capture(name, m, a, o)) for site in sites for name in site.names}


def input_of(key: object, name: str, captured: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    if captured[name][0] is None:
        raise ValueError(f"sites[{key!r}]: submodule {name!r} was called without a positional input for its "
                         "transcoder to read")
    return captured[name][0]


# ---------------------------------------------------------------------------
# The loop.


class EvaluationProgress(Progress):
    """A tqdm bar of batches on a terminal; elsewhere (a log file, CI) a plain line
    every `PLAIN_LINE_SECONDS` and at the end, never '\\r'."""

    def __init__(self, total: int | None, enabled: bool):
        super().__init__(total, "batch", enabled)
        self.tokens = 0

    def advance(self, tokens: int) -> None:
        super().advance()
        self.tokens += tokens
        if self.due():
            self.line()

    def line(self) -> None:
        of = f" of {self.total:,}" if self.total else ""
        self.show(f"evaluated {self.done:,}{of} batches", f"{self.tokens:,} tokens, "
                  f"{self.tokens / max(self.elapsed(), 1e-9):,.0f} tok/s")

    def close(self) -> None:
        if self.bar is None and self.done:
            self.line()
        super().close()


class Losses:
    """Loss and KL(clean || this pass) of the passes spliced (or zero-ablated) at one site."""

    def __init__(self) -> None:
        self.loss, self.kl = RunningMean(), RunningMean()

    def add(self, loss: tuple[torch.Tensor, int], logits: torch.Tensor | None, clean_logits: torch.Tensor | None,
            mask: torch.Tensor | None) -> None:
        self.loss.add(*loss)
        if logits is not None and clean_logits is not None and logits.shape == clean_logits.shape:
            self.kl.add(*kl_divergence(clean_logits, logits, mask))

    def kl_value(self) -> float | None:
        return self.kl.value() if self.kl.count else None


def evaluate(model: nn.Module, sites: Mapping, batches: Iterable, *, loss_fn=None,
             exclude_tokens: Iterable[int] = (), progress: bool = True) -> dict:
    """Splice every site's coder alone into ``model`` over ``batches`` (each passed
    as interpkernels.activations.call_model does) and measure what survives
    (module docstring for the definitions). Returns ``{site key: SiteReport}``.

    ``loss_fn(output, batch) -> scalar``: the loss of one batch (default: the
    next-token cross-entropy). ``exclude_tokens``: token ids (BOS, ...) neither
    spliced nor evaluated, though the model still sees them (SAELens'
    ``exclude_special_tokens``). Runs under ``torch.no_grad``; hooks are removed
    whatever happens. Shows progress on stderr (:class:`EvaluationProgress`;
    ``progress=False``: none).
    """
    built = build_sites(model, sites)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (output, batch) -> scalar, got {type(loss_fn).__name__}")

    excluded_ids = list(exclude_tokens)
    if not all(isinstance(token, int) for token in excluded_ids):
        raise TypeError(f"exclude_tokens: expected token ids (int), got {excluded_ids}")
    excluded = torch.tensor(excluded_ids, dtype=torch.long) if excluded_ids else None

    def loss_of(output, batch, real, mask):
        if loss_fn is None:
            return next_token_loss(output, batch, real, mask)
        return torch.as_tensor(loss_fn(output, batch)).double(), 1

    clean_loss = RunningMean()
    spliced = {site.key: Losses() for site in built}
    ablated = {site.key: Losses() for site in built}
    bar = EvaluationProgress(len(batches) if hasattr(batches, "__len__") else None, progress)
    try:
        with torch.no_grad():
            for batch in batches:
                if loss_fn is None:
                    token_ids(batch)  # before any forward pass: batches the default loss cannot read
                real = token_mask(batch)
                mask = evaluated_mask(batch, real, excluded)
                captured: dict = {}
                with forward_hooks(model, capture_hooks(built, captured)):
                    output = call_model(model, batch)
                missing = [name for site in built for name in site.names if name not in captured]
                if missing:
                    raise ValueError(f"sites: the forward pass never ran the submodules {missing}")
                clean_logits = logits_of(output)
                clean_loss.add(*loss_of(output, batch, real, mask))
                for site in built:
                    site.measure(captured, mask)
                    for hooks, losses in ((site.splice_hooks(mask), spliced), (zero_hooks(site.names), ablated)):
                        with forward_hooks(model, hooks):
                            output = call_model(model, batch)
                        losses[site.key].add(loss_of(output, batch, real, mask), logits_of(output), clean_logits,
                                             mask)
                first_output = captured[built[0].names[0]][1]
                bar.advance(int(mask.sum()) if mask is not None else first_output.shape[:-1].numel())
    finally:
        bar.close()
    if clean_loss.count == 0:
        raise ValueError("batches: yielded no batches")
    return {site.key: report(site, clean_loss, spliced[site.key], ablated[site.key]) for site in built}


def report(site: Site | CrossLayerSite, clean_loss: RunningMean, spliced: Losses, ablated: Losses) -> SiteReport:
    statistics = site.statistics
    if statistics.active.count == 0:
        raise ValueError("batches: yielded no tokens to evaluate (every one padding or excluded)")
    loss_clean, loss_spliced, loss_zero = clean_loss.value(), spliced.loss.value(), ablated.loss.value()
    fvu = statistics.fvu()
    tokens = statistics.variances[0].rows
    return SiteReport(
        loss_clean=loss_clean, loss_spliced=loss_spliced, loss_zero_ablation=loss_zero,
        loss_recovered=(loss_zero - loss_spliced) / (loss_zero - loss_clean) if loss_zero != loss_clean
        else float("nan"),
        kl_div=spliced.kl_value(), kl_div_zero_ablation=ablated.kl_value(),
        fvu=fvu, explained_variance=1 - fvu, l0=statistics.active.value(),
        dead_fraction=float((~statistics.fired).double().mean()), tokens=tokens, fired=statistics.fired.cpu())
