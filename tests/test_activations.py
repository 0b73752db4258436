import numpy as np
import pytest
import torch
from torch import nn

from interpkernels import activations
from interpkernels.nn import TopKSAE
from interpkernels.train import train


class Tagger(nn.Module):
    """Takes transformers-style keyword batches; returns a tuple from its block, as GPT-2 blocks do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.block = nn.GRU(6, 5, batch_first=True)  # output (sequence, state): a tuple
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask):
        x, _ = self.block(self.embed(input_ids))
        return self.head(x)


def padded_batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, 50, (4, 9), generator=generator)
        lengths = torch.randint(1, 10, (4,), generator=generator)
        mask = (torch.arange(9) < lengths[:, None]).long()
        yield {"input_ids": ids, "attention_mask": mask}


def test_harvest_writes_unpadded_rows_that_train_streams(tmp_path):
    model = Tagger()
    batches = list(padded_batches(3))
    sites = activations.harvest(model, ["block", "head"], batches, tmp_path, progress=False)
    expected_block, expected_head, expected_ids = [], [], []
    for batch in batches:
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            expected_block.append(model.block(model.embed(batch["input_ids"]))[0][mask])
            expected_head.append(model(**batch)[mask])
        expected_ids.append(batch["input_ids"][mask])
    rows = sum(len(x) for x in expected_block)
    assert sites["block"].rows == sites["head"].rows == rows and sites["block"].d == 5 and sites["head"].d == 3
    np.testing.assert_array_equal(sites["block"].array(), torch.cat(expected_block).numpy())
    np.testing.assert_array_equal(sites["head"].array(), torch.cat(expected_head).numpy())
    np.testing.assert_array_equal(activations.load_tokens(tmp_path), torch.cat(expected_ids).numpy())
    assert activations.load(tmp_path) == sites
    assert not model.block._forward_hooks and not model.head._forward_hooks
    batch = next(sites["block"].batches(8))
    assert batch.shape == (8, 5) and batch.dtype == torch.float32
    sae = TopKSAE(5, 16, 2, seed=0)
    history = train(sae, sites["block"].batches(8), steps=3, progress=False, log_every=1)
    assert len(history.fvu) == 3


def test_harvest_stops_at_max_tokens(tmp_path):
    model = Tagger()
    sites = activations.harvest(model, ["block"], padded_batches(100), tmp_path, max_tokens=17, dtype=np.float16,
                                progress=False)
    assert sites["block"].rows == 17 and sites["block"].array().dtype == np.float16
    assert len(activations.load_tokens(tmp_path)) == 17


def test_harvest_plain_tensor_batches(tmp_path):
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU())
    data = [torch.randn(2, 3, 4) for _ in range(2)]
    sites = activations.harvest(model, ["0"], data, tmp_path, progress=False)
    with torch.no_grad():
        expected = torch.cat([model[0](x).reshape(-1, 7) for x in data])
    np.testing.assert_array_equal(sites["0"].array(), expected.numpy())
    assert activations.load_tokens(tmp_path) is None


def test_harvest_bad_input(tmp_path):
    model = Tagger()
    with pytest.raises(KeyError, match="blocks"):
        activations.harvest(model, ["blocks"], padded_batches(1), tmp_path, progress=False)
    with pytest.raises(TypeError, match="sites"):
        activations.harvest(model, "block", padded_batches(1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        activations.harvest(model, ["block"], padded_batches(1), tmp_path, max_tokens=0, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        activations.harvest(model, ["block"], [], tmp_path, progress=False)
    assert not model.block._forward_hooks


def test_harvest_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    activations.harvest(Tagger(), ["block"], padded_batches(2), tmp_path, max_tokens=10)
    err = capsys.readouterr().err
    assert "harvested 10 of 10 tokens" in err and "\r" not in err
    assert err.splitlines()[-1].endswith("  left 00:00")  # the total was known: the shared tail says what is left
