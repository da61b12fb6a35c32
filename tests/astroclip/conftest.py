"""A small synthetic survey shared by the AstroCLIP tests (written once per session)."""

import pytest


@pytest.fixture(scope="session")
def survey(tmp_path_factory):
    from encoders.astroclip.survey import synthesize

    root = tmp_path_factory.mktemp("astroclip-survey")
    summary = synthesize(
        str(root), 60, seed=3, image_size=32, wave_step=4.0, formats=("hdf5", "fits"), progress=False
    )
    return root, summary
