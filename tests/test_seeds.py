import numpy as np
import pytest

from fedspine.seeds import STREAMS, Seeds


def test_the_first_four_streams_are_the_old_spawned_children():
    """The partition, sampling and jitter draws did not change when the streams were named."""
    old = np.random.SeedSequence(7).spawn(4)
    for i, name in enumerate(STREAMS[:4]):
        assert np.random.default_rng(old[i]).random(3).tolist() == Seeds(7).rng(name).random(3).tolist()


def test_streams_are_distinct_repeatable_and_named_on_error():
    s = Seeds(0)
    draws = {name: s.rng(name).integers(0, 2**62) for name in STREAMS}
    assert len(set(draws.values())) == len(STREAMS)
    assert s.integer("fleet") == Seeds(0).integer("fleet") != Seeds(1).integer("fleet")
    assert 0 <= s.integer("model") < 2**31
    with pytest.raises(ValueError, match="stream must be one of"):
        s.rng("weather")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        Seeds(-1)
