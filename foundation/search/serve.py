"""`foundation search serve`: a web page and JSON API to browse cross-modal search results.

`SearchBrowser` holds what a query needs — the indexes (one per modality), the embeddings file they
were built from, and the shard set with the raw inputs behind its rows — and answers queries by
object id or by an uploaded embedding vector, draws images as Legacy-Survey-style colour thumbnails
and returns spectra as arrays. `create_app(browser)` wraps it in a Flask app (no global state), and
`serve_app` runs that on a local port. A modality without an index of its own is searched exactly
in memory where its vectors fit `default_exact_max`. The page itself is `static/browse.html`, plain
HTML and JavaScript without any download (the machine it runs on may be offline).
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import ConfigError, DataError, FoundationError
from foundation.search.files import ids_digest, ranked_neighbours, targets_of
from foundation.search.index import VectorIndex
from foundation.search.kinds import default_exact_max

log = logging.getLogger(__name__)

#: The most neighbours one query returns (a page of thumbnails, not an export).
MAX_K = 100
#: Largest request body (an uploaded vector: 1024 float32 are 4 KiB as .npy, ~25 KiB as JSON).
MAX_UPLOAD_BYTES = 1 << 20
#: Thumbnail edge in pixels: default and bounds.
THUMB_SIZE, THUMB_MIN, THUMB_MAX = 128, 16, 512
#: Points of a spectrum sent to the page (binned down from the grid): default and bounds.
SPECTRUM_POINTS, SPECTRUM_POINTS_MAX = 400, 8192
#: Ids listed per search-box request, at most.
LIST_MAX = 200
#: (RGB plane, scale) of each band and the softening `m` of the Legacy Survey viewer's asinh colour
#: images (Lupton et al. 2004 style, as the viewer and AstroCLIP draw g, r, z cutouts in nanomaggies).
LEGACY_RGB_SCALES = {"g": (2, 6.0), "r": (1, 3.4), "i": (0, 3.0), "z": (0, 2.2)}
LEGACY_RGB_SOFTENING = 0.03
LEGACY_RGB_Q = 20.0

STATIC = Path(__file__).parent / "static"


class RequestError(FoundationError):
    """A request the server cannot answer as asked; `status` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- rendering


def legacy_rgb(image: np.ndarray, bands: Sequence[str] | None = None) -> np.ndarray:
    """(C, H, W) fluxes in nanomaggies → (H, W, 3) float in [0, 1], coloured as the Legacy Survey does.

    Each band is scaled and softened, and all three are stretched by the asinh of their mean
    intensity, so colours survive the stretch. Bands are named by `bands` (g, r, i, z); unnamed or
    unknown ones are taken as g, r, z, bluest first. A single band is drawn in grey.
    """
    planes = np.asarray(image, dtype=np.float64)
    if planes.ndim == 2:
        planes = planes[None]
    if planes.ndim != 3:
        raise DataError(f"an image must be (bands, H, W) or (H, W), got shape {planes.shape}")
    planes = np.nan_to_num(planes, nan=0.0, posinf=0.0, neginf=0.0)
    names = [b for b in (bands or []) if b in LEGACY_RGB_SCALES]
    if len(names) != planes.shape[0]:
        names = ["g", "r", "z"][: planes.shape[0]] if planes.shape[0] <= 3 else None
    if names is None:  # more bands than we can name: the bluest, a middle and the reddest
        planes, names = planes[[0, planes.shape[0] // 2, -1]], ["g", "r", "z"]
    scaled = [
        np.maximum(0.0, p * LEGACY_RGB_SCALES[b][1] + LEGACY_RGB_SOFTENING)
        for p, b in zip(planes, names, strict=True)
    ]
    intensity = sum(scaled) / len(scaled)
    stretch = np.arcsinh(LEGACY_RGB_Q * intensity) / np.sqrt(LEGACY_RGB_Q)
    intensity = np.where(intensity == 0.0, 1e-6, intensity)
    rgb = np.zeros((*intensity.shape, 3))
    for value, band in zip(scaled, names, strict=True):
        rgb[..., LEGACY_RGB_SCALES[band][0]] = value * stretch / intensity
    if len(names) == 1:
        rgb[:] = rgb[..., [LEGACY_RGB_SCALES[names[0]][0]]]
    return np.clip(rgb, 0.0, 1.0)


def thumbnail_png(image: np.ndarray, bands: Sequence[str] | None, size: int) -> bytes:
    """PNG bytes of `legacy_rgb(image)`, resized to `size` pixels across, north up."""
    from PIL import Image

    rgb = (legacy_rgb(image, bands) * 255.0 + 0.5).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(rgb[::-1]), mode="RGB")  # row 0 is the bottom
    resample = Image.Resampling.LANCZOS if size < max(picture.size) else Image.Resampling.NEAREST
    picture = picture.resize((size, max(1, round(size * picture.height / picture.width))), resample)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=True)
    return out.getvalue()


def binned_spectrum(
    flux: np.ndarray, wavelength: np.ndarray | None, bad: np.ndarray | None, points: int
) -> dict[str, list[float | None]]:
    """The spectrum averaged in `points` bins (good pixels only; None where a bin has none)."""
    flux = np.asarray(flux, dtype=np.float64).reshape(-1)
    x = np.arange(flux.size, dtype=np.float64) if wavelength is None else np.asarray(wavelength, np.float64)
    good = np.isfinite(flux) if bad is None else np.isfinite(flux) & ~np.asarray(bad, bool).reshape(-1)
    edges = np.linspace(0, flux.size, min(points, flux.size) + 1).astype(np.int64)
    sums = np.add.reduceat(np.where(good, flux, 0.0), edges[:-1])
    counts = np.add.reduceat(good.astype(np.int64), edges[:-1])
    centres = np.add.reduceat(x, edges[:-1]) / np.diff(edges)
    mean = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    return {
        "x": [round(float(v), 3) for v in centres],
        "flux": [None if not np.isfinite(v) else round(float(v), 5) for v in mean],
    }


# ----------------------------------------------------------------------------- raw inputs


class SampleStore:
    """The shard set's samples by key (= object id), read in place; keys are indexed once at start."""

    def __init__(self, data: str | Path, fields: dict[str, str] | None = None) -> None:
        from foundation.data import Manifest, ShardReader
        from foundation.data.raw_inputs import parse_field_map

        self.manifest = Manifest.load(data)
        self.path = Path(data)
        self._lock = threading.Lock()
        self._readers: list[Any] = []
        self._where: dict[str, tuple[int, int]] = {}
        for info in self.manifest.splits.values():
            for shard in info.shards:
                reader = ShardReader(
                    self.manifest.path / shard.name,
                    self.manifest.schema,
                    expected_bytes=shard.bytes,
                    expected_samples=shard.samples,
                )
                for i, key in enumerate(reader.keys):
                    self._where[key] = (len(self._readers), i)
                self._readers.append(reader)
        self.fields = self._resolve_fields(parse_field_map(None, ["image", "spectrum"]) | (fields or {}))
        self.bands = [str(b) for b in self.manifest.extra.get("bands") or []]

    def _resolve_fields(self, wanted: dict[str, str]) -> dict[str, str]:
        """{modality: array field} for the modalities the shards hold (the others are left out)."""
        from foundation.data.raw_inputs import resolve_fields

        out = {}
        for modality, field in wanted.items():
            try:
                out.update(resolve_fields({modality: field}, self.manifest.schema, str(self.path)))
            except DataError:
                log.info("the shards of %s hold no %s field: it is not drawn", self.path, modality)
        return out

    def __contains__(self, oid: str) -> bool:
        return oid in self._where

    def field(self, oid: str, name: str) -> Any:
        """Field `name` of object `oid` (None when the sample lacks an optional field)."""
        shard, i = self._where[oid]
        with self._lock:
            return self._readers[shard].sample(i, [name]).get(name)

    def wavelength(self, length: int) -> tuple[np.ndarray | None, str]:
        """The shard set's wavelength grid (`extra.wavelength`) when it has `length` pixels."""
        grid = self.manifest.extra.get("wavelength")
        if isinstance(grid, dict) and {"start", "step"} <= set(grid):
            unit = str(grid.get("unit", "Angstrom")).replace("Angstrom", "Å")
            return float(grid["start"]) + float(grid["step"]) * np.arange(length), f"wavelength [{unit}]"
        return None, "pixel"

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


# ----------------------------------------------------------------------------- the browser


class SearchBrowser:
    """Indexes, their embeddings file and the shard set behind it, answering the page's requests."""

    def __init__(
        self,
        index_dirs: Sequence[str | Path],
        *,
        embeddings: str | Path | None = None,
        data: str | Path | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        from foundation.embeddings import open_embeddings

        if not index_dirs:
            raise DataError("give at least one index directory (from `foundation search build`)")
        loaded = [(Path(d), VectorIndex.load(d)) for d in index_dirs]
        path = embeddings or loaded[0][1].meta.embeddings
        if path is None:
            raise DataError(f"{loaded[0][0]} does not record its embeddings file; pass --embeddings")
        self.emb = open_embeddings(path)
        try:
            self._setup(loaded, data, fields)
        except BaseException:
            self.close()
            raise

    def _setup(
        self, loaded: list[tuple[Path, VectorIndex]], data: str | Path | None, fields: dict[str, str] | None
    ) -> None:
        emb = self.emb
        self.indexes: dict[str, VectorIndex] = {}
        self.index_notes: dict[str, str] = {}
        digest = ids_digest(emb.ids)
        for directory, index in loaded:
            m = index.meta.modality
            if m not in emb.modalities:
                raise DataError(f"the index in {directory} is over {m!r}, which {emb.path} does not hold")
            if index.meta.ids_sha256 and index.meta.ids_sha256 != digest:
                raise DataError(
                    f"{emb.path} is not the embeddings file the index in {directory} was built from "
                    "(object ids differ); pass the right --embeddings"
                )
            if m in self.indexes:
                raise DataError(f"two indexes over {m!r} ({directory} and another); give one per modality")
            self.indexes[m] = index
            self.index_notes[m] = f"{index.meta.kind} index {directory}"
        for m in emb.modalities:
            if m not in self.indexes and emb.rows <= default_exact_max(emb.dim(m)):
                self.indexes[m] = VectorIndex.build(
                    emb.vectors(m), kind="flat", normalize=not emb.normalized(m), inplace=True
                )
                self.index_notes[m] = "exact search in memory"
        self.ids = emb.ids
        emb.rows_of(self.ids[:1])  # builds its id -> row map now, not in two request threads at once
        self.sorted_ids = sorted(self.ids.tolist())
        self.targets = {t: emb.target(t) for t in emb.target_names}
        if data is None:
            data = emb.attrs.get("data")
            if data and not Path(data).is_dir():  # pictures are optional: serve without them
                log.warning("the shard set %s that %s records is not there; pass --data", data, emb.path)
                data = None
        self.samples = SampleStore(data, fields) if data else None

    def close(self) -> None:
        if getattr(self, "samples", None) is not None:
            self.samples.close()
        self.emb.close()

    # -- descriptions

    def info(self) -> dict[str, Any]:
        return {
            "rows": int(self.emb.rows),
            "embeddings": str(self.emb.path),
            "data": str(self.samples.path) if self.samples else None,
            "modalities": {m: self.emb.dim(m) for m in self.emb.modalities},
            "searchable": self.index_notes,
            "drawn": sorted(self.samples.fields) if self.samples else [],
            "targets": list(self.targets),
            "max_k": self.max_k(),
        }

    def max_k(self) -> int:
        return min(MAX_K, int(self.emb.rows))

    def objects(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` object ids starting with `prefix` (in sorted order), with their targets."""
        start = bisect.bisect_left(self.sorted_ids, prefix)
        out = []
        for oid in self.sorted_ids[start : start + limit]:
            if not oid.startswith(prefix):
                break
            out.append({"id": oid, "targets": self.object_targets(oid)})
        return out

    def row(self, oid: str) -> int:
        try:
            return int(self.emb.rows_of([oid])[0])
        except DataError:
            raise RequestError(f"unknown object id {oid!r}", 404) from None

    def object_targets(self, oid: str) -> dict[str, float | None]:
        return targets_of(self.targets, self.row(oid))

    # -- queries

    def _modality(self, name: str | None, what: str) -> str:
        if name not in self.emb.modalities:
            raise RequestError(
                f"{what}={name!r} is not a modality of the embeddings; "
                f"use one of {', '.join(self.emb.modalities)}"
            )
        return name

    def _target(self, query_modality: str, target: str | None) -> str:
        """The searched modality: `target`, else the other one (cross-modal), else the same."""
        if target is None:
            others = [m for m in self.emb.modalities if m != query_modality]
            target = others[0] if len(others) == 1 else query_modality
        target = self._modality(target, "target")
        if target not in self.indexes:
            raise RequestError(
                f"there is no index over {target!r} (too many rows to search in memory); build one with "
                f"`foundation search build --modality {target}` and pass it to serve"
            )
        return target

    def _k(self, k: int) -> int:
        if not 1 <= k <= self.max_k():
            raise RequestError(f"k={k} must be between 1 and {self.max_k()}")
        return k

    def query_object(
        self, oid: str, modality: str | None, k: int, target: str | None = None
    ) -> dict[str, Any]:
        """Neighbours of object `oid`'s `modality` vector among the `target` modality's vectors."""
        modality = self._modality(modality, "modality")
        target, k, row = self._target(modality, target), self._k(k), self.row(oid)
        result = self._search(self.emb.vectors(modality, [row]), modality, target, k, oid)
        result["query_targets"] = targets_of(self.targets, row)
        return result

    def query_vector(
        self, vector: np.ndarray, modality: str | None, k: int, target: str | None = None
    ) -> dict[str, Any]:
        """Neighbours of an uploaded embedding vector (of `modality`) among the `target` vectors."""
        modality = self._modality(modality, "modality")
        target, k = self._target(modality, target), self._k(k)
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        dim = self.indexes[target].meta.dim
        if vector.size != dim:
            raise RequestError(f"the vector has {vector.size} values; {target} embeddings have {dim}")
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            raise RequestError("the vector must be finite and not all zero")
        result = self._search(vector[None].astype(np.float32), modality, target, k, None)
        result["query_targets"] = {}
        return result

    def _search(
        self, query: np.ndarray, modality: str, target: str, k: int, oid: str | None
    ) -> dict[str, Any]:
        exclude_self = oid is not None and target == modality
        index = self.indexes[target]
        sims, rows = index.search(query, min(k + int(exclude_self), index.meta.n))
        return {
            "query": oid,
            "query_modality": modality,
            "index_modality": target,
            "k": k,
            "neighbours": ranked_neighbours(
                self.ids, self.targets, oid or "", sims[0], rows[0], k, exclude_self
            ),
        }

    # -- raw inputs

    def _raw(self, oid: str, modality: str) -> Any:
        self.row(oid)
        if self.samples is None or modality not in self.samples.fields:
            raise RequestError(
                f"no {modality} inputs to show (serve was given no shard set holding them)", 404
            )
        if oid not in self.samples:
            raise RequestError(f"object {oid!r} is not in the shards of {self.samples.path}", 404)
        value = self.samples.field(oid, self.samples.fields[modality])
        if value is None:
            raise RequestError(f"object {oid!r} has no {modality}", 404)
        return value

    def image_png(self, oid: str, size: int) -> bytes:
        if not THUMB_MIN <= size <= THUMB_MAX:
            raise RequestError(f"size={size} must be between {THUMB_MIN} and {THUMB_MAX} pixels")
        return thumbnail_png(self._raw(oid, "image"), self.samples.bands, size)

    def spectrum(self, oid: str, points: int) -> dict[str, Any]:
        if not 2 <= points <= SPECTRUM_POINTS_MAX:
            raise RequestError(f"points={points} must be between 2 and {SPECTRUM_POINTS_MAX}")
        flux = np.asarray(self._raw(oid, "spectrum"), dtype=np.float64).reshape(-1)
        if flux.size == 0:
            raise RequestError(f"object {oid!r} has an empty spectrum", 404)
        mask_field = self.samples.fields["spectrum"] + "_mask"
        bad = self.samples.field(oid, mask_field) if mask_field in self.samples.manifest.schema else None
        if bad is not None and np.asarray(bad).size != flux.size:
            bad = None
        wavelength, x_label = self.samples.wavelength(flux.size)
        unit = getattr(self.samples.manifest.schema[self.samples.fields["spectrum"]], "unit", None)
        return {"id": oid, "x_label": x_label, "unit": unit, **binned_spectrum(flux, wavelength, bad, points)}


# ----------------------------------------------------------------------------- uploaded vectors


def parse_vector(raw: bytes, filename: str = "") -> np.ndarray:
    """An uploaded vector: a .npy file (numeric, read without pickle), a JSON list, or numbers in text."""
    if raw[:6] == b"\x93NUMPY":
        return _npy_vector(raw, filename)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{filename or 'the upload'} is neither a .npy file nor text") from None
    try:
        value = json.loads(text) if text.lstrip()[:1] in "[{" else None
    except ValueError:
        raise RequestError(f"{filename or 'the upload'} is not valid JSON") from None
    if isinstance(value, dict):
        value = value.get("vector")
    if value is None:
        try:
            return np.asarray([float(v) for v in text.replace(",", " ").split()], dtype=np.float64)
        except ValueError:
            raise RequestError(f"{filename or 'the upload'} holds something that is not a number") from None
    return vector_from_list(value)


def vector_from_list(value: Any) -> np.ndarray:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise RequestError("'vector' must be a flat list of numbers")
    return np.asarray(value, dtype=np.float64)


def _npy_vector(raw: bytes, filename: str) -> np.ndarray:
    """A 1-D (or 1×D) numeric array from .npy bytes, its header checked against the bytes it holds."""
    fmt = np.lib.format
    handle = io.BytesIO(raw)
    headers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        version = fmt.read_magic(handle)
        if version not in headers:
            raise ValueError(f"format version {version}")
        shape, _, dtype = headers[version](handle)
    except ValueError as exc:
        raise RequestError(f"{filename or 'the upload'} is not a readable .npy file ({exc})") from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise RequestError(f"{filename or 'the upload'} holds {dtype}, not numbers")
    count = int(np.prod(shape, dtype=np.int64))
    if (
        len(shape) > 2
        or (len(shape) == 2 and 1 not in shape)
        or count * dtype.itemsize != len(raw) - handle.tell()
    ):
        raise RequestError(f"{filename or 'the upload'} must hold one vector (shape {shape} does not fit)")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=handle.tell()).astype(np.float64)


# ----------------------------------------------------------------------------- the app


def _int_arg(args: Any, name: str, default: int) -> int:
    text = args.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise RequestError(f"{name}={text!r} is not an integer") from None


def require_flask() -> Any:
    """The flask module, or a ConfigError saying how to install it (it is an optional extra)."""
    try:
        import flask
    except ImportError:
        raise ConfigError(
            "`foundation search serve` needs Flask, which is not installed: pip install 'foundation[serve]'"
        ) from None
    return flask


def create_app(browser: SearchBrowser) -> Any:
    """The Flask app of the page and its JSON API over `browser` (see docs/search.md, "Browse")."""
    require_flask()
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    app.json.sort_keys = False

    @app.errorhandler(RequestError)
    def request_error(exc: RequestError) -> Any:
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        return jsonify(error=f"{exc.name}: {exc.description}".replace("\n", " ")), exc.code

    @app.errorhandler(FoundationError)
    def data_error(exc: FoundationError) -> Any:  # the server's files are at fault, not the request
        return jsonify(error=" ".join(str(exc).split())), 500

    @app.get("/")
    def page() -> Any:
        return app.send_static_file("browse.html")

    @app.get("/info")
    def info() -> Any:
        return jsonify(browser.info())

    @app.get("/objects")
    def objects() -> Any:
        limit = _int_arg(request.args, "limit", 50)
        if not 1 <= limit <= LIST_MAX:
            raise RequestError(f"limit={limit} must be between 1 and {LIST_MAX}")
        return jsonify(objects=browser.objects(request.args.get("prefix", ""), limit))

    @app.get("/query")
    def query_by_id() -> Any:
        oid = request.args.get("object_id")
        if not oid:
            raise RequestError("give object_id=ID (or POST a vector)")
        k = _int_arg(request.args, "k", 10)
        return jsonify(browser.query_object(oid, request.args.get("modality"), k, request.args.get("target")))

    @app.post("/query")
    def query_by_vector() -> Any:
        if request.files:
            upload = request.files.get("vector")
            if upload is None:
                raise RequestError("the upload has no file field 'vector'")
            vector, form = parse_vector(upload.read(), upload.filename or ""), request.form
        else:
            form = request.get_json(silent=True)
            if not isinstance(form, dict) or "vector" not in form:
                raise RequestError(
                    'POST a JSON object {"vector": [...], "modality": ...} or a file field "vector"'
                )
            vector = vector_from_list(form["vector"])
        k = _int_arg(form, "k", 10)
        return jsonify(browser.query_vector(vector, form.get("modality"), k, form.get("target") or None))

    @app.get("/image")
    def image() -> Any:
        png = browser.image_png(_required_id(request.args), _int_arg(request.args, "size", THUMB_SIZE))
        return Response(png, mimetype="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/spectrum")
    def spectrum() -> Any:
        points = _int_arg(request.args, "points", SPECTRUM_POINTS)
        return jsonify(browser.spectrum(_required_id(request.args), points))

    return app


def _required_id(args: Any) -> str:
    oid = args.get("object_id")
    if not oid:
        raise RequestError("give object_id=ID")
    return oid


def make_server(app: Any, host: str, port: int) -> Any:
    """A threaded WSGI server (werkzeug's, Flask's own) bound to host:port; port 0 picks a free one."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True)
