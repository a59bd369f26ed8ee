"""Voting over the answers of sampled CoT and PoT paths; pure functions, keyword-only knobs.

    from mdlite.vote import vote
    vote("mixed", cot=[8.0, 7.0, None], pot=[8.0, None]).answer        # 8.0
    vote("hybrid", cot=[7.0], pot=[None, None]).decided_by             # 'cot' (every program failed)

An answer is a float, or None for a failed path (no parseable answer, or a program that errored).
Modes:
- `cot`, `pot`: majority over that style's answers only.
- `mixed`: majority over the answers of both styles; `cot_weight` / `pot_weight` make it a weighted
  vote (each path counts its style's weight).
- `hybrid` (MAmmoTH): majority over the PoT answers; only when every program failed, over the CoT ones.
Answers are grouped with `answers_match` (the rule eval and teach judge by): a path joins the first
group whose first answer it matches, in path order. Tie rule: the group with the larger total weight wins;
among equal weights, the group whose first answer came first, reading the PoT paths before the CoT
paths (programs are checked by execution), each in path order. No valid answer: answer None.
`mdlite eval`'s maj@k applies this same tie rule (mdlite.evaluate.vote_at_k).
`agree` is the early-stopping test: sampling may stop when the first paths all agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mdlite.answers import answers_match

MODES = ("cot", "pot", "mixed", "hybrid")


@dataclass(frozen=True)
class Tally:
    """One group of matching answers: its value (the group's first answer), total weight and counts."""

    answer: float
    weight: float
    cot: int
    pot: int


@dataclass(frozen=True)
class Vote:
    """The winning answer (None when no path gave one), every group best first, and which style decided."""

    answer: float | None
    tallies: tuple[Tally, ...]
    decided_by: str  # "cot", "pot", "mixed" or "none"


def vote(mode: str, *, cot: Sequence[float | None] = (), pot: Sequence[float | None] = (),
         cot_weight: float = 1.0, pot_weight: float = 1.0) -> Vote:
    """The answer of `mode` over the CoT and PoT paths' answers (see the module docstring)."""
    if mode == "cot":
        return tally(cot=cot)
    if mode == "pot":
        return tally(pot=pot)
    if mode == "mixed":
        return tally(cot=cot, pot=pot, cot_weight=cot_weight, pot_weight=pot_weight)
    if mode == "hybrid":
        result = tally(pot=pot)
        return result if result.answer is not None else tally(cot=cot)
    raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


def tally(*, cot: Sequence[float | None] = (), pot: Sequence[float | None] = (), cot_weight: float = 1.0,
          pot_weight: float = 1.0) -> Vote:
    """Weighted majority over all given answers; groups best first by the tie rule."""
    groups: list[list] = []  # [answer, weight, cot count, pot count], in order of first appearance
    for style, answers, weight in (("pot", pot, pot_weight), ("cot", cot, cot_weight)):
        for answer in answers:
            if answer is None:
                continue
            group = next((g for g in groups if answers_match(answer, g[0])), None)
            if group is None:
                group = [answer, 0.0, 0, 0]
                groups.append(group)
            group[1] += weight
            group[2 if style == "cot" else 3] += 1
    ranked = sorted(groups, key=lambda g: -g[1])  # stable: equal weights keep first-appearance order
    tallies = tuple(Tally(answer=g[0], weight=g[1], cot=g[2], pot=g[3]) for g in ranked)
    if not tallies:
        return Vote(answer=None, tallies=(), decided_by="none")
    styles = {"cot" for t in tallies if t.cot} | {"pot" for t in tallies if t.pot}
    return Vote(answer=tallies[0].answer, tallies=tallies, decided_by=styles.pop() if len(styles) == 1 else "mixed")


def agree(answers: Sequence[float | None]) -> bool:
    """True when there are at least two answers, none failed, and all match the first."""
    if len(answers) < 2 or any(a is None for a in answers):
        return False
    return all(answers_match(a, answers[0]) for a in answers[1:])
