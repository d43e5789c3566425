"""``-c key=value`` overrides (:func:`diffim.tasks.base.apply_config_overrides`) on list fields and bad values."""

from __future__ import annotations

import pytest

from diffim.errors import ConfigError
from diffim.pipeline import make_config


def test_bare_string_on_a_list_field_is_one_element_not_its_characters():
    cfg = make_config(["forcedMeasurement.badMaskPlanes=BAD", "detection.statsMask=SAT"])
    assert list(cfg.forcedMeasurement.badMaskPlanes) == ["BAD"]
    assert list(cfg.detection.statsMask) == ["SAT"]


def test_comma_separated_and_literal_lists():
    cfg = make_config(["detection.statsMask=BAD, SAT,EDGE"])
    assert list(cfg.detection.statsMask) == ["BAD", "SAT", "EDGE"]
    cfg = make_config(["detection.statsMask=['NO_DATA', 'SAT']"])
    assert list(cfg.detection.statsMask) == ["NO_DATA", "SAT"]


def test_valid_plugin_name_is_accepted():
    cfg = make_config(["forcedMeasurement.plugins=base_PsfFlux"])
    assert list(cfg.forcedMeasurement.plugins) == ["base_PsfFlux"]


def test_bad_value_message_is_short_and_names_the_field():
    with pytest.raises(ConfigError) as info:
        make_config(["detection.thresholdValue=abc"])
    msg = str(info.value)
    assert "detection.thresholdValue" in msg and "abc" in msg
    assert "For more information" not in msg and "\n" not in msg


def test_validation_error_is_one_line():
    """A combination pex_config's validate() rejects: one line naming the fields, no source-file trailer."""
    with pytest.raises(ConfigError) as info:
        make_config(["detection.thresholdType=variance", "detection.thresholdPolarity=both"])
    msg = str(info.value)
    assert "thresholdPolarity" in msg and "For more information" not in msg and "\n" not in msg
