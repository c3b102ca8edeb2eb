"""Every venue's golden fixtures (real message shapes, expected records written by hand)."""

from __future__ import annotations

import pytest

from tests.unit.golden import DECODERS, VENUES, check_case, load_cases

CASES = [(venue, i, case) for venue in VENUES for i, case in enumerate(load_cases(venue))]


@pytest.mark.parametrize(("venue", "index", "case"), CASES,
                         ids=[f"{v}-line{i + 1}" for v, i, _ in CASES])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_golden(venue: str, index: int, case: dict[str, object], decoder: str) -> None:
    check_case(venue, case, DECODERS[decoder])


def test_every_venue_has_fixtures() -> None:
    assert {v for v, _, _ in CASES} == set(VENUES)
