"""Few-shot samplers, episode files, CoOp pickle import, base/new classes and the imbalance profile."""

from __future__ import annotations

import json
import pickle
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fewclip import data
from fewclip.data import Item

# --------------------------------------------------------------------------- a split in the split_zhou layout

# Rows interleave the classes so that the order of first appearance (2, 0, 1 in train; 1, 0, 2 in val) differs
# from label order. Class 1 has 3 train items (< K = 4: taken whole, no draw) and class 2 has 2 val items.
TRAIN = [(2, "c2_t0"), (0, "c0_t0"), (2, "c2_t1"), (1, "c1_t0"), (0, "c0_t1"), (2, "c2_t2"), (0, "c0_t2"),
         (2, "c2_t3"), (1, "c1_t1"), (0, "c0_t3"), (2, "c2_t4"), (0, "c0_t4"), (2, "c2_t5"), (1, "c1_t2"),
         (2, "c2_t6")]  # fmt: skip
VAL = [(1, "c1_v0"), (0, "c0_v0"), (1, "c1_v1"), (2, "c2_v0"), (0, "c0_v1"), (1, "c1_v2"), (0, "c0_v2"),
       (1, "c1_v3"), (0, "c0_v3"), (2, "c2_v1"), (0, "c0_v4"), (0, "c0_v5")]  # fmt: skip
NAMES = ["abyssinian", "american_bulldog", "beagle"]


def rows(pairs):
    return [[f"{NAMES[y]}/{stem}.jpg", y, NAMES[y]] for y, stem in pairs]


@pytest.fixture
def pets(tmp_path) -> data.DatasetSplits:
    """oxford_pets/images/<breed>/<file>.jpg + split_zhou_OxfordPets.json (CoOp's layout)."""
    d = tmp_path / "oxford_pets"
    split = {"train": rows(TRAIN), "val": rows(VAL), "test": rows([(0, "c0_x"), (1, "c1_x"), (2, "c2_x")])}
    for part in split.values():
        for rel, _, _ in part:
            (d / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / "images" / rel).write_bytes(b"\xff\xd8\xff")
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return data.load_dataset("oxford_pets", tmp_path, warn=False)


# --------------------------------------------------------------------------- dassl mode, derived by hand


def randbelow(getrandbits, n: int) -> int:
    """CPython's Random._randbelow_with_getrandbits: rejection sampling on n.bit_length() bits."""
    k = n.bit_length()
    r = getrandbits(k)
    while r >= n:
        r = getrandbits(k)
    return r


def sample_by_hand(getrandbits, population: list, k: int) -> list:
    """CPython's Random.sample for a small population (n <= 21, k <= 5: the pool branch)."""
    n = len(population)
    assert n <= 21 and k <= 5
    pool, result = list(population), []
    for i in range(k):
        j = randbelow(getrandbits, n - i)
        result.append(pool[j])
        pool[j] = pool[n - i - 1]
    return result


def dassl_by_hand(seed: int, k: int) -> tuple[list[str], list[str]]:
    """CoOp: set_random_seed(seed) -> random.seed(seed); then generate_fewshot_dataset(train, K) and
    generate_fewshot_dataset(val, min(K, 4)), groups in order of first appearance, one global stream."""
    random.seed(seed)
    bits = random.getrandbits
    train_groups = {2: [], 0: [], 1: []}  # first appearance in TRAIN: 2, 0, 1
    for y, stem in TRAIN:
        train_groups[y].append(stem)
    val_groups = {1: [], 0: [], 2: []}  # first appearance in VAL: 1, 0, 2
    for y, stem in VAL:
        val_groups[y].append(stem)
    train = []
    for items in train_groups.values():  # 7, 5, 3 items: class 1 (3 < K) is taken whole without a draw
        train += sample_by_hand(bits, items, k) if len(items) >= k else items
    val = []
    kv = min(k, 4)
    for items in val_groups.values():  # 4, 6, 2 items
        val += sample_by_hand(bits, items, kv) if len(items) >= kv else items
    return train, val


def stems(items: list[Item]) -> list[str]:
    return [Path(i.path).stem for i in items]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dassl_mode_reproduces_coop_draw(pets, seed):
    state = random.getstate()
    episode = data.sample_episode(pets, 4, seed, sampler="dassl")
    assert random.getstate() == state  # its own Random(seed): the global stream is left alone
    train, val = dassl_by_hand(seed, 4)
    assert stems(episode.train) == train and stems(episode.val) == val
    assert len(train) == 4 + 4 + 3 and len(val) == 4 + 4 + 2
    assert episode.shots_per_class() == [4, 3, 4]


def test_dassl_seed_1_first_class_is_pinned(pets):
    # random.seed(1); random.sample(range(7), 4) == [1, 4, 0, 2] (Mersenne Twister; getrandbits(3) gives 1, 4, 6,
    # 6, 6, ...: 1 and 4 are taken directly, the 6s are rejected for n = 5). Class 2 (first in TRAIN) has 7 items.
    episode = data.sample_episode(pets, 4, 1, sampler="dassl")
    assert stems(episode.train)[:4] == ["c2_t1", "c2_t4", "c2_t0", "c2_t2"]


def test_dassl_no_val_split_draws_val_from_remaining_train(pets):
    from dataclasses import replace

    no_val = replace(pets, val=[])  # as ImageNet: no val split
    episode = data.sample_episode(no_val, 2, 5, sampler="dassl")
    rng = random.Random(5)
    groups = {2: [], 0: [], 1: []}
    for y, stem in TRAIN:
        groups[y].append(stem)
    support = {y: sample_by_hand(rng.getrandbits, g, 2) for y, g in groups.items()}
    val = []
    for y, g in groups.items():  # continuing the same stream, same class order
        rest = [s for s in g if s not in support[y]]
        val += sample_by_hand(rng.getrandbits, rest, 2) if len(rest) >= 2 else rest  # class 1: 3 - 2 = 1 left
    assert stems(episode.train) == [s for y in groups for s in support[y]]
    assert stems(episode.val) == val
    assert not set(stems(episode.train)) & set(stems(episode.val))


def test_dassl_repeat_fills_small_classes(pets):
    episode = data.sample_episode(pets, 4, 1, sampler="dassl", repeat=True)
    assert episode.shots_per_class() == [4, 4, 4]


def test_val_kind_full_keeps_the_whole_val_split(pets):
    episode = data.sample_episode(pets, 4, 1, val_kind="full")
    assert episode.val == pets.val and episode.val_kind == "full"


# --------------------------------------------------------------------------- portable mode


def test_portable_mode_formula_and_properties(pets):
    episode = data.sample_episode(pets, 2, 7, sampler="portable")
    expected = []
    for y in range(3):  # ascending labels, sorted paths, default_rng([seed, y]).permutation
        ordered = sorted((i for i in pets.train if i.label == y), key=lambda i: i.path)
        perm = np.random.default_rng([7, y]).permutation(len(ordered))
        expected += [ordered[j] for j in perm[:2]]
    assert episode.train == expected
    expected_val = []
    for y in range(3):
        ordered = sorted((i for i in pets.val if i.label == y), key=lambda i: i.path)
        perm = np.random.default_rng([7, y, 1]).permutation(len(ordered))
        expected_val += [ordered[j] for j in perm[:2]]
    assert episode.val == expected_val
    # nested across K, independent of the split's row order
    bigger = data.sample_episode(pets, 3, 7, sampler="portable")
    for y in range(3):
        assert [i for i in bigger.train if i.label == y][:2] == [i for i in episode.train if i.label == y]
    from dataclasses import replace

    shuffled = replace(pets, train=list(reversed(pets.train)))
    assert data.sample_episode(shuffled, 2, 7, sampler="portable").train == episode.train


def test_custom_data_defaults_to_portable():
    assert data.default_sampler("folder") == "portable" and data.default_sampler("sun397") == "dassl"


def test_sampler_errors(pets):
    with pytest.raises(data.DataError, match="unknown sampler 'numpy'"):
        data.sample_episode(pets, 4, 1, sampler="numpy")
    with pytest.raises(data.DataError, match="shots must be a positive integer"):
        data.sample_episode(pets, 0, 1)
    from dataclasses import replace

    with pytest.raises(data.DataError, match="no validation split, so val_kind='full' is unavailable"):
        data.sample_episode(replace(pets, val=[]), 4, 1, val_kind="full")


# --------------------------------------------------------------------------- episode files


def test_episode_round_trip_and_verification(pets, tmp_path):
    episode = data.sample_episode(pets, 4, 2)
    path = data.save_episode(episode, tmp_path / "out" / data.episode_filename(episode))
    assert path.name == f"oxford_pets_{pets.split_sha256[:12]}_k4_s2_dassl.json"
    obj = json.loads(path.read_text())
    assert obj["meta"]["split_sha256"] == pets.split_sha256 and obj["meta"]["k"] == 4
    assert obj["train"][0][0] == episode.train[0].path and not Path(obj["train"][0][0]).is_absolute()
    loaded = data.load_episode(path, pets)
    assert loaded.train == episode.train and loaded.val == episode.val and loaded.sampler == "dassl"
    obj["meta"]["split_sha256"] = "0" * 64
    path.write_text(json.dumps(obj))
    with pytest.raises(data.DataError, match="drawn from the split with SHA-256 000000000000"):
        data.load_episode(path, pets)
    assert not list((tmp_path / "out").glob(".*.tmp"))


# --------------------------------------------------------------------------- base / new


def test_base_new_split_follows_dassl():
    assert data.base_new_labels([4, 0, 2, 1, 3, 3]) == ([0, 1, 2], [3, 4])
    items = [Item(f"{y}.jpg", y, f"c{y}") for y in (4, 0, 3, 1, 2)]
    (base,), selected = data.subsample_classes(items, subsample="base")
    assert selected == [0, 1, 2] and [(i.label, i.classname) for i in base] == [(0, "c0"), (1, "c1"), (2, "c2")]
    (new,), selected = data.subsample_classes(items, subsample="new")
    assert selected == [3, 4] and [(i.label, i.classname) for i in new] == [(1, "c4"), (0, "c3")]


def test_episode_and_splits_subsample(pets):
    episode = data.sample_episode(pets, 4, 1).subsample_classes("new")
    assert episode.class_indices == [2] and episode.classnames == ["beagle"]
    assert {i.label for i in episode.train + episode.val} == {0}
    new_splits = data.subsample_splits(pets, "new")
    assert new_splits.classnames == ["beagle"] and [i.path for i in new_splits.test] == ["beagle/c2_x.jpg"]


# --------------------------------------------------------------------------- imbalance


def test_imbalance_profile_by_hand():
    # n_i = max(floor(100 * 0.02^(i/4)), 1): 100, 37.6, 14.1, 5.3, 2.0
    assert data.imbalance_counts(100, 5, 0.02) == [100, 37, 14, 5, 2]
    assert data.imbalance_counts(10, 3, 0.01) == [10, 1, 1]
    assert data.imbalance_counts(16, 1, 0.02) == [16]
    with pytest.raises(data.DataError, match=r"imbalance ratio must be in \(0, 1\]"):
        data.imbalance_counts(10, 3, 0.0)


def test_make_imbalanced_ranks_by_count_ties_by_first_appearance():
    items = [Item(f"b{i}", 1, "b") for i in range(8)] + [Item(f"a{i}", 0, "a") for i in range(8)]
    items += [Item(f"c{i}", 2, "c") for i in range(5)]
    kept = data.make_imbalanced(items, 0.25, seed=3)
    counts = {y: sum(i.label == y for i in kept) for y in range(3)}
    # ranks: b (8, appears first), a (8), c (5); n_max = 8: [8, floor(8 * 0.5) = 4, floor(8 * 0.25) = 2]
    assert counts == {1: 8, 0: 4, 2: 2}
    assert kept == [i for i in items if i in set(kept)]  # original order kept
    assert kept == data.make_imbalanced(items, 0.25, seed=3)
    assert data.make_imbalanced(items, 1.0, seed=3) == items


# --------------------------------------------------------------------------- CoOp pickle import


def _write_coop_pickle(path: Path, train: list[Item], val: list[Item], prefix: str) -> None:
    """Pickle {"train": [Datum], "val": [Datum]} as CoOp does, with Dassl's Datum class and absolute paths."""
    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = mod.__name__, "Datum"
    mod.Datum = Datum
    names = ["dassl", "dassl.data", "dassl.data.datasets", mod.__name__]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[mod.__name__] = mod
    try:
        payload = {p: [Datum(prefix + i.path, i.label, i.classname) for i in items] for p, items in
                   (("train", train), ("val", val))}  # fmt: skip
        path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def test_import_coop_pickle(pets, tmp_path):
    drawn = data.sample_episode(pets, 4, 1)
    pkl = tmp_path / "split_fewshot" / "shot_4-seed_1.pkl"
    pkl.parent.mkdir()
    _write_coop_pickle(pkl, drawn.train, drawn.val, "/home/someone/DATA/oxford_pets/images/")
    assert "dassl" not in sys.modules
    episode = data.import_coop_pickle(pkl, pets)
    assert episode.train == drawn.train and episode.val == drawn.val
    assert (episode.k, episode.seed, episode.source) == (4, 1, "coop-pickle:shot_4-seed_1.pkl")
    assert episode.split_sha256 == pets.split_sha256


def test_import_coop_pickle_rejects_incomplete_and_foreign_files(pets, tmp_path):
    drawn = data.sample_episode(pets, 4, 1)
    pkl = tmp_path / "shot_4-seed_1.pkl"
    _write_coop_pickle(pkl, [i for i in drawn.train if i.label != 0], drawn.val, "/x/oxford_pets/images/")
    with pytest.raises(data.DataError, match=r"incomplete bundle: class 0 \('abyssinian'\) has 0 train image"):
        data.import_coop_pickle(pkl, pets)
    _write_coop_pickle(pkl, [Item("zebra/z.jpg", 0, "abyssinian")], [], "/x/images/")
    with pytest.raises(data.DataError, match="matches no image of oxford_pets's split"):
        data.import_coop_pickle(pkl, pets)
    pkl.write_bytes(pickle.dumps({"train": [print]}))
    with pytest.raises(data.DataError, match="refusing to load builtins.print"):
        data.import_coop_pickle(pkl, pets)


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    import argparse

    from fewclip.cli import datasets as ds_cli

    parser = argparse.ArgumentParser(prog="fewclip")
    ds_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_sample_subsample_and_imbalance(pets, tmp_path, capsys):
    out = tmp_path / "episodes"
    out.mkdir()
    root = str(pets.dataset_dir.parent)
    argv = ["datasets", "sample", "oxford_pets", "--data-root", root, "--shots", "4", "--seed", "1"]
    assert run_cli([*argv, "--subsample", "base", "--imbalance-ratio", "0.5", "--out", str(out)]) == 0
    (path,) = out.iterdir()
    assert path.name.endswith("_k4_s1_dassl_base_imb0.5.json")
    episode = data.load_episode(path, pets)
    assert episode.class_indices == [0, 1] and episode.classnames == ["abyssinian", "american_bulldog"]
    # support of the base classes: 4 and 3 images; ranked 4, 3 -> keep [4, floor(4 * 0.5) = 2]
    assert episode.shots_per_class() == [4, 2] and "wrote" in capsys.readouterr().out
    pkl = tmp_path / "shot_4-seed_1.pkl"
    drawn = data.sample_episode(pets, 4, 1)
    _write_coop_pickle(pkl, drawn.train, drawn.val, "/data/oxford_pets/images/")
    assert run_cli(["datasets", "import-coop", "oxford_pets", str(pkl), "--data-root", root,
                    "--out", str(tmp_path / "imported.json")]) == 0  # fmt: skip
    assert data.load_episode(tmp_path / "imported.json", pets).train == drawn.train
