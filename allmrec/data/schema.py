"""The declared Arrow schemas every reader produces and every stage reads.

Raw sources (MovieLens, RecBole atomic files, Amazon Reviews) are read into these schemas;
`prepare` turns them into the prepared tables below, written as Parquet with a manifest.
"""

from __future__ import annotations

import pyarrow as pa

# What a reader yields for a source's interaction log. `source_line` is the 1-based line
# number in its file: together with the file's index it is the stable tie-break when two
# interactions of a user share a timestamp (docs/method.md, section 4, on MovieLens ties).
RAW_INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since the epoch
        pa.field("rating", pa.float32()),
        pa.field("source_line", pa.int64(), nullable=False),
    ]
)

# What a reader yields for a source's item metadata. Sources may add extra text columns
# (genres, year, brand, ...); they are all strings and appended after these.
RAW_ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
    ]
)

SPLITS = ("train", "valid", "test")

# Prepared interactions: contiguous ids (0 is the padding id for both users and items),
# each user's interactions in time order with their position, and the leave-one-out split.
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("rating", pa.float32()),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("num_train", pa.int32(), nullable=False),
        # "train" (every training stage trains on the user), "cold" (held out of every
        # stage: the cold-user scenario), "unseen" (outside a few-shot run's K users)
        pa.field("role", pa.string(), nullable=False),
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # Q_i, what Sentence-BERT embeds
        # training interactions of the users every stage trains on (role "train")
        pa.field("num_train", pa.int32(), nullable=False),
        pa.field("is_cold", pa.bool_(), nullable=False),  # data.cold_item_share's bottom
        pa.field("is_warm", pa.bool_(), nullable=False),  # ... and its top
    ]
)


def item_text_emb_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_idx", pa.int32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )
