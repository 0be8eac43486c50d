import pytest

from clmae.errors import ConfigError
from clmae.maskers.clmae import curriculum_factor


def test_official_schedule_for_200_epochs():
    values = [curriculum_factor(e, 200) for e in range(200)]
    assert values[0] == pytest.approx(1.0)
    assert values[1] == pytest.approx(0.99)
    assert values[99] == pytest.approx(0.01)
    assert values[100] == pytest.approx(-0.01)
    assert values[199] == pytest.approx(-1.0)
    assert 0.0 not in values
    assert all(a > b for a, b in zip(values, values[1:]))


def test_linear_schedule_per_step():
    assert curriculum_factor(0.0, 10, "linear") == pytest.approx(1.0)
    assert curriculum_factor(5.0, 10, "linear") == pytest.approx(0.0)
    assert curriculum_factor(2.5, 10, "linear") == pytest.approx(0.5)
    assert curriculum_factor(10.0, 10, "linear") == pytest.approx(-1.0)


def test_constant_schedules():
    assert curriculum_factor(3, 10, "partner") == 1.0
    assert curriculum_factor(3, 10, "neutral") == 0.0
    assert curriculum_factor(3, 10, "adversary") == -1.0
    assert curriculum_factor(7, 10, "constant", value=-0.3) == -0.3


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="curriculum"):
        curriculum_factor(0, 10, "cosine")


def test_official_schedule_with_an_odd_number_of_epochs():
    """E = 5: the first ceil(E/2) epochs count down from +1 by 2/E, the rest end on −1; 0 is never hit, the
    middle value (−0.2) is skipped, as in the authors' formula."""
    assert [round(curriculum_factor(e, 5), 10) for e in range(5)] == [1.0, 0.6, 0.2, -0.6, -1.0]
    assert [curriculum_factor(e + 0.99, 5) for e in range(5)] == [curriculum_factor(e, 5) for e in range(5)]
