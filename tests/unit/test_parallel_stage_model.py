"""Pipeline stage models on one process: what each stage keeps, its initial weights, the
tied-embedding copy, and that the stages chained equal the whole model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model, materialize
from framework.runtime.state import _rename
from parallel.stage_model import EMBEDDING_FQN, TIED_COPY_FQN, StageModel

SEED = 3


def _stage(cfg, stage, num_stages, layers):
    with torch.device("meta"):
        model = StageModel(cfg, stage, num_stages, layers, loss_chunk_tokens=16)
    model.to_empty(device="cpu")
    model.init_weights(SEED)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_stages_keep_their_parts_and_chain_into_the_whole_model(tiny_config, tied):
    cfg = dataclasses.replace(tiny_config.model, tie_embeddings=tied)
    whole = materialize(build_model(cfg), "cpu", SEED)
    splits = [[0], [1, 2], [3]]
    stages = [_stage(cfg, s, 3, layers) for s, layers in enumerate(splits)]

    first, middle, last = stages
    assert first.tok_embeddings is not None and first.norm is None and first.output is None
    assert middle.tok_embeddings is None and middle.norm is None and middle.output is None
    assert last.tok_embeddings is None and last.norm is not None and last.output is not None
    assert [list(s.layers) for s in stages] == [["0"], ["1", "2"], ["3"]]
    assert last.holds_tied_copy == tied and not first.holds_tied_copy

    # every stage parameter starts at the single-process value of the same name
    full = dict(whole.named_parameters())
    full_names = set(full) | ({TIED_COPY_FQN} if tied else set())
    for stage in stages:
        for name, param in stage.named_parameters():
            assert name in full_names
            source = EMBEDDING_FQN if (stage.holds_tied_copy and name == TIED_COPY_FQN) else name
            assert torch.equal(param, full[source]), name

    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, dims=1)
    hidden = tokens
    for stage in stages:
        hidden = stage(hidden)
    want = chunked_cross_entropy(whole(tokens), whole.output_weight(), targets, 16)
    torch.testing.assert_close(last.loss(hidden, targets), want, rtol=1e-6, atol=1e-6)


def test_tied_copy_keys_rename_both_ways():
    state = {
        TIED_COPY_FQN: 1,
        f"state.{TIED_COPY_FQN}.exp_avg": 2,
        f"param_groups.{TIED_COPY_FQN}.lr": 3,
        "norm.weight": 4,
        "state.output.weightish.exp_avg": 5,  # a different name with the same prefix stays
    }
    renamed = _rename(state, TIED_COPY_FQN, EMBEDDING_FQN)
    assert renamed == {
        EMBEDDING_FQN: 1,
        f"state.{EMBEDDING_FQN}.exp_avg": 2,
        f"param_groups.{EMBEDDING_FQN}.lr": 3,
        "norm.weight": 4,
        "state.output.weightish.exp_avg": 5,
    }
    assert _rename(renamed, EMBEDDING_FQN, TIED_COPY_FQN) == state
