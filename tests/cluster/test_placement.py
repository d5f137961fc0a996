"""The preflight's placement check (`check_pool`) on Ray node records as `ray.nodes()` gives them: no Ray needed."""

from __future__ import annotations

import logging

import pytest

from pipeline.core.errors import InputError
from pipeline.rerank.preflight import check_pool, label_selector_matches


def _node(cpus: float, gpus: float = 0, **labels: str) -> dict:
    return {
        "Alive": True,
        "NodeManagerAddress": "10.0.0.1",
        "Labels": {"ray.io/node-id": "abc", **labels},
        "Resources": {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus},
    }


@pytest.mark.parametrize(
    "labels, selector, matches",
    [
        ({"role": "tokenizer"}, {"role": "tokenizer"}, True),
        ({"role": "scorer"}, {"role": "tokenizer"}, False),
        ({}, {"role": "tokenizer"}, False),
        ({"role": "scorer"}, {"role": "!tokenizer"}, True),
        ({}, {"role": "!tokenizer"}, True),  # a node without the key is "not tokenizer"
        ({"role": "b"}, {"role": "in(a, b)"}, True),
        ({"role": "b"}, {"role": "!in(a,b)"}, False),
        ({"role": "c", "zone": "x"}, {"role": "!in(a,b)", "zone": "x"}, True),
        (
            {"role": "c", "zone": "y"},
            {"role": "!in(a,b)", "zone": "x"},
            False,
        ),  # every key must match
        ({"role": "c"}, None, True),
    ],
)
def test_label_selector_matches_as_rays_scheduler(labels, selector, matches):
    assert label_selector_matches(labels, selector) is matches


CLUSTER = [
    _node(0),
    _node(4, role="tokenizer"),
    _node(4, role="tokenizer"),
    _node(2, 1, role="scorer"),
]


def test_a_pool_the_nodes_hold_passes():
    check_pool("tokenizer", 8, {"CPU": 1}, {"role": "tokenizer"}, CLUSTER, True, "the counts")
    check_pool("scorer", 1, {"CPU": 1, "GPU": 1}, None, CLUSTER, True, "the counts")


def test_a_selector_no_node_carries_is_refused_naming_the_labels_there_are():
    with pytest.raises(
        InputError,
        match=r"matches no node .*role=scorer, role=tokenizer\); start the tokenizer "
        r"machines with `ray start --labels role=cpu`",
    ):
        check_pool("tokenizer", 1, {"CPU": 1}, {"role": "cpu"}, CLUSTER, False, "the counts")
    with pytest.raises(InputError, match="`ray start --labels with labels that match it`"):
        check_pool("tokenizer", 1, {"CPU": 1}, {"role": "in(a,b)"}, CLUSTER, False, "the counts")


def test_an_actor_bigger_than_every_node_is_refused_even_where_the_cluster_may_grow():
    # fixed=False: attached to a remote cluster, whose autoscaler may add nodes, but only of the shapes it has
    with pytest.raises(
        InputError,
        match=r"a scorer actor asks for 1 CPU, 2 GPU .*the most any of its nodes has: 4 CPU, 1 GPU",
    ):
        check_pool(
            "scorer", 1, {"CPU": 1, "GPU": 2}, None, CLUSTER, False, "scorer.num_gpus_per_actor"
        )
    with pytest.raises(
        InputError,
        match=r"a tokenizer actor asks for 5 CPU .* labelled \{'role': 'tokenizer'\} has: 4 CPU",
    ):
        check_pool(
            "tokenizer", 1, {"CPU": 5}, {"role": "tokenizer"}, CLUSTER, False, "tokenizer.num_cpus"
        )


def test_more_actors_than_the_nodes_hold_is_an_error_on_a_fixed_ray_and_a_warning_on_a_remote_one(
    caplog,
):
    # 3 scorers of 1 GPU on one GPU node; 9 tokenizers of 1 CPU on 8 labelled CPUs (the head's 0 do not count)
    for pool in (
        ("scorer", 3, {"CPU": 1, "GPU": 1}, None),
        ("tokenizer", 9, {"CPU": 1}, {"role": "tokenizer"}),
    ):
        with pytest.raises(InputError, match=f"the {pool[0]} pool needs {pool[1]} actors"):
            check_pool(*pool, CLUSTER, True, "the counts")
        with caplog.at_level(logging.WARNING, logger="rerank"):
            check_pool(*pool, CLUSTER, False, "the counts")
        assert (
            f"the {pool[0]} pool needs {pool[1]} actors" in caplog.text
            and "autoscaler" in caplog.text
        )
        caplog.clear()
