"""Codec: exact round trip for categories, bounded error for numbers, no data statistics."""

import numpy as np
import pandas as pd
import pytest

from fedsynth.generative.codec import Codec
from tests.factories import small_frame, small_spec


def _codes_and_offsets(codec: Codec, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.stack(
        [data[:, c.start : c.start + c.block_size].argmax(1) for c in codec.columns], axis=1
    )
    return codes, data[:, codec.offset_indices]


def test_round_trip_is_exact_for_categories_and_close_for_numbers():
    spec = small_spec()
    codec = Codec(spec.schema, default_bins=16)
    frame = small_frame()
    data, levels = codec.encode(frame)
    assert data.shape == (len(frame), codec.width)
    decoded = codec.decode(*_codes_and_offsets(codec, data.numpy().astype(np.float64)))
    assert list(decoded.columns) == list(frame.columns)
    for name in ("ward", "outcome", "visits", "age"):
        pd.testing.assert_series_equal(decoded[name], frame[name], check_names=False)
    pd.testing.assert_series_equal(decoded["smoker"], frame["smoker"], check_names=False)
    assert decoded["cost"].isna().equals(frame["cost"].isna())
    both = frame["cost"].notna()
    np.testing.assert_allclose(decoded["cost"][both], frame["cost"][both], rtol=1e-4, atol=1e-3)
    delta = (decoded["admitted"] - frame["admitted"]).abs().max()
    assert delta <= pd.Timedelta(seconds=1)
    assert levels.shape == (len(frame), 3)  # ward, smoker, outcome


def test_codec_depends_on_schema_only():
    spec = small_spec()
    a = Codec(spec.schema).encode(small_frame(seed=1))[0]
    b = Codec(spec.schema).encode(small_frame(seed=1).iloc[:50])[0]
    assert np.array_equal(a[:50].numpy(), b.numpy())  # same row, same code, any table


def test_small_integer_ranges_get_exact_bins():
    codec = Codec(small_spec().schema, default_bins=16)
    visits = next(c for c in codec.columns if c.column.name == "visits")
    assert visits.exact and visits.n_bins == 6 and not visits.has_offset


def test_conditions_are_checked_against_the_schema():
    codec = Codec(small_spec().schema)
    vec = codec.condition_vector({"ward": "rare", "smoker": "yes"}, 3)
    assert vec.shape == (3, codec.cond_width) and vec.sum().item() == 6
    with pytest.raises(ValueError, match="'ward'.*'nowhere' is not a declared category"):
        codec.condition_vector({"ward": "nowhere"}, 1)
    with pytest.raises(ValueError, match="unknown column 'wrad'"):
        codec.condition_vector({"wrad": "a"}, 1)
    with pytest.raises(ValueError, match="only categorical and boolean columns"):
        codec.condition_vector({"age": "3"}, 1)


def test_generator_fast_path_equals_forward():
    import torch

    from fedsynth.generative.networks import Generator

    torch.manual_seed(0)
    generator = Generator(8, 5, [16, 24], 11).eval()
    z, cond = torch.randn(300, 8), torch.randn(300, 5)
    with torch.no_grad():
        expected = generator(z, cond)
    torch.testing.assert_close(generator.generate(z, cond), expected, rtol=1e-5, atol=1e-5)
