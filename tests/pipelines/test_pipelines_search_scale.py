"""Large-index builds: PQ kinds with re-ranking, streamed and sharded builds (the same index as one
build), resuming finished shards, parts of an export as one source, and the GPU fallback."""

from __future__ import annotations

import types

import numpy as np
import pytest

from foundation.cli import main
from foundation.errors import ConfigError, DataError
from foundation.search import gpu, stream
from foundation.search.files import query
from foundation.search.index import VectorIndex
from foundation.search.stream import (
    ArraySource,
    add_shard,
    build_streamed,
    max_auto_rerank,
    merge_shards,
    plan_build,
)
from foundation.search.synthetic import (
    EmbeddingModel,
    effective_dimension,
    fit_embedding_model,
    generate,
    with_effective_dimension,
)
from foundation.search.tuning import RecallTargetWarning
from tests.testkit.embeddings import export_parts

PQ = {"nlist": 16, "pq_m": 4, "pq_bits": 4}


def _clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    centres = np.random.default_rng(99).normal(size=(20, dim))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize(
    "kind, params", [("ivf", {"nlist": 16}), pytest.param("opq-ivf-pq", PQ, marks=pytest.mark.slow)]
)
@pytest.mark.filterwarnings("ignore::foundation.search.tuning.RecallTargetWarning")
def test_sharded_build_answers_like_a_single_build(tmp_path, kind, params):
    x = _clustered(1500)
    one = build_streamed(ArraySource(x), tmp_path / "one", kind=kind, params=params, progress=False)
    three = build_streamed(
        ArraySource(x), tmp_path / "three", kind=kind, params=params, shards=3, chunk_rows=200, progress=False
    )
    assert one.meta.n == three.meta.n == 1500 and one.index.ntotal == three.index.ntotal == 1500
    assert one.meta.tuning == {**three.meta.tuning, "seconds": one.meta.tuning["seconds"]}
    q = _clustered(40, seed=1)
    s1, r1 = one.search(q, 10)
    s3, r3 = three.search(q, 10)
    np.testing.assert_array_equal(r1, r3)
    np.testing.assert_allclose(s1, s3, rtol=1e-6)
    if kind == "ivf":  # and the same as the in-memory build, held-out rows included
        ref = VectorIndex.build(x, kind=kind, params=params)
        np.testing.assert_array_equal(ref.search(q, 10)[1], r1)


def test_finished_shards_are_skipped_and_missing_ones_refused(tmp_path):
    x = _clustered(900)
    source, work = ArraySource(x), tmp_path / "work"
    plan_build(source, work, kind="ivf", shards=3, params={"nlist": 8})
    assert add_shard(source, work, 1, progress=False)
    with pytest.raises(DataError, match=r"2 of 3 shards .* not finished \(shards \[0, 2\]\)"):
        merge_shards(source, work)
    stamp = (work / "shard-00001.faiss").stat().st_mtime_ns
    assert not add_shard(source, work, 1, progress=False)  # done: skipped
    index = build_streamed(source, work, progress=False)  # resumes: adds 0 and 2, merges
    assert (work / "shard-00001.faiss").stat().st_mtime_ns == stamp
    assert index.meta.n == 900 and index.index.ntotal == 900


@pytest.mark.slow
def test_pq_reranking_reads_the_stored_vectors():
    x = _clustered(2000)
    index = VectorIndex.build(x, kind="ivf-pq", params={**PQ, "rerank": 8, "nprobe": 16})
    q = _clustered(50, seed=2)
    exact = VectorIndex.build(x, kind="flat").search(q, 10)
    sims, rows = index.search(q, 10)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    # Re-ranked scores are exact cosines of the rows returned.
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", qn, unit[rows]), rtol=1e-5)
    index.attach_vectors(None)  # codes only: approximate scores, fewer true neighbours
    plain = index.search(q, 10)[1]
    hits = lambda found: np.mean([len(set(a) & set(b)) for a, b in zip(exact[1], found, strict=True)])  # noqa: E731
    assert hits(rows) > hits(plain)


def test_reranking_rescores_exactly_in_blocks_and_keeps_the_codes_order_for_ties(monkeypatch):
    from foundation.search import index as index_module

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    q = rng.standard_normal((30, 8)).astype(np.float32)
    x[10] = x[20] = 10 * q[0]  # two rows of one score, query 0's best
    cand = np.stack([rng.permutation(200)[:12] for _ in q])
    cand[0, :3] = [20, 10, 5]
    cand[3, 2:] = -1  # the codes found only 2 candidates, fewer than k

    searches = []

    def raw_search(queries, wanted):
        assert wanted == 12
        searches.append(len(queries))
        at = [int(np.flatnonzero((q == v).all(axis=1))[0]) for v in queries]
        return None, cand[at]

    reads = []

    def stored(rows):
        assert np.all(np.diff(rows) > 0)  # sorted, each once
        reads.append(len(rows))
        return x[rows]

    whole = index_module.reranked(raw_search, stored, q, 3, 4, n=200)
    # Candidates of more bytes than the budget: read 7 queries at a time; faiss asked 16 at a time.
    monkeypatch.setattr(index_module, "RERANK_BLOCK_BYTES", 7 * 12 * 8 * 4)
    monkeypatch.setattr(index_module, "RERANK_SEARCH_QUERIES", 16)
    blocks = index_module.reranked(raw_search, stored, q, 3, 4, n=200)
    assert searches == [30, 16, 14] and len(reads) == 1 + 3 + 2
    threads = index_module.reranked(raw_search, stored, q, 3, 4, n=200, workers=4)  # blocks of 7 in 4 shares
    for got in (whole, blocks, threads):
        for i in range(len(q)):
            c = cand[i][cand[i] >= 0]
            scores = x[c] @ q[i]
            order = np.argsort(-scores, kind="stable")[:3]
            np.testing.assert_array_equal(got[1][i, : len(order)], c[order])
            np.testing.assert_allclose(got[0][i, : len(order)], scores[order], rtol=1e-5, atol=1e-6)
            assert np.all(got[1][i, len(order) :] == -1) and np.all(got[0][i, len(order) :] == -np.inf)
    assert list(whole[1][0, :2]) == [20, 10]  # the tie in the codes' order


@pytest.mark.slow
def test_cli_builds_from_export_parts_in_steps_and_queries(tmp_path, capsys):
    (a, b), merged = export_parts(tmp_path)
    out = tmp_path / "index"
    common = ["search", "build", "--embeddings", str(a), "--embeddings", str(b), "--modality", "spectrum"]
    common += ["--out", str(out), "--kind", "ivf-pq", "--param", "nlist=16", "--param", "pq_m=4"]
    common += ["--param", "pq_bits=4", "--param", "rerank=8"]
    assert main([*common, "--step", "plan", "--shards", "2"]) == 0
    for shard in ("1", "0"):
        assert main([*common, "--step", "add", "--shard", shard]) == 0
    assert main([*common, "--step", "merge"]) == 0
    assert "built ivf-pq index over 1300 spectrum vectors" in capsys.readouterr().out
    assert not (out / "build").exists()
    index = VectorIndex.load(out)
    assert index.meta.embeddings is None and index.meta.tuning["recall_by_queries"].keys() == {
        "spectrum",
        "image",
    }
    # Rows run across the parts in order: the merged file has the same ids, so it answers queries.
    hits = query(out, ["p1-gal-00003"], query_modality="image", k=5, embeddings_path=merged)
    assert len(hits[0]["neighbours"]) == 5
    with pytest.raises(DataError, match="does not record its embeddings file"):
        query(out, ["p1-gal-00003"], query_modality="image", k=5)


def test_cli_refuses_a_sharded_graph_index(tmp_path, capsys):
    (a, _), _ = export_parts(tmp_path)
    argv = ["search", "build", "--embeddings", str(a), "--modality", "image", "--out", str(tmp_path / "i")]
    assert main([*argv, "--kind", "hnsw", "--shards", "2"]) == 2
    assert "cannot be built streamed or sharded" in capsys.readouterr().err
    assert main([*argv, "--kind", "ivf", "--step", "plan", "--param", "nlist=8"]) == 0
    assert main([*argv, "--kind", "ivf-sq8", "--step", "add"]) == 2  # not the planned build
    assert "holds an unfinished build with other kind (kind='ivf')" in capsys.readouterr().err


def test_gpu_is_used_where_faiss_has_one_and_refused_cleanly_where_not(monkeypatch):
    assert gpu.resolve_faiss_device("auto") == "cpu"  # faiss-cpu here
    assert gpu.resolve_faiss_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device gpu needs faiss built with GPU support"):
        gpu.resolve_faiss_device("gpu")
    calls = []

    class FakeIndex:
        def train(self, x):
            calls.append(("train", len(x)))

    fake = types.SimpleNamespace(
        StandardGpuResources=lambda: "res",
        get_num_gpus=lambda: 1,
        index_cpu_to_gpu=lambda res, dev, idx: calls.append(("to_gpu", res, dev)) or FakeIndex(),
        index_gpu_to_cpu=lambda idx: calls.append(("to_cpu",)) or "cpu-index",
    )
    monkeypatch.setattr("foundation.search.kinds.import_faiss", lambda: fake)
    assert gpu.resolve_faiss_device("auto") == "gpu"
    assert gpu.train_index(fake, object(), np.zeros((5, 2), np.float32), "gpu") == "cpu-index"
    assert calls == [("to_gpu", "res", 0), ("train", 5), ("to_cpu",)]
    fake.get_num_gpus = lambda: 0  # GPU faiss installed, no GPU visible
    assert gpu.resolve_faiss_device("auto") == "cpu"


@pytest.mark.slow
def test_fitted_model_keeps_the_spectrum_at_any_width(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(600, 4)) * [3.0, 2.0, 1.0, 0.5]
    source = np.tanh(latents @ rng.normal(size=(4, 48))) + 0.05 * rng.normal(size=(600, 48))
    model = fit_embedding_model(source, source="test", components=3, max_rank=8)
    model = EmbeddingModel.load(model.save(tmp_path / "model.json"))
    assert model.rank <= 8 and model.source_dim == 48
    wide = np.concatenate(list(generate(model, 3000, 256, seed=1, chunk=1000)))
    assert wide.shape == (3000, 256)
    np.testing.assert_allclose(np.linalg.norm(wide, axis=1), 1.0, rtol=1e-5)
    # The effective dimension carries over (random vectors of 256-d would have ~256).
    assert abs(effective_dimension(wide) - model.participation_ratio) < 0.25 * model.participation_ratio
    again = list(generate(model, 3000, 256, seed=1, chunk=1000))
    np.testing.assert_array_equal(again[2], wide[2000:])  # chunks are reproducible
    queries = next(generate(model, 10, 256, seed=1, stream=1))
    assert not np.isin(queries[:, 0], wide[:, 0]).any()
    # More residual noise for a given effective dimension (the benchmark matches the demo's ~6).
    target = model.participation_ratio + 3
    noisier = with_effective_dimension(model, target, 256)
    assert noisier.tail_variance > model.tail_variance
    drawn = next(generate(noisier, 3000, 256, seed=2, chunk=3000))
    assert abs(effective_dimension(drawn) - target) < 0.2 * target


@pytest.mark.parametrize("kind", ["ivf-fp16", "ivf-pqfs"])
def test_fp16_and_fast_scan_kinds_build_streamed_and_in_memory(tmp_path, kind):
    x = _clustered(2000, dim=32)
    params = {"nlist": 16} if kind == "ivf-fp16" else {"nlist": 16, "pq_m": 16}
    streamed = build_streamed(ArraySource(x), tmp_path / "s", kind=kind, params=params, progress=False)
    in_memory = VectorIndex.build(x, kind=kind, params=params)
    for index in (streamed, in_memory):
        assert index.meta.tuning["reached"], index.meta.tuning
        assert index.meta.params.get("pq_bits", 4) == 4
    q = _clustered(20, dim=32, seed=1)
    truth = np.argsort(
        -(q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T,
        axis=1,
    )[:, :10]
    found = streamed.search(q, 10)[1]
    assert np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)]) >= 0.9
    if kind == "ivf-pqfs":
        assert type(streamed.index).__name__ == "IndexIVFPQFastScan" and streamed.meta.params["rerank"] >= 8
        with pytest.raises(DataError, match="4 bits"):
            VectorIndex.build(x, kind=kind, params={"nlist": 16, "pq_bits": 8})


def test_rerank_cap_grows_with_the_rows():
    sizes = (10, 10**6, 10**6 + 1, 4 * 10**6, 10**7, 10**8, 10**12)
    assert [max_auto_rerank(n) for n in sizes] == [64, 64, 128, 128, 256, 1024, 1024]


@pytest.mark.slow
def test_streamed_tuning_doubles_rerank_up_to_the_cap_for_the_rows(tmp_path, monkeypatch):
    # Random vectors in 2 x 4-bit codes: far too coarse to order neighbours, so the target needs
    # more than 64 x k candidates (256 here).
    x = np.random.default_rng(0).normal(size=(4000, 32)).astype(np.float32)
    params = {"nlist": 8, "pq_m": 2, "pq_bits": 4}
    with pytest.warns(RecallTargetWarning):
        capped = build_streamed(ArraySource(x), tmp_path / "a", kind="ivf-pq", params=params, progress=False)
    assert capped.meta.params["rerank"] == 64 and not capped.meta.tuning["reached"]
    monkeypatch.setattr(stream, "max_auto_rerank", lambda n: 512)  # the cap of a larger index
    grown = build_streamed(ArraySource(x), tmp_path / "b", kind="ivf-pq", params=params, progress=False)
    assert 64 < grown.meta.params["rerank"] <= 512 and grown.meta.tuning["reached"]
