"""Guidance scales are finite numbers wherever they are built: a NaN scale makes every sample NaN."""
from __future__ import annotations

import math

import pytest

from diffusion_core.guidance import GuidanceInterval, GuidanceSchedule, parse_guidance_scale


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "constant:nan", "linear:nan:1",
                                   "cosine:4:inf", "nan@0:500", "linear:1:nan@0:500"])
def test_non_finite_scales_are_refused(value):
    with pytest.raises(ValueError, match="finite"):
        parse_guidance_scale(value)


def test_the_dataclasses_refuse_them_too():
    with pytest.raises(ValueError, match="finite"):
        GuidanceSchedule("linear", math.nan, 1.0)
    with pytest.raises(ValueError, match="finite"):
        GuidanceInterval(2.0, 0.0, 500.0, outside=math.inf)
    with pytest.raises(ValueError, match="finite"):
        GuidanceInterval(math.nan, 0.0, 500.0)


def test_finite_scales_still_parse():
    assert parse_guidance_scale("2.5") == 2.5 and parse_guidance_scale(-1) == -1.0
    assert parse_guidance_scale("linear:4:1@0:600").scale == GuidanceSchedule("linear", 4.0, 1.0, 1000)
