"""Version skew: one minor behind is accepted with an update request; more is refused."""

import pytest

from fedge.update.version import check_version_skew


def test_same_minor_is_accepted_without_update():
    d = check_version_skew("1.4.2", "1.4.0")
    assert d.accepted and not d.update_required


def test_one_minor_behind_is_accepted_and_told_to_update():
    d = check_version_skew("1.4.0", "1.3.9")
    assert d.accepted and d.update_required
    assert "1.3.9" in d.reason and "1.4.0" in d.reason


@pytest.mark.parametrize(
    ("coord", "agent", "rule"),
    [
        ("1.4.0", "1.2.7", "at most one minor"),
        ("2.0.0", "1.9.0", "major versions differ"),
        ("1.4.0", "1.5.0", "newer than the coordinator"),
    ],
)
def test_beyond_one_minor_is_refused_naming_both_versions(coord, agent, rule):
    d = check_version_skew(coord, agent)
    assert not d.accepted and not d.update_required
    assert coord in d.reason and agent in d.reason and rule in d.reason


def test_dev_suffixes_are_understood():
    assert check_version_skew("0.2.0", "0.1.0+dev3").update_required


def test_unparsable_version_names_the_value():
    with pytest.raises(ValueError, match="agent version 'banana'"):
        check_version_skew("1.0.0", "banana")
