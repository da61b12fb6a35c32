"""Vector search over exported embeddings: faiss indexes, recall tuning, cross-modal queries.

Similarity is cosine: vectors are L2-normalised before indexing and querying unless the embeddings
file records them as normalised already, so inner product == cosine.

Index kinds (`kinds.py`): exact `flat` inner product; `hnsw` (graph, no training) and `ivf` (inverted
lists, k-means trained), each with full float32 vectors or, as `hnsw-sq8` / `ivf-sq8`, 8-bit scalar
quantised ones (a quarter of the memory), and `ivf-pq` / `opq-ivf-pq` with product-quantisation
codes (pq_m bytes a vector; the float vectors re-rank the candidates from the embeddings file),
the kinds for 10^7-10^8 rows. `auto` is exact while the vectors fit in `exact_max`
(default: 1 GiB of float32, 262 144 vectors of 1024-d — a brute-force query is one scan of that
memory, 0.1-0.2 s on one core) and IVF above (measured faster to build and to query at a given
recall than HNSW on this project's benchmark; docs/search.md).

An approximate index has a query-time knob (efSearch for HNSW, nprobe for IVF) that trades latency
for recall; `tuning.py` measures the smallest knob that reaches a target recall at build time and
records it, with the curve, in the index's metadata (`index.py`). `files.py` builds an index over
one modality of an embeddings file and answers queries by object id. `stream.py` builds
inverted-list indexes without holding the vectors (trained on a sample, added in chunks, in
shards merged afterwards: a SLURM array), `gpu.py` trains them on a GPU where faiss has one, and
`synthetic.py` draws realistic embeddings at any size from a model fitted to an exported file.
The measured latency/recall of each kind is in benchmarks/search.py and docs/search.md.
"""
