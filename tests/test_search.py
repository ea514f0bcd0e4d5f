import itertools
import math

import pytest
import torch

from conftest import unit
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods import ape_refine as R
from fewclip.methods import search as S


def test_grids_match_published_formulas():
    assert torch.allclose(S.tip_grid(7, 200)[:3], torch.tensor([0.1, 0.1345, 0.169]), atol=1e-6)
    assert S.tip_grid(7, 200).numel() == 200 and float(S.tip_grid(7, 200)[-1]) < 7
    assert torch.allclose(S.gamma_grid(1, 20)[:3], torch.tensor([0.0, 0.05, 0.1]))
    assert float(S.gamma_grid(0.5, 5)[-1]) == pytest.approx(0.4)


def test_first_argmax_is_row_major_first_maximum():
    counts = torch.tensor([[[1, 5], [5, 0]], [[5, 5], [2, 2]]])
    assert S.first_argmax(counts) == (0, 0, 1)


def pairwise_criterion(pools):
    """The definition of APE's S as a double sum over pairs of classes (slow; the oracle of the closed form)."""
    dim = pools[0].shape[1]
    num = torch.zeros(dim, dtype=torch.float64)
    den = 0.0
    for i, pi in enumerate(pools):
        for j, pj in enumerate(pools):
            if i == j:
                continue
            num += torch.einsum("md,nd->d", pi.double(), pj.double())
            den += pi.shape[0] * pj.shape[0]
    return num / den


@pytest.mark.parametrize("unequal", [False, True])
def test_criterion_closed_form_equals_pairwise_definition(unequal):
    g = torch.Generator().manual_seed(0)
    c, k, d = 5, 3, 16
    text = unit(torch.randn(c, d, generator=g, dtype=torch.float64))
    counts = [3, 1, 2, 3, 0] if unequal else [k] * c
    labels = torch.repeat_interleave(torch.arange(c), torch.tensor(counts))
    keys = unit(torch.randn(labels.numel(), d, generator=g, dtype=torch.float64))
    pools = [torch.cat([text[i : i + 1], keys[labels == i]]) for i in range(c)]
    closed = R.ape_criterion(text, keys, labels)
    assert torch.allclose(closed, pairwise_criterion(pools), atol=1e-12)
    # equal pools: the upstream normaliser C(C-1)M^2
    if not unequal:
        brute = torch.zeros(d, dtype=torch.float64)
        for i, j in itertools.permutations(range(c), 2):
            for m, n in itertools.product(range(k + 1), repeat=2):
                brute += pools[i][m] * pools[j][n]
        assert torch.allclose(closed, brute / (c * (c - 1) * (k + 1) ** 2), atol=1e-12)


def test_text_pool_criterion_and_variance_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs (i != j): channel 0 products 1*0, 1*1, 0*1, 0*1, 1*1, 1*0 -> sum 2 over 6 pairs
    assert torch.allclose(R.ape_criterion(text), torch.tensor([2 / 6, 0.0], dtype=torch.float64))
    assert torch.allclose(R.interclass_variance(text), torch.tensor([1 / 3, 1 / 3], dtype=torch.float64))


def test_channel_selection_breaks_ties_by_lower_index():
    text = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    crit = torch.zeros(4, dtype=torch.float64)
    assert R.select_channels(text, crit, 3, 0.5, 0.5).tolist() == [0, 1, 2]
    crit = torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=torch.float64)  # lower similarity ranks channel 1 first
    assert R.select_channels(text, crit, 2, 0.5, 0.5).tolist() == [1, 0]


def test_kl_weight_formula():
    g = torch.Generator().manual_seed(1)
    keys, text = unit(torch.randn(6, 5, generator=g)), unit(torch.randn(3, 5, generator=g))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    d = R.kl_divergence_log2(keys, text, labels)
    probs = torch.softmax(keys.double() @ text.double().T, dim=1)
    for k in range(6):
        full = sum(
            (1.0 if c == labels[k] else 0.0)
            * math.log2(((1.0 if c == labels[k] else 0.0) + 1e-6) / (float(probs[k, c]) + 1e-6))
            for c in range(3)
        )
        assert float(d[k]) == pytest.approx(full, abs=1e-6)


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2, 2], [2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 1]])
def test_class_layout_padded_and_index_add_agree(labels):
    labels = torch.tensor(labels)
    g = torch.Generator().manual_seed(2)
    phi = torch.rand(4, labels.numel(), generator=g)
    w = torch.rand(2, labels.numel(), generator=g)
    layout = S.ClassLayout(labels, 4)  # class 3 has no entries
    out = layout.class_sum(layout.arrange(phi), layout.arrange_weights(w))
    naive = torch.zeros(2, 4, 4)
    for gi, m, k in itertools.product(range(2), range(4), range(labels.numel())):
        naive[gi, m, labels[k]] += phi[m, k] * w[gi, k]
    assert torch.allclose(out, naive, atol=1e-6)
    assert layout.padded == (len(set(labels.tolist())) == 3 and labels.numel() == 7)


def naive_counts(z0, g, labels, alphas):
    out = torch.zeros(g.shape[0], alphas.numel(), dtype=torch.long)
    for b in range(g.shape[0]):
        for j, a in enumerate(alphas):
            out[b, j] = int(((z0 + a * g[b]).argmax(1) == labels).sum())
    return out


@pytest.mark.parametrize("seed", range(5))
def test_alpha_scan_equals_nested_loop(seed):
    g = torch.Generator().manual_seed(seed)
    m, c = 300, 7
    z0 = torch.randn(m, c, generator=g) * 3
    gg = torch.randn(4, m, c, generator=g)
    labels = torch.randint(0, c, (m,), generator=g)
    alphas = torch.linspace(0.1, 6.0, 17)
    assert torch.equal(
        S.count_correct_along_alpha(z0, gg, labels, alphas, budget=20000), naive_counts(z0, gg, labels, alphas)
    )
    shuffled = alphas[torch.randperm(17, generator=g)]  # not ascending: evaluated directly, same answer
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, shuffled), naive_counts(z0, gg, labels, shuffled))


@pytest.mark.parametrize("size", [1, 2, 6])
def test_alpha_scan_on_grids_of_one_or_a_few_points_equals_nested_loop(size):
    # one α leaves no segment between anchors (it used to crash); two are both anchors; six have one segment
    g = torch.Generator().manual_seed(size)
    z0, gg = torch.randn(80, 4, generator=g), torch.rand(2, 80, 4, generator=g)
    labels = torch.randint(0, 4, (80,), generator=g)
    alphas = torch.linspace(0.5, 3.0, size)
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, alphas), naive_counts(z0, gg, labels, alphas))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", [5, 60])
def test_alpha_scan_with_nonnegative_terms_equals_nested_loop(seed, classes):
    # cache terms are sums of positive values (logits grow with α): the monotone path; 60 classes give rows
    # with more than 8 and more than 32 candidates, so every tier is exercised
    g = torch.Generator().manual_seed(seed)
    m = 250
    z0 = torch.randn(m, classes, generator=g) * 2
    gg = torch.rand(3, m, classes, generator=g) ** 3
    labels = torch.randint(0, classes, (m,), generator=g)
    alphas = S.tip_grid(7, 23)
    expected = naive_counts(z0, gg, labels, alphas)
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, alphas), expected)
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, alphas, budget=500), expected)


def test_alpha_scan_respects_lowest_index_tie_rule():
    # row 0: classes 0 and 1 tie exactly at every alpha -> predicted 0 (correct for label 0, wrong for label 1)
    z0 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    g = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])
    labels = torch.tensor([0, 1])
    alphas = torch.tensor([0.5, 1.0, 2.0])
    assert S.count_correct_along_alpha(z0, g, labels, alphas).tolist() == [[1, 1, 1]]


def nested_loop_search(z0, affinity, labels_cache, weights, labels, betas, alphas, num_classes):
    """The upstream search: β outer, α, then weight candidate; strict '>' keeps the first maximiser."""
    onehot = torch.nn.functional.one_hot(labels_cache, num_classes).float()
    best, choice = -1, None
    for i, beta in enumerate(betas):
        for j, alpha in enumerate(alphas):
            for l in range(weights.shape[0]):
                logits = z0 + alpha * (torch.exp(-beta * (1 - affinity)) @ (weights[l][:, None] * onehot))
                acc = int((logits.argmax(1) == labels).sum())
                if acc > best:
                    best, choice = acc, (i, j, l)
    return choice, best


@pytest.mark.parametrize("seed", range(3))
def test_cache_search_reproduces_nested_loop_choice(seed):
    g = torch.Generator().manual_seed(seed)
    c, n, m, d = 4, 10, 40, 6
    labels_cache = torch.randint(0, c, (n,), generator=g)
    keys, f = unit(torch.randn(n, d, generator=g)), unit(torch.randn(m, d, generator=g))
    text = unit(torch.randn(c, d, generator=g))
    labels = torch.randint(0, c, (m,), generator=g)
    z0, affinity = 100 * f @ text.T, f @ keys.T
    weights = torch.exp(torch.tensor([0.0, 0.3, 0.6])[:, None] * torch.rand(n, generator=g)[None])
    betas, alphas = S.tip_grid(7, 9), S.tip_grid(7, 6)
    counts = S.cache_search(z0, affinity, S.ClassLayout(labels_cache, c), weights, labels, betas, alphas)
    choice, best = nested_loop_search(z0, affinity, labels_cache, weights, labels, betas.tolist(), alphas.tolist(), c)
    assert S.first_argmax(counts) == choice
    assert int(counts.max()) == best


def test_cache_search_constructed_ties_pick_smallest_beta_then_alpha_then_gamma():
    # Every candidate gives the same accuracy when the cache term is irrelevant to the arg-max:
    # two well-separated rows whose zero-shot logits dominate. The first grid point must win.
    z0 = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    affinity = torch.tensor([[0.2, 0.1], [0.1, 0.2]])
    weights = torch.ones(3, 2)
    counts = S.cache_search(
        z0,
        affinity,
        S.ClassLayout(torch.tensor([0, 1]), 2),
        weights,
        torch.tensor([0, 1]),
        S.tip_grid(7, 5),
        S.tip_grid(7, 4),
    )
    assert bool((counts == 2).all())
    assert S.first_argmax(counts) == (0, 0, 0)
    # Now the cache term decides row 1 (label 1, behind by 0.75 in z0) only at the largest β and the two largest
    # α, and only for weight candidates 1 and 2 (candidate 0 weighs every entry 0). Class 1 has one key at
    # affinity 1, class 0 twelve at 0.5: the margin α·(1 − 12·exp(−β/2)) passes 0.75 only at β = 5.62 with
    # α ≥ 3.55. The tie among those cells goes to the first (β, α) and the first candidate.
    labels_cache = torch.tensor([0] * 12 + [1])
    affinity = torch.tensor([[0.0] * 13, [0.5] * 12 + [1.0]])
    z0 = torch.tensor([[100.0, 0.0], [0.75, 0.0]])
    weights = torch.stack([torch.zeros(13), torch.ones(13), torch.ones(13)])
    betas, alphas, labels = S.tip_grid(7, 5), S.tip_grid(7, 4), torch.tensor([0, 1])
    counts = S.cache_search(z0, affinity, S.ClassLayout(labels_cache, 2), weights, labels, betas, alphas)
    expected = torch.ones(5, 4, 3, dtype=torch.long)
    expected[4, 2:, 1:] = 2
    assert torch.equal(counts, expected)
    assert S.first_argmax(counts) == (4, 2, 1)
    choice, best = nested_loop_search(z0, affinity, labels_cache, weights, labels, betas.tolist(), alphas.tolist(), 2)
    assert (choice, best) == ((4, 2, 1), 2)


def hard_rows(seed, signed):
    """z0 [M, C] with small margins and g [B, M, C] large enough that most rows change their arg-max along α
    = 0.25 … 5.0 (exact in binary), plus rows built to tie exactly at a grid point (the crossing of 1 + 0·α and
    0 + α/α*) and rows with a twin of the label (identical z and g: the lower class index wins everywhere)."""
    g = torch.Generator().manual_seed(seed)
    m, c, b = 400, 30, 3
    z0 = torch.randn(m, c, generator=g) * 2
    gg = torch.randn(b, m, c, generator=g) if signed else torch.rand(b, m, c, generator=g) * 3
    labels = torch.randint(0, c, (m,), generator=g)
    alphas = torch.arange(1, 21) * 0.25
    for r in range(40):  # a crossing exactly at α* ∈ {0.25, 0.5, 1, 2, 4}, competitor below or above the label
        y, other, star = int(labels[r]), (int(labels[r]) + (1 if r % 2 else -1)) % c, 0.25 * 2 ** (r % 5)
        z0[r], gg[:, r] = -10.0, 0.0
        z0[r, y], z0[r, other], gg[:, r, other] = 1.0, 0.0, 1.0 / star
    for r in range(40, 60):  # twins of the label, one below and one above it
        y = int(labels[r])
        z0[r, (y + 1) % c], gg[:, r, (y + 1) % c] = z0[r, y], gg[:, r, y]
        z0[r, y - 1], gg[:, r, y - 1] = z0[r, y], gg[:, r, y]
    return z0, gg, labels, alphas


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("signed", [False, True])
def test_alpha_scan_on_hard_rows_equals_nested_loop(seed, signed):
    z0, gg, labels, alphas = hard_rows(seed, signed)
    predictions = torch.stack([(z0 + a * gg).argmax(-1) for a in alphas.tolist()])  # [A, B, M]
    changed = float((predictions != predictions[0]).any(0).float().mean())
    assert changed > 0.6  # most rows change arg-max along α
    expected = naive_counts(z0, gg, labels, alphas)
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, alphas), expected)
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, alphas, budget=700), expected)
    # exact ties at grid points decide some rows: the counts differ from a rule that let the label win ties
    mixed = torch.cat([-alphas[:6], alphas])[torch.randperm(26, generator=torch.Generator().manual_seed(seed))]
    assert torch.equal(S.count_correct_along_alpha(z0, gg, labels, mixed), naive_counts(z0, gg, labels, mixed))


def test_alpha_scan_tie_at_a_grid_point_goes_to_the_lower_class():
    # label 1 at 1 + 0·α, class 0 at 0 + α: tied at α = 1 (class 0 wins); label 0 against class 1: tie, label wins
    z0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    alphas = torch.tensor([0.5, 1.0, 2.0])
    counts = S.count_correct_along_alpha(z0, g, torch.tensor([1, 0]), alphas)
    assert counts.tolist() == naive_counts(z0, g, torch.tensor([1, 0]), alphas).tolist() == [[2, 1, 0]]


def test_cache_search_on_a_hard_bundle_equals_nested_loop_counts():
    # wide modality gap: zero-shot margins are small next to the cache term, most rows change arg-max along α
    b = make_synthetic_bundle(classes=12, shots=4, dim=48, views=2, val_per_class=12, test_per_class=1, gap=8.0)
    keys = unit(b.support_features.mean(0))
    f = unit(b.val_features)
    z0, affinity = 100 * f @ b.text_weights.T, f @ keys.T
    layout = S.ClassLayout(b.support_labels, 12)
    weights = torch.exp(torch.tensor([0.0, 0.5, 1.0])[:, None] * torch.rand(keys.shape[0])[None])
    betas, alphas = S.tip_grid(7, 6), S.tip_grid(50, 15)
    counts = S.cache_search(z0, affinity, layout, weights, b.val_labels, betas, alphas)
    expected = torch.zeros_like(counts)
    changed = []
    for i, beta in enumerate(betas.tolist()):
        grouped = layout.class_sum(layout.arrange(S.phi(affinity, beta)), layout.arrange_weights(weights))
        expected[i] = naive_counts(z0, grouped, b.val_labels, alphas).T
        predictions = torch.stack([(z0 + a * grouped).argmax(-1) for a in alphas.tolist()])
        changed.append(float((predictions != predictions[0]).any(0).float().mean()))
    assert max(changed) > 0.5
    assert torch.equal(counts, expected)
