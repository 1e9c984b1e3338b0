"""The activation engine: exact gradients under any policy mix, storages kept once, what is
offloaded leaves the device, recomputation runs each segment once, prefetch one layer ahead."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model, causal_attention, materialize
from launch.compose import compose_config
from offload import (
    ActivationRuntime,
    apply_activation_plan,
    apply_activation_policy,
    remove_activation_policy,
    token_segments,
)
from offload.engine import LayerForward
from offload.records import AnchorRecord, KeptRecord, OffloadRecord, storage_key
from planner.activations import LayerShape, layer_activation_bytes, token_split
from planner.plan import LayerPlan

SEQ = 40  # not a multiple of anything: every rounding path is taken


@pytest.fixture(scope="module")
def small_cfg():
    base = compose_config([]).model
    return dataclasses.replace(
        base, num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_size=88
    )


def _batch(cfg, batch=2, seq=SEQ, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _run(cfg, policies, inputs, targets, fetch="prefetch"):
    """Loss and gradients of one forward/backward, and the runtime (None without policies)."""
    model = materialize(build_model(cfg), "cpu", 0)
    runtime = (
        apply_activation_plan(model.layers.values(), policies, fetch=fetch) if policies else None
    )
    loss = chunked_cross_entropy(model(inputs), model.output_weight(), targets, 32)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, runtime


def _relative(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


policy_strategy = st.builds(
    lambda mode, alpha, share, beta: (mode, alpha, share, beta),
    st.sampled_from(["none", "selective", "full"]),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.sampled_from([0.0, 0.3, 0.5, 1.0]),
)


def _layer_plan(index, mode, alpha, share, beta):
    if mode == "full":
        return LayerPlan(index, 0, 0.0, "full", 0.0, beta)
    return LayerPlan(index, 0, alpha, mode, (1.0 - alpha) * share, beta)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mix=st.lists(policy_strategy, min_size=3, max_size=3), batch=st.sampled_from([1, 2]))
def test_loss_and_every_gradient_equal_the_plain_run(small_cfg, mix, batch):
    inputs, targets = _batch(small_cfg, batch)
    ref_loss, ref_grads, _ = _run(small_cfg, None, inputs, targets)
    policies = [_layer_plan(i, *choice) for i, choice in enumerate(mix)]
    loss, grads, _ = _run(small_cfg, policies, inputs, targets)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert _relative(grads[name], ref) <= 1e-6, name


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mix=st.lists(policy_strategy, min_size=3, max_size=3))
def test_fetching_on_demand_gives_the_plain_gradients(small_cfg, mix):
    inputs, targets = _batch(small_cfg)
    ref_loss, ref_grads, _ = _run(small_cfg, None, inputs, targets)
    policies = [_layer_plan(i, *choice) for i, choice in enumerate(mix)]
    loss, grads, _ = _run(small_cfg, policies, inputs, targets, fetch="on_demand")
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    for name, ref in ref_grads.items():
        assert _relative(grads[name], ref) <= 1e-6, name


def test_token_segments_follow_the_planner_rounding():
    policy = LayerPlan(0, 0, 0.3, "none", 0.45)
    offloaded, recomputed = token_split(SEQ, 0.3, 0.45)
    assert token_segments(SEQ, policy) == [
        ("offload", 0, offloaded),
        ("recompute", offloaded, offloaded + recomputed),
        ("keep", offloaded + recomputed, SEQ),
    ]
    assert token_segments(SEQ, LayerPlan(0, 0, 0.0, "none", 1.0)) == [("recompute", 0, SEQ)]
    assert token_segments(SEQ, LayerPlan(0, 0, 0.0, "full", 0.0)) == [("full", 0, SEQ)]


def _forward_only(cfg, policy, batch=2, core_fn=None):
    """One layer forward under `policy`; returns (layer, x, engine, output)."""
    model = materialize(build_model(cfg), "cpu", 0)
    layer = model.layers["0"]
    if core_fn is not None:
        layer.attention.core_fn = core_fn
    engine = apply_activation_policy(layer, policy)
    inputs, _ = _batch(cfg, batch)
    x = model.tok_embeddings(inputs)
    from framework.components.rope import rope_tables

    rope = rope_tables(model.rope_inv_freq, 0, inputs.shape[1], x.dtype)
    return layer, x, engine, layer(x, rope), rope


def _live_records(engine):
    forward = engine.last_forward()
    assert forward is not None, "autograd still holds the layer's saved tensors"
    return [record for ref in forward.live if (record := ref()) is not None]


def test_every_distinct_storage_is_one_record(small_cfg):
    _, _, engine, out, _ = _forward_only(small_cfg, LayerPlan(0, 0, 0.0, "none", 0.0))
    records = _live_records(engine)
    # x, rstd1, h1, q, k, v, out, lse, x2, rstd2, h2, a, b, p: the three projections' saved
    # views of h1 and the output projection's view of the attention output add nothing
    assert len(records) == 14
    assert all(isinstance(record, KeptRecord) for record in records)
    keys = {storage_key(record.tensor) for record in records}
    assert len(keys) == 14
    assert out.grad_fn is not None


def test_offloaded_and_split_anchor_storages_leave_the_device(small_cfg):
    _, x, engine, _out, _ = _forward_only(small_cfg, LayerPlan(0, 0, 0.5, "none", 0.0, 0.5))
    records = _live_records(engine)
    offloaded = [r for r in records if isinstance(r, OffloadRecord)]
    anchors = [r for r in records if isinstance(r, AnchorRecord)]
    assert len(offloaded) == 8 and len(anchors) == 6
    assert all(r.source is None and r.host is not None for r in offloaded)
    held = set()
    for record in anchors:
        assert record.base is None, "the original anchor storage is released"
        assert record.rest is not None and record.host is not None
        held.add(storage_key(record.rest))
    for record in records:
        if isinstance(record, KeptRecord):
            held.add(storage_key(record.tensor))
    assert storage_key(x) not in held, "a kept token slice must not pin the whole input"
    stats = engine.last_stats
    assert stats.device_bytes == sum(r.device_bytes() for r in records)
    assert stats.host_bytes == sum(r.host_bytes() for r in records) > 0


def test_full_offload_keeps_nothing_on_the_device(small_cfg):
    _, _, engine, _out, _ = _forward_only(small_cfg, LayerPlan(0, 0, 1.0, "none", 0.0, 1.0))
    stats = engine.last_stats
    shape = LayerShape.of(small_cfg, 4)
    predicted = layer_activation_bytes(shape, 2, SEQ, LayerPlan(0, 0, 1.0, "none", 0.0, 1.0))
    assert stats.device_bytes == 0
    assert stats.host_bytes == predicted.host_bytes
    assert engine.last_forward().measure() == stats


def _count_calls(layer, name, calls):
    original = getattr(layer, name)

    def counted(*args):
        calls[name] = calls.get(name, 0) + 1
        return original(*args)

    setattr(layer, name, counted)


def test_recompute_segment_runs_again_once_in_backward(small_cfg):
    model = materialize(build_model(small_cfg), "cpu", 0)
    layer = model.layers["1"]
    policies = [LayerPlan(i, 0, 0.0, "none", 0.5 if i == 1 else 0.0) for i in range(3)]
    apply_activation_plan(model.layers.values(), policies)
    calls: dict[str, int] = {}
    _count_calls(layer, "pre_attention", calls)
    _count_calls(layer, "post_attention", calls)
    inputs, targets = _batch(small_cfg)
    loss = chunked_cross_entropy(model(inputs), model.output_weight(), targets, 32)
    assert calls == {"pre_attention": 1, "post_attention": 1}  # all tokens at once
    loss.backward()
    assert calls == {"pre_attention": 2, "post_attention": 2}  # once more, on the rho tokens


def test_selective_recipes_are_recomputed_once_each(small_cfg):
    model = materialize(build_model(small_cfg), "cpu", 0)
    policies = [LayerPlan(i, 0, 0.0, "selective", 0.0) for i in range(3)]
    runtime = apply_activation_plan(model.layers.values(), policies)
    norm_calls = []
    for layer in model.layers.values():
        for norm in (layer.attention_norm, layer.ffn_norm):
            norm.register_forward_hook(lambda *_: norm_calls.append(torch.is_grad_enabled()))
    inputs, targets = _batch(small_cfg)
    loss = chunked_cross_entropy(model(inputs), model.output_weight(), targets, 32)
    assert norm_calls == [True] * 6
    loss.backward()
    # h1 is saved by three projections and h2 by two: each norm output recomputed once
    assert norm_calls == [True] * 6 + [False] * 6
    shape = LayerShape.of(small_cfg, 4)
    predicted = layer_activation_bytes(shape, 2, SEQ, policies[0])
    for stats in runtime.layer_stats().values():
        assert stats.recomputed_bytes == predicted.recomputed_bytes


def test_retain_graph_backward_twice_doubles_the_gradients(small_cfg):
    model = materialize(build_model(small_cfg), "cpu", 0)
    policies = [
        LayerPlan(0, 0, 0.3, "none", 0.3, 0.5),
        LayerPlan(1, 0, 0.2, "selective", 0.5, 1.0),
        LayerPlan(2, 0, 0.0, "full", 0.0, 0.5),
    ]
    apply_activation_plan(model.layers.values(), policies)
    inputs, targets = _batch(small_cfg)
    loss = chunked_cross_entropy(model(inputs), model.output_weight(), targets, 32)
    loss.backward(retain_graph=True)
    once = {name: p.grad.clone() for name, p in model.named_parameters()}
    loss.backward()
    for name, p in model.named_parameters():
        assert _relative(p.grad, 2 * once[name]) <= 1e-6, name


def test_no_grad_forward_and_removal_give_the_plain_output(small_cfg):
    model = materialize(build_model(small_cfg), "cpu", 0)
    inputs, _ = _batch(small_cfg)
    with torch.no_grad():
        plain = model(inputs)
    runtime = apply_activation_plan(
        model.layers.values(), [LayerPlan(i, 0, 0.5, "none", 0.5, 1.0) for i in range(3)]
    )
    with torch.no_grad():
        assert torch.equal(model(inputs), plain)
    assert runtime.layer_stats() == {}, "nothing is recorded without grad"
    with_policy = model(inputs)
    assert torch.allclose(with_policy, plain, rtol=1e-6, atol=1e-6)
    runtime.remove()
    assert all(layer.activation_policy is None for layer in model.layers.values())
    assert all(layer.cheap_op_runner is None for layer in model.layers.values())


def test_policy_for_another_layer_is_refused(small_cfg):
    model = materialize(build_model(small_cfg), "cpu", 0)
    with pytest.raises(ValueError, match="policy for layer 2 applied to layer 0"):
        apply_activation_policy(model.layers["0"], LayerPlan(2, 0, 0.0, "none", 0.0))
    remove_activation_policy(model.layers["0"])


def test_backward_prefetches_one_layer_ahead(small_cfg, monkeypatch):
    events = []
    original_on_unpack, original_fetch = LayerForward.on_unpack, LayerForward.fetch

    def on_unpack(self):
        if not self.backward_started:
            events.append(("backward", self.engine.position))
        original_on_unpack(self)

    def fetch(self):
        if not self.fetched:
            events.append(("fetch", self.engine.position))
        original_fetch(self)

    monkeypatch.setattr(LayerForward, "on_unpack", on_unpack)
    monkeypatch.setattr(LayerForward, "fetch", fetch)
    policies = [LayerPlan(i, 0, 0.5, "none", 0.0, 1.0) for i in range(3)]
    inputs, targets = _batch(small_cfg)
    _run(small_cfg, policies, inputs, targets)
    assert events == [
        ("backward", 2), ("fetch", 2), ("fetch", 1),  # the last layer fetches itself
        ("backward", 1), ("fetch", 0),               # layer 1 was prefetched by layer 2
        ("backward", 0),
    ]  # fmt: skip


def test_fetching_on_demand_brings_back_each_storage_when_it_is_unpacked(small_cfg, monkeypatch):
    """layout.activation_fetch = on_demand: no layer is fetched whole or ahead; a record's
    host part comes back in the backward of its own layer, one record at a time."""
    events = []
    backward_of = []
    original_on_unpack, original_fetch = LayerForward.on_unpack, LayerForward.fetch
    original_record_fetch = OffloadRecord.fetch

    def on_unpack(self):
        if not self.backward_started:
            backward_of.append(self.engine.position)
        original_on_unpack(self)

    def fetch(self):
        events.append(("layer fetch", self.engine.position))
        original_fetch(self)

    def record_fetch(self):
        if self.fetched is None and self.full is None:
            events.append(("record", self.owner.engine.position, backward_of[-1]))
        original_record_fetch(self)

    monkeypatch.setattr(LayerForward, "on_unpack", on_unpack)
    monkeypatch.setattr(LayerForward, "fetch", fetch)
    monkeypatch.setattr(OffloadRecord, "fetch", record_fetch)
    policies = [LayerPlan(i, 0, 1.0, "none", 0.0, 1.0) for i in range(3)]
    inputs, targets = _batch(small_cfg)
    _run(small_cfg, policies, inputs, targets, fetch="on_demand")
    assert backward_of == [2, 1, 0]
    assert not [e for e in events if e[0] == "layer fetch"], events
    records = [e for e in events if e[0] == "record"]
    assert records and all(own == current for _, own, current in records), records
    assert {own for _, own, _ in records} == {0, 1, 2}


def test_fetching_on_demand_leaves_no_device_copy_of_the_rope_tables(small_cfg):
    """The tables every layer saves go to one host copy per forward; after the forward
    nothing keeps the device tables alive, and the next step reuses the copy's slab."""
    model = materialize(build_model(small_cfg), "cpu", 0)
    policies = [
        LayerPlan(i, 0, 0.75 if i == 1 else 1.0, "none", 0.25 * (i == 1), 1.0) for i in range(3)
    ]
    policies[2] = LayerPlan(2, 0, 0.0, "full", 0.0, 1.0)
    runtime = apply_activation_plan(model.layers.values(), policies, fetch="on_demand")
    inputs, targets = _batch(small_cfg)
    for step in range(2):
        loss = chunked_cross_entropy(model(inputs), model.output_weight(), targets, 32)
        tables = [ref() for ref, _ in runtime._tables.values()]
        assert len(tables) == 2 and tables == [None, None], step  # cos and sin: gone
        if step == 0:
            allocations = runtime.pool.allocations
        loss.backward()
    assert runtime.pool.allocations == allocations


def test_an_unknown_fetch_mode_is_refused():
    with pytest.raises(ValueError, match="on_demand"):
        ActivationRuntime(fetch="later")


def test_a_core_output_in_its_own_storage_is_an_anchor_too(small_cfg):
    """Under Ulysses the output projection saves the all-to-all output, not SDPA's storage."""

    def copying_core(q, k, v):
        return causal_attention(q, k, v).clone()

    shape = LayerShape.of(small_cfg, 4)
    for policy in (LayerPlan(0, 0, 0.0, "none", 0.0), LayerPlan(0, 0, 0.3, "none", 0.3, 0.5)):
        _, _, engine, _out, _ = _forward_only(small_cfg, policy, core_fn=copying_core)
        predicted = layer_activation_bytes(shape, 2, SEQ, policy)
        o_bytes = 2 * SEQ * small_cfg.num_heads * shape.head_dim * 4
        host_o = 2 * token_split(SEQ, policy.anchor_offload_fraction, 0)[0] * o_bytes // (2 * SEQ)
        stats = engine.last_stats
        assert stats.device_bytes == predicted.device_bytes + o_bytes - host_o
        assert stats.host_bytes == predicted.host_bytes + host_o
