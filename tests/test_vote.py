"""Voting rules, table-driven: majority per style, mixed, weighted, hybrid, ties, failed paths, early stop."""

import pytest

from mdlite.vote import Tally, Vote, agree, tally, vote

N = None
CASES = [
    # (mode, cot answers, pot answers, knobs, expected answer, expected decided_by)
    ("cot", [8, 8, 7], [1, 1, 1], {}, 8, "cot"),
    ("pot", [8, 8, 8], [1, 1, 7], {}, 1, "pot"),
    ("mixed", [8, 7, 7], [8, 8, N], {}, 8, "mixed"),  # 8: cot 1 + pot 2 = 3 votes against 7: 2
    ("mixed", [7, 7, 7], [8, 8], {}, 7, "mixed"),
    ("mixed", [7, 7, 7], [8, 8], {"pot_weight": 2.0}, 8, "mixed"),  # weighted: 8 weighs 4 against 3
    ("mixed", [7, 7, 7], [8, 8], {"cot_weight": 0.5, "pot_weight": 1.0}, 8, "mixed"),
    ("mixed", [N, N], [5, N], {}, 5, "pot"),  # only one style answered
    ("hybrid", [7, 7, 7], [8, N, N], {}, 8, "pot"),  # one program answered: PoT decides
    ("hybrid", [7, 7, 3], [N, N, N], {}, 7, "cot"),  # every program failed: CoT fallback
    ("hybrid", [N], [N, N], {}, N, "none"),
    # ties: equal weight goes to the answer seen first, PoT paths read before CoT paths
    ("cot", [3, 4, 4, 3], [], {}, 3, "cot"),
    ("cot", [4, 3, 3, 4], [], {}, 4, "cot"),
    ("pot", [], [2, 9], {}, 2, "pot"),
    ("mixed", [7], [8], {}, 8, "mixed"),
    ("mixed", [7, 8], [N, N], {}, 7, "cot"),
    ("mixed", [7, 7], [8, 8], {}, 8, "mixed"),
    ("mixed", [7, 7], [8], {"pot_weight": 2.0}, 8, "mixed"),  # weighted tie 2 vs 2: PoT first
    # all paths failed, or none sampled
    ("cot", [N, N], [5], {}, N, "none"),
    ("pot", [5], [N, N, N], {}, N, "none"),
    ("mixed", [N], [N], {}, N, "none"),
    ("mixed", [], [], {}, N, "none"),
    # answers that answers_match vote together (the group keeps its first answer); others apart
    ("cot", [3, 2.5, 2.5000001], [], {}, 2.5, "cot"),  # within a relative 1e-6
    ("cot", [7, 12, 11.999999999], [], {}, 12, "cot"),  # float noise
    ("cot", [3, 0.3333, 1 / 3], [], {}, 3, "cot"),  # 0.3333 is not 1/3: three groups of 1, first wins
    ("cot", [100000.0, 100000.5, 100001.0, 7, 7], [], {}, 7, "cot"),  # whole numbers are exact
]


@pytest.mark.parametrize(("mode", "cot", "pot", "knobs", "answer", "decided_by"), CASES)
def test_vote_rules(mode, cot, pot, knobs, answer, decided_by):
    result = vote(mode, cot=cot, pot=pot, **knobs)
    assert result.answer == answer
    assert result.decided_by == decided_by


def test_tallies_are_ranked_with_counts_and_weights():
    result = tally(cot=[7, 8, 7, None], pot=[8, 8, 1.0000001], cot_weight=1.0, pot_weight=1.5)
    assert result == Vote(answer=8, decided_by="mixed", tallies=(
        Tally(answer=8, weight=4.0, cot=1, pot=2), Tally(answer=7, weight=2.0, cot=2, pot=0),
        Tally(answer=1.0000001, weight=1.5, cot=0, pot=1)))


def test_tolerance_groups_a_path_with_the_first_matching_group():
    # 2.500002 matches both 2.5 and 2.500004 (which do not match each other); it joins 2.5, the first.
    result = tally(cot=[2.5, 2.500004, 2.500002])
    assert [(t.answer, t.cot) for t in result.tallies] == [(2.5, 2), (2.500004, 1)]


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode must be one of"):
        vote("majority", cot=[1])


@pytest.mark.parametrize(("answers", "expected"), [
    ([8, 8], True),
    ([8, 8.0000001], True),
    ([8, 7], False),
    ([8, N], False),
    ([N, N], False),  # agreeing failures are no reason to stop
    ([8], False),  # one path cannot agree with itself
    ([3, 3, 3], True),
    ([3, 3, 4], False),
])
def test_agree_is_the_early_stopping_test(answers, expected):
    assert agree(answers) is expected
