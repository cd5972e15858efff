"""ANN layer: exact top-k, merge by max over interests, exclusions, save/load, HNSW/IVF recall."""

from __future__ import annotations

import numpy as np
import pytest

from facetrec.errors import ConfigError
from facetrec.index.ann import (ANNIndex, ExactIndex, HNSWIndex, IVFIndex, IVFPQIndex, ShardedIndex, ann_recall,
                                build_index, load_index, memory_estimate_bytes, multi_interest_search)

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss on one thread: on a small shared machine OpenMP barriers, not arithmetic, dominate
    k-means on PQ sub-spaces (1 thread: 0.8 s, 2 contended threads: 2-9 s)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int = 32, c: int = 200, seed: int = 0) -> np.ndarray:
    """Gaussian blobs around c random centres: neighbours are shared, so ANN recall is not trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    return (centres[rng.integers(0, c, n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def big():
    """20k clustered items (ids 1..20000), 200 held-out queries and their exact top-100."""
    x = clustered(20_000)
    ids = np.arange(1, len(x) + 1)
    q = clustered(200, seed=7)
    return x, ids, q, build_index(x, ids).search(q, 100)[1]


# --------------------------------------------------------------------------- single-query search


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_exact_is_the_true_top_k(backend):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 16)).astype(np.float32)
    ids = np.arange(1, 501) * 3  # any positive ids, not just row + 1
    q = rng.normal(size=(7, 16)).astype(np.float32)
    index = ExactIndex(backend=backend)
    index.build(v, ids)
    s, i = index.search(q, 10)
    full = q @ v.T
    assert (i == ids[np.argsort(-full, axis=1)[:, :10]]).all()
    assert np.allclose(s, -np.sort(-full, axis=1)[:, :10], atol=1e-5)
    assert s.dtype == np.float32 and i.dtype == np.int64
    s, i = index.search(q[:1], 502)  # more than indexed: the rest is -1 / -inf
    assert (i[0, 500:] == -1).all() and np.isneginf(s[0, 500:]).all() and len(set(i[0, :500])) == 500


def test_every_kind_satisfies_the_protocol_and_estimates_memory():
    x = clustered(3000, d=16, c=10)
    small = {"exact": {}, "hnsw": {"M": 8}, "ivf": {}, "ivfpq": {"nbits": 6}}  # small = quick to train
    for kind, params in small.items():
        index = build_index(x, np.arange(1, 3001), kind=kind, **params)
        assert isinstance(index, ANNIndex) and index.kind == kind and index.ntotal == 3000 and index.dim == 16
    exact = memory_estimate_bytes(1_000_000, 64, "exact")
    assert exact == 1_000_000 * (64 * 4 + 8)
    assert memory_estimate_bytes(1_000_000, 64, "hnsw", {"M": 32}) > exact  # vectors + graph
    assert memory_estimate_bytes(1_000_000, 64, "ivfpq", {"m": 16}) < exact / 8  # 16-byte codes


# --------------------------------------------------------------------------- multi-interest merge


def test_merge_by_max_hand_case():
    # items: 1 = e0, 2 = e1, 3 = (.6, .6), 4 = -e0
    v = np.array([[1, 0], [0, 1], [0.6, 0.6], [-1, 0]], dtype=np.float32)
    index = build_index(v, np.array([1, 2, 3, 4]))
    interests = np.array([[[1, 0], [0, 2]]], dtype=np.float32)
    ids, scores, which = multi_interest_search(index, interests, np.array([[True, True]]), top_m=3, n=3)
    # item 3 is retrieved by both: .6 via interest 0, 1.2 via interest 1 -> 1.2 and interest 1
    assert ids[0].tolist() == [2, 3, 1]
    assert scores[0].tolist() == pytest.approx([2.0, 1.2, 1.0])
    assert which[0].tolist() == [1, 1, 0]


def test_merge_matches_brute_force_on_random_users():
    rng = np.random.default_rng(2)
    x = clustered(1500, d=16, c=20)
    index = build_index(x, np.arange(1, 1501))
    U, K, top_m, n = 40, 4, 30, 70
    q = rng.normal(size=(U, K, 16)).astype(np.float32)
    valid = rng.random((U, K)) < 0.7
    lens = rng.integers(0, 6, U)
    off = np.concatenate([[0], np.cumsum(lens)])
    items = rng.integers(1, 1501, off[-1])
    ids, scores, which = multi_interest_search(index, q, valid, top_m, n, (off, items), chunk_candidates=500)
    for u in range(U):
        m = top_m + lens[u]  # top_m counts candidates after exclusion
        best: dict[int, tuple[float, int]] = {}
        for k in np.flatnonzero(valid[u]):
            s = x @ q[u, k]
            for row in np.argsort(-s)[:m]:
                if row + 1 not in best or s[row] > best[row + 1][0]:
                    best[row + 1] = (float(s[row]), int(k))
        for e in items[off[u]:off[u + 1]]:
            best.pop(int(e), None)
        want = sorted(best.items(), key=lambda kv: -kv[1][0])[:n]
        got = ids[u][ids[u] > 0]
        assert got.tolist() == [item for item, _ in want]
        assert scores[u, : len(want)] == pytest.approx([s for _, (s, _) in want], abs=1e-4)
        for item, k in zip(got, which[u]):  # the credited interest is the one giving the max
            assert x[item - 1] @ q[u, k] == pytest.approx(best[int(item)][0], abs=1e-4)


def test_invalid_interests_never_surface():
    v = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    index = build_index(v, np.array([1, 2, 3]))
    interests = np.array([[[1, 0], [0, 100]], [[0, 0], [0, 0]]], dtype=np.float32)
    valid = np.array([[True, False], [False, False]])
    ids, scores, which = multi_interest_search(index, interests, valid, top_m=3, n=3)
    assert (which[0] == 0).all() and scores[0, 0] == 1.0  # interest 1 would score 100 on item 2
    assert (ids[1] == 0).all() and np.isneginf(scores[1]).all() and (which[1] == -1).all()  # no valid interest


def test_excluded_items_never_returned_and_unfillable_slots_are_padding():
    v = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    index = build_index(v, np.array([1, 2, 3]))
    interests = np.array([[[1, 0]], [[1, 0]]], dtype=np.float32)
    exclude = (np.array([0, 1, 1]), np.array([1]))  # user 0 has seen item 1, user 1 nothing
    ids, scores, which = multi_interest_search(index, interests, np.ones((2, 1), bool), top_m=3, n=3, exclude=exclude)
    assert ids[0].tolist() == [2, 3, 0] and np.isneginf(scores[0, 2]) and which[0, 2] == -1
    assert ids[1].tolist() == [1, 2, 3]  # exclusions are per user
    # top_m counts unseen candidates: one per interest here, though item 1 (seen) ranks first
    ids, _, _ = multi_interest_search(index, interests, np.ones((2, 1), bool), top_m=1, n=3, exclude=exclude)
    assert ids.tolist() == [[2, 0, 0], [1, 0, 0]]


def test_no_duplicates_across_interests():
    x = clustered(2000, d=16, c=10)
    index = build_index(x, np.arange(1, 2001))
    q = np.random.default_rng(1).normal(size=(20, 4, 16)).astype(np.float32)
    q[:, 1] = q[:, 0] * 1.001  # near-identical interests retrieve the same items
    ids, _, _ = multi_interest_search(index, q, np.ones((20, 4), bool), top_m=50, n=200)
    per_interest = index.search(q.reshape(80, 16), 50)[1].reshape(20, 200)
    for row, cand in zip(ids, per_interest):
        real = row[row > 0]
        assert len(real) == len(set(real.tolist()))  # no item twice
        assert set(real.tolist()) == set(cand.tolist())  # n is large enough: all of the union, once
        assert len(real) <= 150  # interests 0 and 1 share (nearly) all their 50 items


def test_bad_inputs_say_what_to_do():
    v = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="id 0 is padding"):
        build_index(v, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="unique"):
        build_index(v, np.array([1, 1, 2]))
    with pytest.raises(ConfigError, match="did you mean 'efSearch'"):
        build_index(v, np.array([1, 2, 3]), kind="hnsw", ef_search=3)
    with pytest.raises(ConfigError, match="must be one of"):
        build_index(v, np.array([1, 2, 3]), kind="lsh")
    with pytest.raises(ConfigError, match="positive integer"):
        HNSWIndex(M=0)
    with pytest.raises(ConfigError, match="must divide the dimension"):
        build_index(clustered(3000, d=30), np.arange(1, 3001), kind="ivfpq", m=8)
    with pytest.raises(ConfigError, match="exceeds the 3 items"):
        build_index(v, np.array([1, 2, 3]), kind="ivf", nlist=10)
    index = build_index(v, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="bool array of shape"):
        multi_interest_search(index, v[None], np.ones((1, 3), int), top_m=2, n=2)
    with pytest.raises(ValueError, match="exclude must be a CSR"):
        multi_interest_search(index, v[None], np.ones((1, 3), bool), 2, 2, (np.array([0, 5]), np.array([1])))


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind,params", [("exact", {}), ("hnsw", {"M": 16, "efSearch": 77}),
                                         ("ivf", {"nlist": 32, "nprobe": 5}), ("ivfpq", {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 3})])
def test_save_load_round_trip(tmp_path, kind, params):
    x = clustered(3000, d=16, c=10)
    index = build_index(x, np.arange(1, 3001), kind=kind, **params)
    path = tmp_path / "sub" / "index.faiss"
    index.save(path)
    back = load_index(path)
    assert type(back) is type(index) and back.params == index.params  # efSearch / nprobe survive
    q = clustered(50, d=16, c=10, seed=3)
    (s1, i1), (s2, i2) = index.search(q, 20), back.search(q, 20)
    assert (i1 == i2).all() and (s1 == s2).all()
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temp file left behind
    assert isinstance(faiss.read_index(str(path)), faiss.Index)  # plain faiss format


def test_numpy_exact_round_trip_and_kind_check(tmp_path):
    x = clustered(500, d=8, c=5)
    index = ExactIndex(backend="numpy")
    index.build(x, np.arange(1, 501))
    index.save(tmp_path / "np.faiss")
    back = load_index(tmp_path / "np.faiss")
    assert (back.search(x[:5], 7)[1] == index.search(x[:5], 7)[1]).all()
    assert back.params == index.params == {"backend": "numpy"}
    sharded = build_index(x, np.arange(1, 501), shards=2, backend="numpy")  # the config's form
    sharded.save(tmp_path / "sh.faiss")
    assert [sh.params for sh in load_index(tmp_path / "sh.faiss").shards] == [{"backend": "numpy"}] * 2
    assert memory_estimate_bytes(500, 8, "exact", {"backend": "numpy"}) == memory_estimate_bytes(500, 8, "exact")
    with pytest.raises(ConfigError, match="backend must be one of"):
        ExactIndex(backend="gpu")
    with pytest.raises(ValueError, match="kind 'exact', not 'hnsw'"):
        HNSWIndex.load(tmp_path / "np.faiss")


def test_without_faiss_exact_falls_back_to_numpy_and_the_rest_say_what_to_install(tmp_path, monkeypatch):
    import facetrec.index.ann as ann

    x = clustered(300, d=8, c=5)
    want = build_index(x, np.arange(1, 301)).search(x[:4], 5)[1]
    monkeypatch.setattr(ann, "faiss", None)
    index = build_index(x, np.arange(1, 301))
    assert index.backend == "numpy" and (index.search(x[:4], 5)[1] == want).all()
    index.save(tmp_path / "index.faiss")
    assert (load_index(tmp_path / "index.faiss").search(x[:4], 5)[1] == want).all()
    with pytest.raises(ConfigError, match="pip install 'facetrec\\[ann\\]'"):
        build_index(x, np.arange(1, 301), kind="hnsw")


# --------------------------------------------------------------------------- recall vs exact


def test_hnsw_recall_against_exact(big):
    x, ids, q, exact = big
    index = HNSWIndex(M=32, efConstruction=100, efSearch=256)
    index.build(x, ids)
    assert ann_recall(index.search(q, 100)[1], exact) >= 0.9
    index.efSearch = 16  # efSearch is what buys recall: faiss searches with max(efSearch, k) = 100 here
    assert ann_recall(index.search(q, 100)[1], exact) < 0.9


def test_hnsw_l2_space_reaches_exact_search_and_survives_save(big, tmp_path):
    """space "l2": items lengthened to one norm, the graph built on L2; scores are the inner
    products again, a wide enough search is exact, and save / load keep all of it."""
    x, ids, q, exact = big
    index = HNSWIndex(M=32, efConstruction=100, efSearch=256, space="l2")
    index.build(x, ids)
    assert index.dim == x.shape[1] and index.params["space"] == "l2"
    assert ann_recall(index.search(q, 100)[1], exact) >= 0.9
    index.efSearch = len(x)  # the whole graph: exact, scores included
    scores, got = index.search(q, 100)
    assert ann_recall(got, exact) == pytest.approx(1.0, abs=1e-3)
    truth_scores = np.take_along_axis(q @ x.T, got - 1, axis=1)
    np.testing.assert_allclose(scores, truth_scores, rtol=1e-4, atol=1e-4)
    index.save(tmp_path / "l2.faiss")
    back = load_index(tmp_path / "l2.faiss")
    assert isinstance(back, HNSWIndex) and back.params == index.params and back.dim == index.dim
    s2, g2 = back.search(q, 100)
    assert np.array_equal(g2, got) and np.allclose(s2, scores, atol=1e-5)
    with pytest.raises(ConfigError, match="space must be one of"):
        HNSWIndex(space="cosine")


def test_ivf_recall_against_exact_grows_with_nprobe(big):
    x, ids, q, exact = big
    index = IVFIndex(nlist=256, nprobe=32)
    index.build(x, ids)
    assert ann_recall(index.search(q, 100)[1], exact) >= 0.9
    index.nprobe = 256  # every list: exact
    assert ann_recall(index.search(q, 100)[1], exact) == pytest.approx(1.0, abs=1e-3)


def test_ivfpq_recall_is_capped_by_its_lossy_codes(big):
    x, ids, q, _ = big
    x, ids = x[:5000], ids[:5000]  # PQ codebook training is the slow part; keep it small
    exact = build_index(x, ids).search(q, 100)[1]
    pq = IVFPQIndex(nlist=16, m=16, nbits=6, nprobe=16)  # every list: only the codes lose recall
    pq.build(x, ids)
    assert 0.5 < ann_recall(pq.search(q, 100)[1], exact) < 1.0


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_exact_shards_merge_to_the_exact_top_k(backend, monkeypatch):
    """The merge of the shards' top-k lists is the top-k over all items (also through the multi-interest search)."""
    import facetrec.index.ann as ann

    if backend == "numpy":
        monkeypatch.setattr(ann, "faiss", None)
    x = clustered(3000, d=16, c=10)
    ids = np.arange(1, 3001) * 2
    q = clustered(40, d=16, c=10, seed=5)
    whole = build_index(x, ids)
    sharded = build_index(x, ids, shards=3)
    assert isinstance(sharded, ShardedIndex) and isinstance(sharded, ANNIndex)
    assert [sh.ntotal for sh in sharded.shards] == [1000] * 3 and sharded.ntotal == 3000
    (s1, i1), (s2, i2) = whole.search(q, 50), sharded.search(q, 50)
    assert (i1 == i2).all() and np.allclose(s1, s2, atol=1e-5)
    s, i = sharded.search(q[:2], 3005)  # more than indexed: -1 / -inf at the end, nothing repeated
    assert (i[:, 3000:] == -1).all() and np.isneginf(s[:, 3000:]).all() and len(set(i[0, :3000])) == 3000
    V, valid = q[:20].reshape(10, 2, 16), np.ones((10, 2), dtype=bool)
    a = multi_interest_search(whole, V, valid, top_m=30, n=40)
    b = multi_interest_search(sharded, V, valid, top_m=30, n=40)
    (ids_a, sc_a, src_a), (ids_b, sc_b, src_b) = a, b  # items and their interest exactly; scores to
    assert (ids_a == ids_b).all() and (src_a == src_b).all()  # float rounding (BLAS blocks a shard
    assert np.allclose(sc_a, sc_b, rtol=1e-6, atol=1e-5)  # differently from the whole matrix)


def test_sharded_ivfpq_and_hnsw_recall_against_exact(big):
    """Config-style params (as in train.index_params) with shards: each shard derives nlist from its size."""
    x, ids, q, exact = big
    hnsw = build_index(x, ids, kind="hnsw", M=16, efConstruction=80, efSearch=128, shards=2)
    assert ann_recall(hnsw.search(q, 100)[1], exact) >= 0.9
    x5, ids5 = x[:8000], ids[:8000]
    exact5 = build_index(x5, ids5).search(q, 100)[1]
    pq = build_index(x5, ids5, kind="ivfpq", m=16, nbits=6, nprobe=8, shards=2)
    assert [sh.params["nlist"] for sh in pq.shards] == [IVFPQIndex.resolve_params(4000, 32, {})["nlist"]] * 2
    assert 0.5 < ann_recall(pq.search(q, 100)[1], exact5) < 1.0


@pytest.mark.parametrize("kind,params", [("exact", {}), ("hnsw", {"M": 8, "efSearch": 77}),
                                         ("ivfpq", {"nlist": 8, "m": 4, "nbits": 6, "nprobe": 3})])
def test_sharded_save_load_round_trip(tmp_path, kind, params):
    x = clustered(2000, d=16, c=10)
    index = build_index(x, np.arange(1, 2001), kind=kind, shards=3, **params)
    path = tmp_path / "index.faiss"
    index.save(path)
    back = load_index(path)
    assert isinstance(back, ShardedIndex) and back.kind == kind and back.params == index.params
    assert [sh.params for sh in back.shards] == [sh.params for sh in index.shards]  # efSearch / nprobe survive
    q = clustered(30, d=16, c=10, seed=3)
    (s1, i1), (s2, i2) = index.search(q, 20), back.search(q, 20)
    assert (i1 == i2).all() and (s1 == s2).all()
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_sharded_memory_estimate_is_printed_before_building(capsys, monkeypatch):
    import facetrec.index.ann as ann

    params = {"m": 16, "nbits": 8, "shards": 4}
    total = memory_estimate_bytes(1_000_000, 64, "ivfpq", params)
    assert total == 4 * memory_estimate_bytes(250_000, 64, "ivfpq", {"m": 16, "nbits": 8})
    assert memory_estimate_bytes(1_000_000, 64, "exact", {"shards": 4}) == memory_estimate_bytes(1_000_000, 64, "exact")
    monkeypatch.setattr(ann, "LARGE_INDEX_BYTES", 0)  # print for any size
    x = clustered(400, d=8, c=5)
    build_index(x, np.arange(1, 401), kind="hnsw", M=8, shards=2)
    err = capsys.readouterr().err
    want = memory_estimate_bytes(400, 8, "hnsw", {"M": 8, "shards": 2}) / 2**20
    assert f"building 2 hnsw shards over 400 x 8 vectors, about {want:,.0f} MiB" in err


def test_bad_shard_counts_say_what_to_do():
    x = clustered(10, d=8, c=2)
    with pytest.raises(ConfigError, match="shards=20 exceeds the 10 items"):
        build_index(x, np.arange(1, 11), shards=20)
    with pytest.raises(ConfigError, match="shards must be a positive integer"):
        build_index(x, np.arange(1, 11), kind="hnsw", shards=0)
    with pytest.raises(ConfigError, match="unknown hnsw index parameter"):
        ShardedIndex("hnsw", 2, nlist=4)


def test_ann_recall_hand_case():
    assert ann_recall(np.array([[1, 2, 3], [4, 5, 0]]), np.array([[1, 2, 9], [4, 5, 6]])) == pytest.approx(2 / 3)
    assert ann_recall(np.array([[1, 1, -1]]), np.array([[1, 2, -1]])) == pytest.approx(0.5)  # repeats count once
    assert ann_recall(np.array([[7, 8]]), np.array([[7, 8]])) == 1.0


def test_docstring_examples_run():
    import doctest

    import facetrec.index.ann as ann

    result = doctest.testmod(ann, extraglobs={"np": np})
    assert result.failed == 0 and result.attempted > 10
