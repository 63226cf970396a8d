"""The steps of data preparation as plain functions on Arrow tables.

The Ray Data pipeline (`allmrec.distributed.data_pipeline`) applies them block by block and
group by group; they know nothing of Ray, so each can be tested and reused alone.

Order of the steps, as the paper's preprocessing: read -> keep each user's first interaction
with an item (`dedupe`) -> keep users and items with at least k interactions (once, as the
reference code does, or repeated to a k-core) -> contiguous ids -> each user's interactions
in time order -> leave-one-out split (last = test, second-to-last = validation).

Timestamps tie often (MovieLens-1M: 2,544 of 6,040 users have their last two ratings in the
same second), so the time order is made deterministic with a stable tie-break on the source
order: (timestamp, file index, line number).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from allmrec.data.schema import INTERACTIONS_SCHEMA

TIE_BREAK = "stable sort on (timestamp, source file index, source line number)"
SORT_KEYS = [("timestamp", "ascending"), ("file_index", "ascending"), ("source_line", "ascending")]


def sort_user_group(group: pa.Table, dedupe: bool) -> pa.Table:
    """One user's interactions in time order; with `dedupe`, only the first of each item."""
    group = group.sort_by(SORT_KEYS)
    if dedupe and group.num_rows > 1:
        items = group.column("item_id").to_numpy(zero_copy_only=False)
        _, first = np.unique(items, return_index=True)
        if len(first) < group.num_rows:
            group = group.take(pa.array(np.sort(first)))
    return group


def keep_ids(table: pa.Table, column: str, allowed: pa.Array) -> pa.Table:
    return table.filter(pc.is_in(table.column(column), value_set=allowed))


def passing_ids(counts: dict[str, int], minimum: int) -> list[str]:
    return [key for key, n in counts.items() if n >= minimum]


def contiguous_ids(raw_ids: list[str]) -> list[str]:
    """Raw ids in the order their new ids follow (new id = index + 1; 0 is padding).

    Numeric ids sort as numbers (MovieLens' 1, 2, ..., 10), others as strings, so the mapping
    depends only on the set of ids, never on the order blocks arrive in.
    """
    if all(i.isdigit() for i in raw_ids):
        return sorted(raw_ids, key=int)
    return sorted(raw_ids)


def remap_block(table: pa.Table, user_order: pa.Array, item_order: pa.Array) -> pa.Table:
    """Replace raw ids with contiguous ones (1-based) using the orders from `contiguous_ids`."""
    user_idx = pc.add(pc.index_in(table.column("user_id"), value_set=user_order), 1)
    item_idx = pc.add(pc.index_in(table.column("item_id"), value_set=item_order), 1)
    return (
        table.drop_columns(["user_id", "item_id"])
        .append_column("user_idx", user_idx.cast(pa.int32()))
        .append_column("item_idx", item_idx.cast(pa.int32()))
    )


def split_user_group(group: pa.Table) -> pa.Table:
    """Leave-one-out split of one user's (already deduplicated) interactions.

    Last = test, second-to-last = validation, the rest train. A user with fewer than 3
    interactions keeps them all in train (as the reference SASRec code does).
    """
    group = group.sort_by(SORT_KEYS)
    n = group.num_rows
    split = np.full(n, "train", dtype=object)
    if n >= 3:
        split[-1] = "test"
        split[-2] = "valid"
    return pa.table(
        {
            "user_idx": group.column("user_idx"),
            "item_idx": group.column("item_idx"),
            "timestamp": group.column("timestamp"),
            "rating": group.column("rating"),
            "position": pa.array(np.arange(n, dtype=np.int32)),
            "split": pa.array(split, type=pa.string()),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def item_text(fields: dict[str, object], template: str) -> str:
    """Q_i from the template, "No Title" / "No Description" where those are missing."""
    values = {k: ("" if v is None else str(v)).strip() for k, v in fields.items()}
    if not values.get("title"):
        values["title"] = "No Title"
    if not values.get("description"):
        values["description"] = "No Description"
    try:
        return template.format(**values)
    except KeyError as exc:
        raise ValueError(
            f"data.text_template {template!r} names field {exc}, which the items do not "
            f"have; available: {', '.join(sorted(values))}"
        ) from None


# ---------------------------------------------------------------------------------------------
# The paper's scenarios (docs/method.md, section 4): who trains, and which items are cold.

ROLE_TRAIN, ROLE_COLD, ROLE_UNSEEN = "train", "cold", "unseen"


def user_roles(
    interactions_per_user: np.ndarray, cold_share: float, few_shot: int | None, seed: int
) -> np.ndarray:
    """Each user's role by user id (index 0, padding, is ""):

    - "cold": a seeded `cold_share` of the users (among those with at least 3 interactions),
      left out of every training stage and evaluated on their third interaction with the
      first two as history (the paper's cold users had exactly 3 interactions; MovieLens has
      none, so a seeded sample stands in);
    - "train": the users every training stage trains on; with `few_shot`, only that many
      seeded users of the others (the paper's K);
    - "unseen": the rest, when `few_shot` is set: trained on by no stage, evaluated on their
      test item.

    `interactions_per_user[u]` counts user u's interactions (all splits); one permutation,
    seeded by `seed`, deals the cold users first and the few-shot users next, so K = 128's
    users are K = 256's first 128.
    """
    counts = np.asarray(interactions_per_user)
    users = np.arange(1, len(counts))
    order = np.random.default_rng([seed, 3]).permutation(users)
    roles = np.full(len(counts), ROLE_TRAIN, dtype=object)
    roles[0] = ""
    eligible = order[counts[order] >= 3]
    n_cold = int(round(cold_share * len(users)))
    if n_cold > len(eligible):
        raise ValueError(
            f"data.cold_user_share={cold_share}: {n_cold} cold users wanted, but only "
            f"{len(eligible)} users have the 3 interactions a cold user is evaluated on"
        )
    cold = eligible[:n_cold]
    roles[cold] = ROLE_COLD
    if few_shot is not None:
        rest = order[roles[order] == ROLE_TRAIN]
        if few_shot > len(rest):
            raise ValueError(
                f"data.few_shot_users={few_shot}: only {len(rest)} users are left after the "
                f"{n_cold} cold users"
            )
        roles[rest[few_shot:]] = ROLE_UNSEEN
    return roles


def popularity_sections(
    counts: np.ndarray, share: float, threshold: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(cold mask, warm mask, the rule with its thresholds) of items by their training
    interactions `counts` (one per item).

    The paper's Table 4: items ranked by interactions, the bottom `share` cold, the top
    `share` warm, the middle in neither. Items tied with the item at a boundary fall on its
    side (so a section can hold a little more than `share`); an item never counts as both.
    With `threshold`, the older label instead: fewer interactions than it cold, the rest warm.
    """
    counts = np.asarray(counts)
    if threshold is not None:
        cold = counts < threshold
        return cold, ~cold, {"rule": f"fewer than {threshold} training interactions"}
    n = len(counts)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, bool), {"rule": "no items"}
    ranked = np.sort(counts)
    k = max(1, int(np.ceil(share * n)))
    cold_max, warm_min = int(ranked[k - 1]), int(ranked[n - k])
    cold = counts <= cold_max
    warm = (counts >= warm_min) & ~cold
    return (
        cold,
        warm,
        {
            "rule": f"items ranked by training interactions: the bottom {share:.0%} cold, "
            f"the top {share:.0%} warm, ties on the boundary item's side",
            "cold_max_interactions": cold_max,
            "warm_min_interactions": warm_min,
        },
    )
