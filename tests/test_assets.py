import os

import pytest

from fedspine.assets import ASSETS, asset_path

IN_CI = os.environ.get("CI") == "true"


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(ASSETS))
def test_packaged_assets_are_installed_by_setup(name):
    """Skipped where scripts/setup.sh has not run; in CI a missing asset is a failure."""
    try:
        path = asset_path(name)
    except FileNotFoundError as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))
    assert path.exists()
    if path.is_dir():
        assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    else:
        assert path.stat().st_size > 100_000


def test_unknown_asset_names_the_choices():
    with pytest.raises(ValueError, match=r"asset must be one of \['all-minilm-l6-v2'"):
        asset_path("bert-base")
