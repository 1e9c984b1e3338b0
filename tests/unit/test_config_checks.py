"""configs/checks.py: the one bound check of numeric fields and the JSON-object reader."""

import json
from dataclasses import dataclass

import pytest

from configs.checks import check_bounds, read_json_object
from configs.errors import ConfigError
from configs.schema import ClusterConfig
from launch.compose import compose_config
from planner.plan import Layout


@dataclass(frozen=True)
class Sizes:
    count: int = 1
    rate: float = 1.0
    pinned: int | None = None
    name: str = "x"


def _message(config, *names, **bounds):
    with pytest.raises(ConfigError) as raised:
        check_bounds(config, "demo", names, **bounds)
    return str(raised.value)


def test_below_the_bound_names_the_key_and_what_is_allowed():
    assert _message(Sizes(count=0), "count", at_least=1) == "demo.count: must be >= 1, got 0"
    assert _message(Sizes(rate=0.0), "rate", above=0) == "demo.rate: must be > 0, got 0.0"


def test_at_the_bound_passes():
    check_bounds(Sizes(count=1, rate=0.5), "demo", ("count",), at_least=1)
    check_bounds(Sizes(rate=1.0), "demo", ("rate",), above=0, at_most=1)
    check_bounds(Sizes(rate=0.0), "demo", ("rate",), at_least=0, below=1)


def test_interval_bounds_read_as_intervals():
    assert _message(Sizes(rate=1.0), "rate", at_least=0, below=1).endswith(
        "must be in [0, 1), got 1.0"
    )
    assert _message(Sizes(rate=0.0), "rate", above=0, at_most=1).endswith(
        "must be in (0, 1], got 0.0"
    )
    assert _message(Sizes(rate=float("nan")), "rate", at_least=0).endswith("got nan")


def test_infinities_are_out_of_every_bound_and_huge_integers_are_compared_exactly():
    assert _message(Sizes(rate=float("inf")), "rate", above=0) == "demo.rate: must be > 0, got inf"
    assert _message(Sizes(rate=float("-inf")), "rate", at_most=1).endswith("got -inf")
    check_bounds(Sizes(count=10**400), "demo", ("count",), at_least=1)  # no float overflow
    assert _message(Sizes(count=10**400), "count", at_most=10).startswith("demo.count: must be <=")


def test_the_first_failing_field_is_named():
    assert _message(Sizes(count=5, rate=-1.0), "count", "rate", at_least=0).startswith("demo.rate:")


def test_optional_field_takes_null_and_says_so():
    check_bounds(Sizes(pinned=None), "demo", ("pinned",), at_least=1)
    assert _message(Sizes(pinned=0), "pinned", at_least=1) == (
        "demo.pinned: must be >= 1 or null, got 0"
    )


@pytest.mark.parametrize(
    ("config", "name", "expected"),
    [
        (Sizes(count="2"), "count", "demo.count: must be an integer >= 1, got '2'"),
        (Sizes(count=True), "count", "demo.count: must be an integer >= 1, got True"),
        (Sizes(count=1.0), "count", "demo.count: must be an integer >= 1, got 1.0"),
        (Sizes(rate=True), "rate", "demo.rate: must be a number >= 1, got True"),
        (Sizes(rate="fast"), "rate", "demo.rate: must be a number >= 1, got 'fast'"),
        (Sizes(pinned="4"), "pinned", "demo.pinned: must be an integer >= 1 or null, got '4'"),
    ],
)
def test_wrong_type_is_rejected_naming_the_key(config, name, expected):
    assert _message(config, name, at_least=1) == expected


def test_an_int_is_a_number():
    check_bounds(Sizes(rate=2), "demo", ("rate",), at_least=1)


def test_misuse_is_a_programming_error_not_a_config_error():
    with pytest.raises(TypeError, match="not an int or float field"):
        check_bounds(Sizes(), "demo", ("name",), at_least=1)
    with pytest.raises(TypeError, match="needs a bound"):
        check_bounds(Sizes(), "demo", ("count",))
    with pytest.raises(TypeError, match="one lower bound"):
        check_bounds(Sizes(), "demo", ("count",), at_least=1, above=0)


COMPOSED = {
    "cluster.gpus_per_node=0": "cluster.gpus_per_node: must be >= 1, got 0",
    "cluster.peak_tflops=0": "cluster.peak_tflops: must be > 0, got 0.0",
    "planner.tp=0": "planner.tp: must be >= 1 or null, got 0",
    "planner.mip_gap=1": "planner.mip_gap: must be in [0, 1), got 1.0",
    "planner.network_efficiency=1.5": "planner.network_efficiency: must be in (0, 1], got 1.5",
    "train.micro_batch_size=0": "train.micro_batch_size: must be >= 1 or null, got 0",
    "train.lr=nan": "train.lr: must be > 0, got nan",
    "train.beta1=-0.1": "train.beta1: must be in [0, 1), got -0.1",
    "model.init_std=-1": "model.init_std: must be >= 0, got -1.0",
    "model.rope_original_max_positions=0": "model.rope_original_max_positions: must be >= 1, got 0",
}
"""Overrides the schemas refuse through check_bounds, and the one line the user reads."""


@pytest.mark.parametrize("override", COMPOSED)
def test_composed_configs_are_checked_with_it(override):
    with pytest.raises(ConfigError) as raised:
        compose_config([override])
    assert str(raised.value) == COMPOSED[override]


def test_schemas_built_in_python_reject_wrong_types():
    with pytest.raises(ConfigError, match=r"^cluster\.num_nodes: must be an integer >= 1"):
        ClusterConfig(num_nodes="2")
    with pytest.raises(ConfigError, match=r"^layout\.tp: must be an integer >= 1, got True"):
        Layout(1, True, 1, 1, 0, 1, 1, "none", "fsdp2")


def test_read_json_object(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": 1}))
    assert read_json_object(good, "plan.path") == {"a": 1}
    for text, hint in (("{nope", "is not valid JSON"), ("[1, 2]", "does not hold a JSON object")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=rf"^plan\.path: .*{hint}"):
            read_json_object(bad, "plan.path")
    with pytest.raises(ConfigError, match=r"^plan\.path: cannot read"):
        read_json_object(tmp_path / "missing.json", "plan.path")
