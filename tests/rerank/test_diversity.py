"""The diversity step (rerank.diversity): MMR against a naive reference, the similarity of both modalities, missing
vectors, auto's lambda, the parsing of a lambda, the list-diversity metrics and the settings that feed them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexing import fields as F
from indexing.errors import ConfigError
from rerank.diversity import (AUTO, DiversityConfig, choose_lambda, diversify, diversity_label, eligible, history_strength, intra_list_distance,
                              mmr, normalize_relevance, one_hot, parse_diversity, query_qualifiers, similarity_matrix, stack_rows)
from rerank.datasets.metrics import distinct_at_k, ild_at_k


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("value,expected", [(0, 0.0), (1, 1.0), (0.3, 0.3), ("0.25", 0.25), (" AUTO ", AUTO), ("auto", AUTO), (np.float32(0.5), 0.5)])
def test_parse_diversity_accepts_a_lambda_in_range_or_auto(value, expected):
    assert parse_diversity(value) == expected


@pytest.mark.parametrize("value", [-0.01, 1.0001, 2, float("nan"), float("inf"), True, None, "high", "", [0.3], {"lambda": 0.3}])
def test_parse_diversity_refuses_everything_else_naming_the_range(value):
    with pytest.raises(ConfigError, match=r'a number in \[0, 1\] or "auto"'):
        parse_diversity(value)


def test_labels_and_config_checks():
    assert [diversity_label(v) for v in (0.0, 0.1, 1.0, AUTO)] == ["0", "0.1", "1", "auto"]
    with pytest.raises(ConfigError, match="cannot all be 0"):
        DiversityConfig(text_weight=0, image_weight=0, colour_weight=0, colour_name_weight=0)
    with pytest.raises(ConfigError, match="auto_max"):
        DiversityConfig(auto_max=1.5)
    with pytest.raises(ConfigError, match="depth"):
        DiversityConfig(depth=0)
    with pytest.raises(ConfigError, match="text_weight"):
        DiversityConfig(text_weight=-1)


# ------------------------------------------------------------------ similarity
def _naive_similarity(text, tmask, image, imask, wt, wi):
    n = len(text)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            num = den = 0.0
            for rows, mask, w in ((text, tmask, wt), (image, imask, wi)):
                a, b = rows[i], rows[j]
                if mask[i] and mask[j] and np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0:
                    num += w * float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                    den += w
            out[i, j] = min(max(num / den, 0.0), 1.0) if den else 0.0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_similarity_matches_a_naive_per_pair_computation(seed):
    rng = np.random.default_rng(seed)
    n = 12
    text, image = rng.standard_normal((n, 6)), rng.standard_normal((n, 5))
    tmask, imask = rng.random(n) > 0.2, rng.random(n) > 0.4
    text[~tmask] = 0.0
    got = similarity_matrix(text, tmask, image, imask, text_weight=0.7, image_weight=0.3)
    want = _naive_similarity(text, tmask, image, imask, 0.7, 0.3)
    assert got.shape == (n, n) and np.allclose(got, want, atol=1e-5)
    assert got.min() >= 0.0 and got.max() <= 1.0 + 1e-6
    # every present pair gets both modalities when all are present: the plain weighted mean
    full = similarity_matrix(text, None, image, None, text_weight=0.7, image_weight=0.3)
    assert np.allclose(full, _naive_similarity(text, np.ones(n, bool), image, np.ones(n, bool), 0.7, 0.3), atol=1e-5)


def test_a_candidate_without_vectors_is_maximally_dissimilar():
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    image = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    s = similarity_matrix(text, None, image, None)
    assert s[0, 1] == pytest.approx(1.0)  # they share only the text: identical there
    assert s[2, 0] == s[0, 2] == s[2, 1] == 0.0
    # the colour descriptors are a third term, weighted like the others
    colour = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    s3 = similarity_matrix(text, None, image, None, colour=colour, colour_weight=1.0, text_weight=1.0, image_weight=1.0)
    assert s3[0, 1] == pytest.approx(0.5)  # text 1, colour 0 (no shared photo)
    assert s3[0, 2] == pytest.approx(1.0)  # only the colour is shared: identical there


def test_colour_names_count_as_one_more_modality():
    """Colour names (the catalog's, or the photo's completion) as one-hot rows: the same name (any case) is 1, another
    0, an unknown one is absent (the pair uses the other modalities); MMR with them spreads the names."""
    mat, mask = one_hot(["Black", " black", "Navy Blue", None, "", "red"])
    assert mask.tolist() == [True, True, True, False, False, True] and mat.shape == (6, 3)
    sim = similarity_matrix(np.zeros((6, 2), np.float32), None, None, None, text_weight=0, image_weight=0,
                            colour_names=["Black", " black", "Navy Blue", None, "", "red"], colour_name_weight=1.0)
    assert sim[0, 1] == 1.0 and sim[0, 2] == 0.0 and sim[0, 3] == 0.0 and sim[3, 3] == 0.0
    only, omask = one_hot(["Black", "Red", "Blue"], only=[2])
    assert omask.tolist() == [False, False, True] and only.shape == (3, 1)
    assert one_hot([None, " "])[0] is None
    # eight near-identical products (the same text vector), four black first: with the names, auto's lambda puts
    # four colours in the top four; without them, all look alike and the model's order stays
    rng = np.random.default_rng(3)
    text = np.tile(rng.standard_normal(16).astype(np.float32), (8, 1)) + rng.standard_normal((8, 16)).astype(np.float32) * 0.01
    names = ["Black"] * 4 + ["Red", "Blue", "White", "Green"]
    rel = np.linspace(1.0, 0.9, 8)
    cfg = DiversityConfig(colour_name_weight=1.0, depth=4)
    got = diversify(rel, 0.9, text=text, colour_names=names, config=cfg)
    assert len({names[i] for i in got.order[:4]}) == 4
    plain = diversify(rel, 0.9, text=text, config=DiversityConfig(depth=4))
    assert {names[i] for i in plain.order[:4]} == {"Black"}
    with pytest.raises(ConfigError, match="colour_name_weight"):
        DiversityConfig(colour_name_weight=-1.0)


def test_stack_rows():
    m, ok = stack_rows([[1, 2], None, np.array([3, 4], dtype=np.float32), [5]])
    assert m.shape == (4, 2) and ok.tolist() == [True, False, True, False] and m[2].tolist() == [3.0, 4.0]
    none, mask = stack_rows([None, None])
    assert none is None and mask.tolist() == [False, False]


# ------------------------------------------------------------------ MMR
def _naive_mmr(rel, sim, lam, depth=None):
    n = len(rel)
    depth = n if depth is None else depth
    chosen: list[int] = []
    left = list(range(n))
    while left and len(chosen) < depth:
        best = max(left, key=lambda i: ((1 - lam) * rel[i] - lam * max((sim[i, j] for j in chosen), default=0.0), -i))
        chosen.append(best)
        left.remove(best)
    return chosen + left


@pytest.mark.parametrize("seed,lam,depth", [(0, 0.3, None), (1, 0.7, None), (2, 1.0, None), (3, 0.5, 5), (4, 0.05, None)])
def test_mmr_equals_the_textbook_greedy(seed, lam, depth):
    rng = np.random.default_rng(seed)
    n = 30
    rel = np.sort(rng.random(n))[::-1]
    vecs = rng.standard_normal((n, 8))
    sim = similarity_matrix(vecs, None, None, None, image_weight=0)
    got = mmr(rel, sim, lam, depth=depth)
    assert list(got.order) == _naive_mmr(rel, sim, lam, depth)
    assert sorted(got.order) == list(range(n))
    placed = [got.max_similarity[i] for i in got.order]
    assert placed[0] == 0.0 and all(p is not None for p in placed[: depth or n])
    if depth:
        assert all(p is None for p in placed[depth:])


def _reference_diversify(rel_scores, lam, text, tmask, image, imask, colour, cmask, cfg, depth):
    """The step written out plainly: every pair's weighted mean of the cosines the two share (a loop), then the
    textbook greedy over all the candidates, everything in relevance order."""
    n = len(rel_scores)
    rel = normalize_relevance(rel_scores, cfg.relevance_window)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            num = den = 0.0
            for rows, mask, w in ((text, tmask, cfg.text_weight), (image, imask, cfg.image_weight), (colour, cmask, cfg.colour_weight)):
                a, b = rows[i], rows[j]
                if mask[i] and mask[j] and np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0:
                    num += w * float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                    den += w
            sim[i, j] = min(max(num / den, 0.0), 1.0) if den else 0.0
    order = _naive_mmr(rel, sim, lam, depth)
    placed = {j: max((sim[j, k] for k in order[:p]), default=0.0) for p, j in enumerate(order[: depth or n])}
    return order, placed


@pytest.mark.parametrize("seed,lam,depth", [(0, 0.9, 30), (1, 0.3, 30), (2, 0.05, 10), (3, 0.6, None), (4, 0.02, 30), (5, 1.0, 30), (6, 0.15, 5)])
def test_the_fast_step_equals_a_plain_reference_on_random_candidates(seed, lam, depth):
    """diversify as the rerank call runs it (vectors in the first stage's order with ``rows`` naming the relevance
    order, colour descriptors as per-document rows with gaps, only the candidates that can move compared) against
    the plain computation over all of them: the same order, the same max similarities."""
    rng = np.random.default_rng(seed)
    n = 60
    text = rng.standard_normal((n, 16)).astype(np.float32)
    image = rng.standard_normal((n, 12)).astype(np.float32)
    tmask, imask = rng.random(n) > 0.1, rng.random(n) > 0.3
    text[~tmask] = 0.0
    image[rng.random(n) > 0.9] = np.nan  # a non-finite row is absent, wherever it comes from
    colour = [None if rng.random() < 0.25 else np.abs(rng.standard_normal(9)).astype(np.float32) for _ in range(n)]
    scores = rng.standard_normal(n) * 3.0
    cfg = DiversityConfig(depth=None) if depth is None else DiversityConfig()  # None: MMR fills every position
    rows = np.argsort(-scores, kind="stable")  # the candidates in relevance order; the vectors stay where they are
    got = diversify(scores[rows], lam, text=text, text_mask=tmask, image=image, image_mask=imask, colour=colour, rows=rows, config=cfg, depth=depth)
    cmask = np.array([c is not None for c in colour])
    dense = np.stack([c if c is not None else np.zeros(9, np.float32) for c in colour])
    want, placed = _reference_diversify(scores[rows], lam, text[rows], tmask[rows], image[rows], imask[rows], dense[rows], cmask[rows], cfg, depth)
    assert list(got.order) == want
    for j, s in placed.items():
        assert got.max_similarity[j] == pytest.approx(s, abs=1e-5)
    assert all(got.max_similarity[j] is None for j in want[len(placed):])
    # the same with every input already in relevance order and the colours stacked by the caller
    dense_rows, cm = stack_rows([colour[i] for i in rows])
    again = diversify(scores[rows], lam, text=text[rows], text_mask=tmask[rows], image=image[rows], image_mask=imask[rows], colour=dense_rows,
                      colour_mask=cm, config=cfg, depth=depth)
    assert again.order == got.order


@pytest.mark.parametrize("lam,depth", [(0.9, 30), (1.0, 30), (0.3, 5), (0.9, None)])
def test_tiers_of_the_intent_bound_are_diversified_each_on_its_own(lam, depth):
    """The intent bound's tiers: no product goes above one of a better tier (not even at lambda 1), the first tier's
    order is what diversifying it alone gives (the lower tiers' offset scores do not squeeze its relevance), and the
    next tier fills the positions left after it."""
    rng = np.random.default_rng(7)
    n = 40
    text = rng.standard_normal((n, 16)).astype(np.float32)
    image = rng.standard_normal((n, 12)).astype(np.float32)
    model = np.sort(rng.standard_normal(n))[::-1]
    tiers = np.zeros(n, dtype=int)
    tiers[rng.choice(n, 28, replace=False)] = 1  # 12 products in the first tier, as a type-only query in retrieve mode
    rows = np.lexsort((-model, tiers))  # relevance order: tier first, then the model's score
    bounded = model - tiers * (model.max() - model.min() + 1.0)
    cfg = DiversityConfig()
    got = diversify(bounded[rows], lam, text=text, image=image, rows=rows, tiers=tiers[rows], config=cfg, depth=depth)
    placed_tiers = tiers[rows][list(got.order)]
    assert (np.diff(placed_tiers) >= 0).all()
    first = int((tiers == 0).sum())
    alone = diversify(model[rows[:first]], lam, text=text, image=image, rows=rows[:first], config=cfg, depth=depth)
    assert list(got.order[:first]) == list(alone.order)
    positions = depth if depth is not None else cfg.depth  # None: the config's depth, for the tiers together
    rest = diversify(model[rows[first:]], lam, text=text, image=image, rows=rows[first:], config=cfg, depth=max(positions - first, 0))
    assert list(got.order[first:]) == [first + k for k in rest.order]
    # without the tiers the offset squeezes the first tier (its relevance window reaches into the second): at auto's
    # lambda for a vague query the first tier's order then follows dissimilarity far more
    squeezed = diversify(bounded[rows], lam, text=text, image=image, rows=rows, config=cfg, depth=depth)
    if lam == cfg.auto_max:
        assert list(squeezed.order[:first]) != list(alone.order)
    with pytest.raises(ConfigError, match="non-decreasing"):
        diversify(bounded[rows], lam, text=text, rows=rows, tiers=tiers[rows][::-1], config=cfg)
    with pytest.raises(ConfigError, match="one tier per candidate"):
        diversify(bounded[rows], lam, text=text, rows=rows, tiers=[0, 1], config=cfg)


def test_only_the_candidates_that_can_take_a_position_are_compared():
    rel = normalize_relevance(np.linspace(10.0, 0.0, 100), 0.3)  # evenly spread: the 30th is 0, the last about -2.4
    assert eligible(rel, 0.05, 30) < 40  # a weak lambda: little beyond the depth can move up
    assert eligible(rel, 0.5, 30) > eligible(rel, 0.2, 30) > eligible(rel, 0.05, 30) >= 30
    assert eligible(rel, 0.9, 30) == 100 and eligible(rel, 1.0, 30) == 100 and eligible(rel, 0.05, 100) == 100
    # the bound: a candidate below the depth-th relevance by more than lam / (1 - lam) can never be chosen ...
    lam, cut = 0.2, eligible(rel, 0.2, 30)
    assert rel[cut - 1] >= rel[29] - lam / (1 - lam) > rel[cut]
    # ... even against copies of everything placed above it (similarity 1 to all but itself)
    sim = np.ones((100, 100), dtype=np.float32)
    np.fill_diagonal(sim, 0.0)
    assert max(mmr(rel, sim, lam, depth=30).order[:30]) < cut


def test_lambda_zero_is_the_model_order_and_near_duplicates_are_spread():
    rel = np.array([1.0, 0.99, 0.98, 0.9, 0.89])
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    vecs = np.array([a, a, a, b, b])
    minmax = DiversityConfig(relevance_window=None)
    assert list(diversify(rel, 0.0, text=vecs, config=minmax).order) == [0, 1, 2, 3, 4]
    # three copies on top: with some diversity the best of the other kind moves up to second
    assert list(diversify(rel, 0.5, text=vecs, config=minmax).order)[:3] == [0, 3, 1]
    # a window measures relevance against the score at its mark (here the median): the other kind sits far below
    # it, so the same lambda keeps the copies; a closer call lets it up
    median = DiversityConfig(relevance_window=0.5)
    assert list(diversify(rel, 0.5, text=vecs, config=median).order)[:3] == [0, 1, 2]
    assert list(diversify(np.array([1.0, 0.99, 0.98, 0.975, 0.97]), 0.5, text=vecs, config=median).order)[:2] == [0, 3]
    # the default window (the 30% mark: the second of five) spreads the same close scores wider: a copy stays second
    assert list(diversify(np.array([1.0, 0.99, 0.98, 0.975, 0.97]), 0.5, text=vecs).order)[:2] == [0, 1]
    assert list(diversify(np.array([1.0, 0.99, 0.98, 0.975, 0.97]), 0.9, text=vecs).order)[:2] == [0, 3]
    # ties in the MMR value go to the better-ranked candidate
    assert list(mmr(np.ones(3), np.zeros((3, 3)), 0.5).order) == [0, 1, 2]


def test_candidates_without_vectors_keep_their_relevance_order_and_never_fail():
    rel = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.7])
    v = [1.0, 0.0]
    text = np.array([v, v, [0, 0], v, [0, 0], [0, 0]], dtype=np.float32)
    mask = np.array([True, True, False, True, False, False])
    got = list(diversify(rel, 0.6, text=text, text_mask=mask, image=None).order)
    assert sorted(got) == list(range(6))
    missing = [i for i in got if not mask[i]]
    assert missing == [2, 4, 5]  # their own relevance order
    assert got.index(2) < got.index(1)  # maximally dissimilar: ahead of a near-copy of the first
    # no vectors at all: the relevance order
    assert list(diversify(rel, 0.9, text=np.zeros((6, 3)), text_mask=np.zeros(6, bool)).order) == list(range(6))


def test_relevance_normalization():
    assert normalize_relevance([3.0, 2.0, 1.0]).tolist() == [1.0, 0.5, 0.0]
    assert normalize_relevance([2.0, 2.0]).tolist() == [1.0, 1.0]
    w = normalize_relevance([4.0, 3.0, 2.0, -20.0], window=0.5)  # the window's edge: the 2nd of 4
    assert w[0] == 1.0 and w[1] == 0.0 and w[2] == -1.0 and w[3] < -10


# ------------------------------------------------------------------ auto
HEELS = [{F.ARTICLE_TYPE: "Heels", F.CATEGORY: "Footwear > Shoes > Heels", F.COLOUR: "Black", F.GENDER: "Women"},
         {F.ARTICLE_TYPE: "Heels", F.CATEGORY: "Footwear > Shoes > Heels", F.COLOUR: "Red", F.GENDER: "Women", F.USAGE: "Casual"},
         None]


def test_query_qualifiers_are_the_attribute_words_beyond_the_product_type():
    assert query_qualifiers("heels", HEELS).words == ()
    assert query_qualifiers("Heel shoes", HEELS).words == ()
    q = query_qualifiers("black heels for ladies", HEELS)
    assert q.words == ("black", "lady") and q.attributes == {"black": F.COLOUR, "lady": F.GENDER} and q.type_known
    assert query_qualifiers("women's casual heels", HEELS).attributes == {"women": F.GENDER, "casual": F.USAGE}
    assert query_qualifiers("gray stilettos", HEELS).words == ("gray",)  # a colour word no candidate spells that way
    assert query_qualifiers("stiletto pumps", HEELS).words == ()  # other names of the type: still vague
    assert query_qualifiers("t-shirts", [{F.ARTICLE_TYPE: "Tshirts"}]).words == ()
    assert query_qualifiers("heels", HEELS, has_image=True).words == ("<query photo>",)
    untyped = query_qualifiers("red cordless drill 18v", [{F.TITLE: "drill"}])
    assert untyped.words == ("red",) and not untyped.type_known


def test_history_strength_grows_with_events_and_their_weight():
    assert history_strength(()) == 0.0
    one_view, purchases = history_strength(("view",)), history_strength(("purchase",) * 3)
    assert 0 < one_view < history_strength(("view",) * 4) < purchases < 1.0
    assert history_strength(("purchase",) * 20) > 0.99


def test_auto_is_strong_for_a_vague_query_without_history_and_weak_otherwise():
    cfg = DiversityConfig(auto_max=0.8)
    vague = choose_lambda(AUTO, query="heels", docs=HEELS, config=cfg)
    assert vague.value == pytest.approx(0.8) and "vague query" in vague.reason and "no history" in vague.reason
    named = choose_lambda(AUTO, query="black heels", docs=HEELS, config=cfg)
    assert 0 < named.value < 0.3 * vague.value and "'black' (colour)" in named.reason
    assert choose_lambda(AUTO, query="black heels for ladies", docs=HEELS, config=cfg).value < named.value
    known = choose_lambda(AUTO, query="heels", docs=HEELS, events=("purchase",) * 8 + ("view",) * 10, config=cfg)
    assert known.value < 0.02 and "history of 18 events" in known.reason
    some = choose_lambda(AUTO, query="heels", docs=HEELS, events=("view", "click"), config=cfg)
    assert known.value < some.value < vague.value
    d = named.to_dict()
    assert d["requested"] == AUTO and d["qualifiers"] == ["black"] and d["history_events"] == 0 and d["lambda"] == named.value
    fixed = choose_lambda(0.3, query="black heels", docs=HEELS, source="default")
    assert fixed.value == 0.3 and "default" in fixed.reason and "qualifiers" not in fixed.to_dict()
    with pytest.raises(ConfigError):
        choose_lambda(1.2, query="heels")


# ------------------------------------------------------------------ list metrics
def test_list_diversity_metrics():
    assert intra_list_distance(np.eye(1)) == 0.0
    assert intra_list_distance(np.array([[1, 0.2], [0.2, 1]])) == pytest.approx(0.8)
    vec = {"a": [1.0, 0.0], "b": [1.0, 0.0], "c": [0.0, 1.0], "d": None}
    assert ild_at_k(["a", "b"], vec) == pytest.approx(0.0, abs=1e-6)
    assert ild_at_k(["a", "c"], vec) == pytest.approx(1.0)
    assert ild_at_k(["a", "b", "c"], vec) == pytest.approx(2 / 3)
    assert ild_at_k(["a", "d"], vec) == pytest.approx(1.0)  # no vectors: maximally dissimilar
    assert ild_at_k(["a", "b", "c"], vec, k=2) == pytest.approx(0.0, abs=1e-6)
    colours = {"a": "Black", "b": "black", "c": "Red", "d": "", "e": None}
    assert distinct_at_k(["a", "b", "c", "d", "e", "zz"], colours) == 2
    assert distinct_at_k(["a", "c"], colours, k=1) == 1


# ------------------------------------------------------------------ settings (the process edge)
def test_settings_diversity_default_per_index_and_weights(monkeypatch):
    from workers.settings import load_settings

    monkeypatch.setenv("FUSIONRANK_DIVERSITY", "auto")
    monkeypatch.setenv("FUSIONRANK_DIVERSITY_BY_INDEX", '{"products-b": 0.2}')
    monkeypatch.setenv("FUSIONRANK_DIVERSITY_IMAGE_WEIGHT", "0.25")
    s = load_settings()
    assert s.diversity == AUTO and s.diversity_for("products") == AUTO and s.diversity_for("products-b") == 0.2
    cfg = s.diversity_config()
    assert cfg.image_weight == 0.25 and cfg.text_weight == 0.5 and isinstance(cfg, DiversityConfig)
    assert s.redacted()["diversity"] == AUTO
    monkeypatch.setenv("FUSIONRANK_DIVERSITY", "1.5")
    with pytest.raises(ConfigError, match=r'FUSIONRANK_DIVERSITY: .*a number in \[0, 1\] or "auto"'):
        load_settings()
    monkeypatch.setenv("FUSIONRANK_DIVERSITY", "0")
    monkeypatch.setenv("FUSIONRANK_DIVERSITY_BY_INDEX", '{"products": "lots"}')
    with pytest.raises(ConfigError, match="products"):
        load_settings()
    monkeypatch.delenv("FUSIONRANK_DIVERSITY_BY_INDEX")
    assert load_settings().diversity == 0.0 and math.isclose(load_settings().diversity_config().auto_max, 0.9)
