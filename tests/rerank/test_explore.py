"""Exploration (rerank.explore): which searches explore, and how an exploring page is drawn from the model's order."""

from __future__ import annotations

from collections import Counter

import pytest

from indexing.errors import ConfigError
from rerank.explore import ExploreConfig, explore_order, explores

IDS = [f"q-{i}" for i in range(4000)]


def test_the_share_of_searches_that_explore_follows_the_setting_and_the_id():
    assert not any(explores(q, ExploreConfig()) for q in IDS)  # default: off
    assert all(explores(q, ExploreConfig(share=1.0)) for q in IDS)
    part = [q for q in IDS if explores(q, ExploreConfig(share=0.25))]
    assert 0.22 < len(part) / len(IDS) < 0.28
    # the same id gets the same answer, and a larger share keeps every search a smaller one explores
    assert all(explores(q, ExploreConfig(share=0.5)) for q in part)
    assert explore_order(100, "q-1", ExploreConfig()) is None


def test_an_exploring_page_keeps_the_top_and_draws_the_rest_from_the_models_ranks():
    cfg = ExploreConfig(share=1.0, from_position=4, depth=50)
    for q in IDS[:200]:
        order = explore_order(80, q, cfg)
        assert sorted(order) == list(range(80))  # a permutation: nothing lost, nothing repeated
        assert order[:3] == [0, 1, 2]  # positions 1-3 keep the model's order
        assert sorted(order[3:50]) == list(range(3, 50))  # positions 4-50 hold the model's ranks 4-50
        assert order[50:] == list(range(50, 80))  # below the depth: the model's order
    assert explore_order(80, "q-7", cfg) == explore_order(80, "q-7", cfg)  # a repeated id: the same page
    assert len({tuple(explore_order(80, q, cfg)) for q in IDS[:50]}) == 50
    # short lists: what is there is drawn; nothing to draw below the kept top: no exploration
    assert sorted(explore_order(6, "q-1", cfg)) == list(range(6)) and explore_order(6, "q-1", cfg)[:3] == [0, 1, 2]
    assert explore_order(4, "q-1", cfg) is None


def test_higher_model_ranks_are_drawn_first_in_proportion_to_one_over_rank():
    cfg = ExploreConfig(share=1.0, from_position=4, depth=50)
    first = Counter(explore_order(50, q, cfg)[3] for q in IDS)  # the model rank shown at position 4
    # P(rank r first) = (1/r) / sum(1/4 .. 1/50): rank 4 about 0.098, rank 40 about 0.0098 (ten times rarer)
    total = sum(1 / r for r in range(4, 51))
    assert abs(first[3] / len(IDS) - (1 / 4) / total) < 0.02
    assert 5 < first[3] / max(first[39], 1) < 20


@pytest.mark.parametrize("kw", [{"share": -0.1}, {"share": 1.5}, {"from_position": 0}, {"from_position": 10, "depth": 5}])
def test_bad_settings_are_refused_with_what_is_allowed(kw):
    with pytest.raises(ConfigError, match="explore"):
        ExploreConfig(**kw)


def test_the_settings_build_the_config_and_refuse_a_depth_above_the_first_position():
    from workers.settings import load_settings

    s = load_settings(explore_share=0.1, explore_from_position=3, explore_depth=20)
    assert s.explore_config() == ExploreConfig(share=0.1, from_position=3, depth=20)
    assert load_settings().explore_config() == ExploreConfig()
    with pytest.raises(ConfigError, match="explore_depth"):
        load_settings(explore_from_position=10, explore_depth=5)
