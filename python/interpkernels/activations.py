"""Harvest activations from any nn.Module into files that interpkernels.train streams.

    sites = harvest(model, ["encoder.layer.2", "encoder.layer.4"], batches, "acts/")
    sae = TopKSAE(sites["encoder.layer.2"].d, 4096, 32)
    train(sae, sites["encoder.layer.2"].batches(1024), steps=2000)

Per site, the submodule's output (the first element of a tuple output) is
written row by row, one row per token, to ``<directory>/<site>.bin``: a raw
``[rows, d]`` array that :func:`interpkernels.train.memmap_batches` reads
through numpy.memmap, so training never loads more than a batch. Batches that
are dicts with an ``attention_mask`` keep only its nonzero positions (no
padding rows), and their ``input_ids`` at those positions go to
``<directory>/tokens.bin`` (int64), row-aligned with every site's file: the
token each activation row belongs to. ``manifest.json`` records the shapes;
:func:`load` reopens a directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from interpkernels._hooks import forward_hooks
from interpkernels._progress import Progress
from interpkernels.train import memmap_batches

MANIFEST = "manifest.json"
TOKENS = "tokens.bin"


def call_model(model: nn.Module, inputs: object) -> object:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def output_tensor(name: str, output: object) -> torch.Tensor:
    """The activation at a submodule: its output, or the first element of a tuple output."""
    tensor = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"sites: submodule {name!r} returned {type(output).__name__}, not a tensor or a tuple "
                        "whose first element is one")
    return tensor


@dataclass
class HarvestedSite:
    path: Path
    rows: int
    d: int
    dtype: str

    def array(self) -> np.memmap:
        """The ``[rows, d]`` activations, memory-mapped read-only."""
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=(self.rows, self.d))

    def batches(self, batch_size: int, *, device: str | torch.device = "cpu", shuffle_seed: int | None = 0):
        """Endless ``[batch_size, d]`` float batches for interpkernels.train (memmap_batches)."""
        return memmap_batches(self.path, self.d, batch_size, dtype=np.dtype(self.dtype), device=device,
                              shuffle_seed=shuffle_seed)


def load_tokens(directory: str | Path) -> np.memmap | None:
    """The int64 token of every row, when the batches carried ``input_ids``."""
    path = Path(directory) / TOKENS
    return np.memmap(path, dtype=np.int64, mode="r") if path.exists() and path.stat().st_size else None


def load(directory: str | Path) -> dict[str, HarvestedSite]:
    """The sites of a directory written by :func:`harvest`."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    return {name: HarvestedSite(directory / entry["file"], entry["rows"], entry["d"], entry["dtype"])
            for name, entry in manifest["sites"].items()}


class HarvestProgress(Progress):
    """A tqdm bar of tokens on a terminal; elsewhere (a log file, CI) a plain line
    every `PLAIN_LINE_SECONDS` and at the end, never '\\r'."""

    def __init__(self, total: int | None, enabled: bool):
        super().__init__(total, "tok", enabled)

    def advance(self, rows: int) -> None:
        super().advance(rows)
        if self.bar is None and self.due():
            self.line()

    def line(self) -> None:
        of = f" of {self.total:,}" if self.total else ""
        self.show(f"harvested {self.done:,}{of} tokens", f"{self.done / max(self.elapsed(), 1e-9):,.0f} tok/s")

    def close(self) -> None:
        if self.bar is None:
            self.line()
        super().close()


def _token_mask(batch: object) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return None


def harvest(
    model: nn.Module,
    sites: Sequence[str],
    batches: Iterable,
    directory: str | Path,
    *,
    max_tokens: int | None = None,
    dtype: np.dtype | type = np.float32,
    progress: bool = True,
) -> dict[str, HarvestedSite]:
    """Run ``model`` over ``batches`` (each passed as in :func:`call_model`) under
    ``torch.no_grad`` and append every site's activations ``[tokens, d]`` to its
    file. Stops after ``max_tokens`` rows (the last batch cut). Files already in
    ``directory`` for these sites are replaced. Shows progress on stderr
    (:class:`HarvestProgress`; ``progress=False``: none). Hooks are removed
    whatever happens."""
    if isinstance(sites, str) or not sites:
        raise TypeError("sites: expected a non-empty sequence of submodule names")
    modules = dict(model.named_modules())
    unknown = [name for name in sites if name not in modules]
    if unknown:
        known = [n for n in modules if n][:8]
        raise KeyError(f"sites: the model has no submodules {unknown} (it has e.g. {known})")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens: expected at least 1, got {max_tokens}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    files = {name: open(directory / f"{name}.bin", "wb") for name in sites}
    tokens_file = open(directory / TOKENS, "wb")
    widths: dict[str, int] = {}
    captured: dict[str, torch.Tensor] = {}
    hooks = {name: lambda module, args, output, name=name: captured.__setitem__(name, output_tensor(name, output))
             for name in sites}
    rows = 0
    bar = HarvestProgress(max_tokens, progress)
    try:
        with torch.no_grad(), forward_hooks(modules, hooks):
            for batch in batches:
                captured.clear()
                call_model(model, batch)
                mask = _token_mask(batch)
                take = None if max_tokens is None else max_tokens - rows
                for name in sites:
                    if name not in captured:
                        raise ValueError(f"sites: the forward pass never ran submodule {name!r}")
                    acts = captured[name]
                    acts = acts[mask] if mask is not None else acts.reshape(-1, acts.shape[-1])
                    if widths.setdefault(name, acts.shape[-1]) != acts.shape[-1]:
                        raise ValueError(f"sites: submodule {name!r} changed width from {widths[name]} to "
                                         f"{acts.shape[-1]} between batches")
                    files[name].write(acts[:take].float().cpu().numpy().astype(dtype).tobytes())
                    added = len(acts[:take])
                if isinstance(batch, Mapping) and "input_ids" in batch:
                    ids = batch["input_ids"]
                    ids = ids[mask] if mask is not None else ids.reshape(-1)
                    tokens_file.write(ids[:take].long().cpu().numpy().tobytes())
                rows += added
                bar.advance(added)
                if max_tokens is not None and rows >= max_tokens:
                    break
    finally:
        bar.close()
        for f in (*files.values(), tokens_file):
            f.close()
    if rows == 0:
        raise ValueError("batches: yielded no tokens")
    manifest = {"sites": {name: {"file": f"{name}.bin", "rows": rows, "d": widths[name], "dtype": dtype.name}
                          for name in sites}, "tokens": (directory / TOKENS).stat().st_size // 8}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return load(directory)
