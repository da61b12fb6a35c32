"""`foundation search serve`: the JSON API (Flask's test client), its 4xx answers, and the page in a
real headless Chromium that picks a galaxy and clicks a neighbour."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from foundation.search.files import build_from_file
from tests.testkit.embeddings import latent_embeddings, write_embeddings

pytest.importorskip("flask", reason="flask is not installed (pip install -e '.[serve]')")

from foundation.search.serve import (  # noqa: E402
    MAX_K,
    SearchBrowser,
    create_app,
    legacy_rgb,
    make_server,
    parse_vector,
)

N = 60
DIM = 8
PIXELS = 120
WAVELENGTH = {"start": 3600.0, "stop": 3600.0 + 40.0 * (PIXELS - 1), "step": 40.0, "unit": "Angstrom"}


def _galaxy(rng: np.random.Generator, z: float, size: int = 24) -> np.ndarray:
    """(g, r, z) cutout in nanomaggies: an elliptical exponential profile, redder at higher z, plus noise."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    angle, axis_ratio = rng.uniform(0, np.pi), rng.uniform(0.4, 1.0)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / axis_ratio
    profile = np.exp(-np.hypot(u, v) / rng.uniform(1.5, 4.0))
    colour = np.array([1.0 - 0.6 * z, 1.0, 1.0 + 1.5 * z])
    return (colour[:, None, None] * profile * 2.0 + 0.02 * rng.normal(size=(3, size, size))).astype(
        np.float32
    )


def _spectrum(rng: np.random.Generator, z: float) -> np.ndarray:
    """A sloped continuum with an emission line that moves with redshift."""
    wave = WAVELENGTH["start"] + WAVELENGTH["step"] * np.arange(PIXELS)
    line = 6563.0 * (1 + 0.5 * z)
    flux = 1.0 + wave / 8000.0 + 4.0 * np.exp(-0.5 * ((wave - line) / 60.0) ** 2)
    return (flux + 0.1 * rng.normal(size=PIXELS)).astype(np.float32)


def _write_shards(path: Path, data: dict) -> Path:
    """Galaxy samples with the ids of the embeddings file, laid out as AstroCLIP's prepare writes them."""
    from foundation.data import ShardSetWriter

    rng = np.random.default_rng(1)
    extra = {"bands": ["g", "r", "z"], "wavelength": WAVELENGTH, "targets": ["redshift", "stellar_mass"]}
    with ShardSetWriter(path, {"train": 0.7, "test": 0.3}, samples_per_shard=16, extra=extra) as writer:
        for oid, z, mass in zip(
            data["ids"], data["targets"]["redshift"], data["targets"]["stellar_mass"], strict=True
        ):
            mask = np.zeros(PIXELS, dtype=bool)
            mask[5:9] = True
            writer.write(
                {
                    "__key__": oid,
                    "image": _galaxy(rng, float(z)),
                    "spectrum": _spectrum(rng, float(z)),
                    "spectrum_mask": mask,
                    "redshift": float(z),
                    "stellar_mass": float(mass),
                }
            )
    return path


@pytest.fixture(scope="module")
def fixture_set(tmp_path_factory):
    """(index dir, embeddings path, shard set, the embeddings' data): a spectrum index over 60 galaxies."""
    root = tmp_path_factory.mktemp("serve")
    data = latent_embeddings(n=N, dim=DIM, noise=0.02)
    data["ids"] = [f"gal-{i:03d}" for i in range(N)]
    emb = write_embeddings(root / "emb.h5", data)
    shards = _write_shards(root / "shards", data)
    build_from_file(emb, "spectrum", root / "index", kind="flat")
    return root / "index", emb, shards, data


@pytest.fixture(scope="module")
def browser(fixture_set):
    index, emb, shards, _ = fixture_set
    b = SearchBrowser([index], embeddings=emb, data=shards)
    yield b
    b.close()


@pytest.fixture(scope="module")
def client(browser):
    return create_app(browser).test_client()


# ----------------------------------------------------------------------------- the JSON API


def test_query_by_id_is_cross_modal_and_agrees_with_exact_search(client, fixture_set):
    _, _, _, data = fixture_set
    res = client.get("/query?object_id=gal-007&modality=image&k=5")
    assert res.status_code == 200
    body = res.get_json()
    assert body["query"] == "gal-007" and body["index_modality"] == "spectrum"
    assert [nb["rank"] for nb in body["neighbours"]] == [1, 2, 3, 4, 5]
    image = data["vectors"]["image"][7] / np.linalg.norm(data["vectors"]["image"][7])
    spectra = data["vectors"]["spectrum"] / np.linalg.norm(data["vectors"]["spectrum"], axis=1, keepdims=True)
    expected = np.argsort(-(spectra @ image))[:5]
    assert [nb["id"] for nb in body["neighbours"]] == [data["ids"][i] for i in expected]
    np.testing.assert_allclose(
        [nb["similarity"] for nb in body["neighbours"]], (spectra @ image)[expected], rtol=1e-4
    )
    assert body["query_targets"]["redshift"] == pytest.approx(data["targets"]["redshift"][7])
    # Its own spectrum is among the nearest (low noise) and marked as the same object.
    assert any(nb["match"] for nb in body["neighbours"] if nb["id"] == "gal-007")


def test_target_modality_is_chosen_and_same_modality_search_drops_the_query(client):
    # No image index was given: the image vectors are searched exactly in memory.
    body = client.get("/query?object_id=gal-003&modality=spectrum&k=4").get_json()
    assert body["index_modality"] == "image"
    same = client.get("/query?object_id=gal-003&modality=spectrum&target=spectrum&k=4").get_json()
    assert same["index_modality"] == "spectrum" and len(same["neighbours"]) == 4
    assert "gal-003" not in [nb["id"] for nb in same["neighbours"]]


def test_query_by_uploaded_vector_json_npy_and_text(client, fixture_set):
    _, _, _, data = fixture_set
    vector = data["vectors"]["image"][11]
    by_id = client.get("/query?object_id=gal-011&modality=image&k=3").get_json()["neighbours"]
    as_json = client.post("/query", json={"vector": vector.tolist(), "modality": "image", "k": 3})
    assert as_json.status_code == 200, as_json.get_json()
    assert [nb["id"] for nb in as_json.get_json()["neighbours"]] == [nb["id"] for nb in by_id]
    npy = io.BytesIO()
    np.save(npy, vector)
    for payload, name in ((npy.getvalue(), "v.npy"), (" ".join(map(str, vector)).encode(), "v.txt")):
        res = client.post(
            "/query", data={"vector": (io.BytesIO(payload), name), "modality": "image", "k": "3"}
        )
        assert res.status_code == 200, res.get_json()
        assert res.get_json()["query"] is None
        assert [nb["id"] for nb in res.get_json()["neighbours"]] == [nb["id"] for nb in by_id]


def test_images_spectra_objects_and_info(client):
    png = client.get("/image?object_id=gal-001&size=64")
    assert png.status_code == 200 and png.mimetype == "image/png"
    from PIL import Image

    picture = Image.open(io.BytesIO(png.data))
    assert picture.size == (64, 64) and picture.mode == "RGB"
    spectrum = client.get("/spectrum?object_id=gal-001&points=40").get_json()
    assert len(spectrum["x"]) == len(spectrum["flux"]) == 40
    assert spectrum["x"][0] == pytest.approx(3600 + 40 * 1.0, abs=40) and "Å" in spectrum["x_label"]
    assert spectrum["flux"][2] is None  # a bin of masked pixels only (5..8)
    listed = client.get("/objects?prefix=gal-00&limit=5").get_json()["objects"]
    assert [o["id"] for o in listed] == [f"gal-00{i}" for i in range(5)]
    assert set(listed[0]["targets"]) == {"redshift", "stellar_mass"}
    info = client.get("/info").get_json()
    assert info["rows"] == N and info["drawn"] == ["image", "spectrum"]
    assert set(info["searchable"]) == {"image", "spectrum"} and info["max_k"] == N
    assert b"cross-modal search" in client.get("/").data


@pytest.mark.parametrize(
    "url, status, words",
    [
        ("/query?object_id=nope&modality=image&k=3", 404, "unknown object id 'nope'"),
        ("/query?object_id=gal-001&modality=radio&k=3", 400, "modality='radio'"),
        ("/query?object_id=gal-001&modality=image&target=radio", 400, "target='radio'"),
        ("/query?object_id=gal-001&modality=image&k=0", 400, "k=0 must be between 1 and"),
        ("/query?object_id=gal-001&modality=image&k=-2", 400, "k=-2"),
        (f"/query?object_id=gal-001&modality=image&k={N + 1}", 400, f"between 1 and {N}"),
        ("/query?object_id=gal-001&modality=image&k=ten", 400, "not an integer"),
        ("/query?modality=image", 400, "object_id"),
        ("/image?object_id=nope", 404, "unknown object id"),
        ("/image?object_id=gal-001&size=100000", 400, "size=100000"),
        ("/spectrum?object_id=gal-001&points=1", 400, "points=1"),
        ("/objects?limit=0", 400, "limit=0"),
        ("/no-such-page", 404, "Not Found"),
    ],
)
def test_bad_get_requests_get_4xx_and_one_line(client, url, status, words):
    res = client.get(url)
    assert res.status_code == status
    body = res.get_json()
    assert set(body) == {"error"} and words in body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            {"json": {"vector": [0.1] * (DIM - 1), "modality": "image"}},
            f"has {DIM - 1} values; spectrum embeddings have {DIM}",
        ),
        ({"json": {"vector": [0.0] * DIM, "modality": "image"}}, "not all zero"),
        ({"json": {"vector": ["a"] * DIM, "modality": "image"}}, "flat list of numbers"),
        ({"json": {"vector": [0.1] * DIM, "modality": "radio"}}, "modality='radio'"),
        ({"json": {"vector": [0.1] * DIM, "modality": "image", "k": MAX_K + 1}}, "k=101"),
        ({"json": {"modality": "image"}}, "POST a JSON object"),
        ({"data": {"vector": (io.BytesIO(b"1 2 x"), "v.txt"), "modality": "image"}}, "not a number"),
        ({"data": {"vector": (io.BytesIO(b"\x93NUMPY\x01\x00"), "v.npy"), "modality": "image"}}, "v.npy"),
    ],
)
def test_bad_uploads_get_400_and_one_line(client, kwargs, words):
    res = client.post("/query", **kwargs)
    assert res.status_code == 400, res.get_json()
    assert words in res.get_json()["error"] and "\n" not in res.get_json()["error"]


def test_an_npy_header_larger_than_its_data_is_refused_before_allocating():
    """A .npy header may declare any shape; it must match the bytes really uploaded."""
    from foundation.search.serve import RequestError

    bomb = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    np.lib.format.write_array_header_1_0(bomb, header)
    bomb.write(np.zeros(4, dtype="<f4").tobytes())
    with pytest.raises(RequestError, match="must hold one vector"):
        parse_vector(bomb.getvalue(), "big.npy")
    matrix = io.BytesIO()
    np.save(matrix, np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(RequestError, match="must hold one vector"):
        parse_vector(matrix.getvalue(), "matrix.npy")
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RequestError, match="not numbers"):
        parse_vector(objects.getvalue(), "objects.npy")


def test_an_oversized_upload_gets_413(client):
    res = client.post(
        "/query", data={"vector": (io.BytesIO(b"1 " * (1 << 20)), "v.txt"), "modality": "image"}
    )
    assert res.status_code == 413 and "error" in res.get_json()


def test_legacy_rgb_colours_red_objects_red_and_is_bounded():
    red = np.zeros((3, 8, 8))
    red[2] = 5.0  # z band only
    rgb = legacy_rgb(red, ["g", "r", "z"])
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert rgb[..., 0].mean() > 0.5 > rgb[..., 2].mean()
    grey = legacy_rgb(np.ones((8, 8)))
    np.testing.assert_allclose(grey[..., 0], grey[..., 2])


def test_without_shards_it_searches_but_shows_no_pictures(fixture_set, tmp_path):
    """The shard set an export records may have moved: queries work, pictures get a 404."""
    index, _, _, data = fixture_set
    import h5py

    emb = write_embeddings(tmp_path / "emb.h5", data)
    with h5py.File(emb, "r+") as f:  # as an export records the shard set it read
        f.attrs["data"] = str(tmp_path / "moved")
    b = SearchBrowser([index], embeddings=emb)
    try:
        client = create_app(b).test_client()
        assert client.get("/info").get_json()["drawn"] == []
        assert client.get("/query?object_id=gal-001&modality=image&k=2").status_code == 200
        res = client.get("/image?object_id=gal-001")
        assert res.status_code == 404 and "no image inputs" in res.get_json()["error"]
    finally:
        b.close()


def test_cli_refuses_an_index_of_another_file(fixture_set, tmp_path, capsys):
    from foundation.cli import main

    index, _, shards, _ = fixture_set
    other = write_embeddings(tmp_path / "other.h5", latent_embeddings(n=N, dim=DIM, seed=5))
    assert main(["search", "serve", str(index), "--embeddings", str(other), "--data", str(shards)]) == 2
    assert "object ids differ" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_cli_serves_until_interrupted(fixture_set, stop):
    """The command itself: prints where to browse, answers there, stops cleanly on Ctrl-C or kill."""
    index, emb, shards, _ = fixture_set
    # -X faulthandler: a server that does not stop is made to print every thread's stack (SIGABRT).
    argv = [sys.executable, "-X", "faulthandler", "-m", "foundation.cli", "search", "serve", str(index)]
    argv += ["--embeddings", str(emb)]
    proc = subprocess.Popen(
        [*argv, "--data", str(shards), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # SIGINT as a terminal delivers it: a shell starts background jobs (CI run with `&`) with
        # SIGINT ignored, and Python then installs no Ctrl-C handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("browse at "):
            line = proc.stdout.readline()
            assert line, "the server exited early:\n" + "".join(lines)
            lines.append(line)
        url = lines[-1].split()[2]
        with urllib.request.urlopen(url + "info", timeout=30) as answer:
            assert json.load(answer)["rows"] == N
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(url + "query?object_id=nope&modality=image", timeout=30)
        assert bad.value.code == 404 and "unknown object id" in json.load(bad.value)["error"]
        bad.value.close()  # no connection left open (HTTP/1.1 keep-alive) when the server stops
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            pytest.fail(
                f"the server did not stop on {stop.name}; its threads:\n" + proc.stdout.read()[-8000:]
            )
        assert code == 0
        assert "stopped" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- in a real browser


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def live_server(browser):
    server = make_server(create_app(browser), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_page_in_headless_chromium(live_server, fixture_set, tmp_path):
    found = _chromium()
    if found is None:
        reason = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("FOUNDATION_REQUIRE_BROWSER") == "1":  # CI installed them: missing is a failure
            pytest.fail(f"{reason} (and FOUNDATION_REQUIRE_BROWSER=1)")
        print(f"skipped: {reason}")
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, _, data = fixture_set
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=found[1]), options=options)
    try:
        # The page redraws its cards on every answer: an element found just before may be gone.
        wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(live_server)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#objects li[data-id]")) > 0)
        # Pick a galaxy with the search box and the list.
        driver.find_element(By.ID, "search").send_keys("gal-02")
        wait.until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "#objects li[data-id]").get_attribute("data-id") == "gal-020"
            )
        )
        driver.find_element(By.CSS_SELECTOR, "#objects li[data-id='gal-025']").click()
        wait.until(lambda d: d.find_element(By.ID, "query-id").text == "gal-025")
        first = _shown(driver, wait, k=12)
        expected = json.loads(_fetch(driver, live_server + "query?object_id=gal-025&modality=image&k=12"))
        assert first["ids"] == [nb["id"] for nb in expected["neighbours"]]
        assert first["redshift"] == pytest.approx(
            [nb["targets"]["redshift"] for nb in expected["neighbours"]], rel=1e-9
        )
        assert first["query_redshift"] == pytest.approx(data["targets"]["redshift"][25])
        shot = tmp_path / "query.png"
        driver.save_screenshot(str(shot))
        # Click a neighbour that is another object: it becomes the query.
        target = next(i for i in first["ids"] if i != "gal-025")
        driver.find_element(By.CSS_SELECTOR, f".neighbour[data-id='{target}']").click()
        wait.until(lambda d: d.find_element(By.ID, "query-id").text == target)
        second = _shown(driver, wait, k=12)
        expected = json.loads(_fetch(driver, live_server + f"query?object_id={target}&modality=image&k=12"))
        assert second["ids"] == [nb["id"] for nb in expected["neighbours"]]
        assert "#object_id=" + target in driver.current_url
        driver.save_screenshot(str(tmp_path / "neighbour.png"))
        # Upload an embedding: its neighbours are the object's own.
        np.save(tmp_path / "vector.npy", data["vectors"]["image"][11])
        driver.find_element(By.ID, "upload").send_keys(str(tmp_path / "vector.npy"))
        driver.find_element(By.ID, "upload-button").click()
        wait.until(lambda d: d.find_element(By.ID, "query-id").text == "uploaded vector: vector.npy")
        expected = json.loads(_fetch(driver, live_server + "query?object_id=gal-011&modality=image&k=12"))
        wait.until(
            lambda d: (
                [c.get_attribute("data-id") for c in d.find_elements(By.CSS_SELECTOR, ".neighbour")]
                == [nb["id"] for nb in expected["neighbours"]]
            )
        )
        driver.save_screenshot(str(tmp_path / "upload.png"))
        print(f"screenshots: {shot} {tmp_path / 'neighbour.png'} {tmp_path / 'upload.png'}")
    finally:
        driver.quit()


def _shown(driver, wait, k: int) -> dict:
    """What the page shows once its neighbours and their thumbnails have loaded."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".neighbour")) == k)
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".neighbour svg.spectrum polyline")) >= k)
    cards = driver.find_elements(By.CSS_SELECTOR, ".neighbour")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".neighbour img.thumb")) == k
    assert len(driver.find_elements(By.CSS_SELECTOR, "#query img.thumb")) == 1
    query_z = driver.find_element(By.CSS_SELECTOR, "#query .target[data-name='redshift']")
    return {
        "ids": [c.get_attribute("data-id") for c in cards],
        "redshift": [
            float(
                c.find_element(By.CSS_SELECTOR, ".target[data-name='redshift']").get_attribute("data-value")
            )
            for c in cards
        ],
        "query_redshift": float(query_z.get_attribute("data-value")),
    }


def _neighbour_ids(driver) -> list[str]:
    """The ids of the neighbour cards, read in one step (the page may redraw them meanwhile)."""
    return driver.execute_script("return [...document.querySelectorAll('.neighbour')].map(c => c.dataset.id)")


def _fetch(driver, url: str) -> str:
    """The API's answer as the page's own browser gets it."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => r.text()).then(done);",
        url,
    )
