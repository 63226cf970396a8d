"""The Stage-2 prompt of A-LLMRec (docs/method.md, section 3), one per user.

Movies domain, with `[UserRep]` standing for F_U(x_u), `[HistoryEmb]` and `[CandidateEmb]` for
F_I(z_i) of the item whose quoted title precedes it:

    [UserRep] is a user representation. This user has watched "t1"[HistoryEmb], "t2"[HistoryEmb]
    in the previous. Recommend one next movie for this user to watch next from the following
    movie title set, "c1"[CandidateEmb], "c2"[CandidateEmb]. The recommendation is

(one line, ending with a space). The reference code joins titles with "," and writes
"representation.This"; this code writes ", " and a space after the full stop.
The training target is the true item's quoted title followed by the tokenizer's own EOS.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

USER_TOKEN = "[UserRep]"
HISTORY_TOKEN = "[HistoryEmb]"
CANDIDATE_TOKEN = "[CandidateEmb]"
MAX_HISTORY = 10


@dataclass(frozen=True)
class Domain:
    past: str  # "watched"
    noun: str  # "movie"
    verb: str  # "watch"


DOMAINS = {
    "movies": Domain("watched", "movie", "watch"),
    "games": Domain("played", "game", "play"),
    "products": Domain("bought", "item", "buy"),
}


@dataclass
class Prompt:
    """The prompt text and the item id behind each [HistoryEmb] / [CandidateEmb], in order."""

    text: str
    history_items: list[int]
    candidate_items: list[int]
    with_embeddings: bool = True  # False: the LLM-only baseline, titles and no special tokens

    @property
    def items(self) -> list[int]:
        """Item ids in the order their tokens occur: history first, then candidates."""
        return self.history_items + self.candidate_items if self.with_embeddings else []


def quote_title(title: str) -> str:
    return f'"{title}"'


def shown_items(history: Sequence[int], max_history: int = MAX_HISTORY) -> Sequence[int]:
    """The items of `history` (oldest first) that a prompt shows: the last `max_history` of
    them, none for 0. The text readouts read the same ones (`stage2.shown_history`)."""
    return history[-max_history:] if max_history > 0 else history[:0]


def build_prompt(
    history: Sequence[int],
    candidates: Sequence[int],
    titles: Mapping[int, str] | Sequence[str],
    domain: str = "movies",
    max_history: int = MAX_HISTORY,
    with_embeddings: bool = True,
) -> Prompt:
    """The prompt for one user: the last `max_history` items of `history` (oldest first) and
    `candidates` in the order given (shuffle them with `shuffle_candidates` first).

    `titles` maps an item id to its title (a dict, or a list/array indexed by item id).
    `with_embeddings=False` gives the LLM-only baseline's prompt: the same words without
    `[UserRep]` (and its sentence), `[HistoryEmb]` or `[CandidateEmb]`.
    """
    if domain not in DOMAINS:
        raise ValueError(f"prompt domain {domain!r}: expected one of {', '.join(DOMAINS)}")
    d = DOMAINS[domain]
    history_items = [int(i) for i in shown_items(history, max_history)]
    candidate_items = [int(i) for i in candidates]
    history_token = HISTORY_TOKEN if with_embeddings else ""
    candidate_token = CANDIDATE_TOKEN if with_embeddings else ""
    history_text = ", ".join(quote_title(titles[i]) + history_token for i in history_items)
    candidate_text = ", ".join(quote_title(titles[i]) + candidate_token for i in candidate_items)
    user_text = f"{USER_TOKEN} is a user representation. " if with_embeddings else ""
    text = (
        f"{user_text}This user has {d.past} {history_text} in the "
        f"previous. Recommend one next {d.noun} for this user to {d.verb} next from the "
        f"following {d.noun} title set, {candidate_text}. The recommendation is "
    )
    return Prompt(text, history_items, candidate_items, with_embeddings)


def target_text(title: str, eos_token: str) -> str:
    """The training target: the quoted title, then the tokenizer's own EOS."""
    return quote_title(title) + eos_token


def shuffle_candidates(candidates: Sequence[int], seed: int) -> list[int]:
    """A seeded shuffle (the reference's is unseeded, so its evaluations are not comparable)."""
    out = [int(i) for i in candidates]
    random.Random(seed).shuffle(out)
    return out
