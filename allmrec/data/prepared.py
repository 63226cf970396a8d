"""Reading a prepared data set back: the manifest check, then per-user sequences.

Every stage after `data prepare` starts here. The data manifest must exist and be finished;
its fingerprint is what later manifests record as their input, so a stage trained on one
preparation refuses another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from allmrec.data.prepare import ROLE_COLD, ROLE_TRAIN, ROLE_UNSEEN
from allmrec.manifest import ArtifactError
from allmrec.stages import read_manifest

# The evaluation split of the held-out cold users: their third interaction, the first two
# as history (`PreparedData.history`).
COLD_USER_SPLIT = "cold_user"
SPLITS = ("valid", "test", COLD_USER_SPLIT)


@dataclass
class PreparedData:
    """One prepared data set in memory: what training and evaluation need of it."""

    directory: Path
    manifest: dict
    num_users: int
    num_items: int
    train: list[np.ndarray]  # train[u]: user u's training items in time order (u = 1..U)
    valid: np.ndarray  # valid[u]: the second-to-last item (0 when the user has none)
    test: np.ndarray  # test[u]: the last item (0 when none)
    # [num_items + 1] training interactions per item, of the users that are trained on
    item_train_counts: np.ndarray
    # by user id: "train", "cold" (held out of every stage) or "unseen" (outside few-shot K)
    roles: np.ndarray

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def few_shot(self) -> bool:
        """True when only some users are trained on (`data.few_shot_users`)."""
        return bool((self.roles == ROLE_UNSEEN).any())

    def eval_users(self, split: str) -> np.ndarray:
        """The users evaluated on `split`, each with a held-out item there:
        - 'valid' (model selection, part of training): the users that are trained on;
        - 'test': those too, or in a few-shot run the users outside the K ("unseen");
        - 'cold_user': the users held out of every stage (their third interaction)."""
        if split == COLD_USER_SPLIT:
            return np.flatnonzero((self.roles == ROLE_COLD) & (self._lengths() >= 3))
        target = self.targets(split)
        role = ROLE_UNSEEN if split == "test" and self.few_shot else ROLE_TRAIN
        return np.flatnonzero((target > 0) & (self.roles == role))

    def _lengths(self) -> np.ndarray:
        return np.array(
            [
                len(t) + bool(v) + bool(s)
                for t, v, s in zip(self.train, self.valid, self.test, strict=True)
            ]
        )

    def sequence(self, user: int) -> np.ndarray:
        """All of a user's items in time order (train, valid, test)."""
        return self.interacted(user)

    def targets(self, split: str) -> np.ndarray:
        """The held-out item of every user in `split` by user id (0 where none)."""
        if split == "valid":
            return self.valid
        if split == "test":
            return self.test
        if split == COLD_USER_SPLIT:
            out = np.zeros(self.num_users + 1, dtype=np.int64)
            for u in np.flatnonzero(self.roles == ROLE_COLD):
                seq = self.sequence(int(u))
                out[u] = seq[2] if len(seq) >= 3 else 0
            return out
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    def history(self, user: int, split: str) -> np.ndarray:
        """The items a model sees before predicting `split`: train (+ valid for test); for
        a held-out cold user, their first two interactions."""
        if split == "valid":
            return self.train[user]
        if split == "test":
            return (
                np.append(self.train[user], self.valid[user])
                if self.valid[user]
                else self.train[user]
            )
        if split == COLD_USER_SPLIT:
            return self.sequence(user)[:2]
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    def training_users(self) -> np.ndarray:
        """The users CF, Stage 1 and Stage 2 train on: role "train", with a target and at least
        one item before it in their training sequence."""
        return np.array(
            [
                u
                for u in range(1, self.num_users + 1)
                if len(self.train[u]) >= 2 and self.roles[u] == ROLE_TRAIN
            ],
            dtype=np.int64,
        )

    def interacted(self, user: int) -> np.ndarray:
        """Every item user `user` interacted with, in any split."""
        extra = [i for i in (self.valid[user], self.test[user]) if i]
        return np.append(self.train[user], extra).astype(np.int64)


def seeded_users(users: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """A seeded sample of at most `max_users` of `users` (all of them if None), sorted."""
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).permutation(users)[:max_users])
    return users


def worker_users(users, rank: int, world: int) -> np.ndarray:
    """Worker `rank`'s share of the training `users` of a run on `world` workers: the sorted
    users dealt round-robin, cut first to a multiple of `world` (at most `world - 1` users
    left out) so that every worker takes the same number of steps: DDP's and ZeRO-3's
    collectives would wait forever for a worker with one batch fewer."""
    users = np.sort(np.asarray(users, dtype=np.int64))
    return users[: len(users) // world * world][rank::world]


def load_prepared(run_dir: str | Path) -> PreparedData:
    directory = Path(run_dir) / "data"
    manifest = read_manifest(directory, "data")
    path = directory / "interactions"
    if not path.exists():
        raise ArtifactError(f"{path}: missing, although {directory / 'manifest.json'} exists")
    table = pq.read_table(path, columns=["user_idx", "item_idx", "position", "split"])
    order = np.lexsort((table.column("position").to_numpy(), table.column("user_idx").to_numpy()))
    users = table.column("user_idx").to_numpy()[order]
    items = table.column("item_idx").to_numpy()[order].astype(np.int64)
    split = table.column("split").to_numpy(zero_copy_only=False)[order]
    num_users, num_items = manifest["counts"]["users"], manifest["counts"]["items"]
    if len(table) != manifest["counts"]["interactions"]:
        raise ArtifactError(
            f"{path}: {len(table)} rows, but {directory / 'manifest.json'} field "
            f"'counts.interactions' says {manifest['counts']['interactions']}"
        )
    valid = np.zeros(num_users + 1, dtype=np.int64)
    test = np.zeros(num_users + 1, dtype=np.int64)
    is_valid, is_test, is_train = split == "valid", split == "test", split == "train"
    valid[users[is_valid]] = items[is_valid]
    test[users[is_test]] = items[is_test]
    train_users, train_items = users[is_train], items[is_train]
    bounds = np.searchsorted(train_users, np.arange(num_users + 2))
    train = [train_items[bounds[u] : bounds[u + 1]] for u in range(num_users + 1)]
    roles = _roles(directory, num_users)
    trained = roles[train_users] == ROLE_TRAIN
    counts = np.bincount(train_items[trained], minlength=num_items + 1)
    return PreparedData(
        directory, manifest, num_users, num_items, train, valid, test, counts, roles
    )


def _roles(directory: Path, num_users: int) -> np.ndarray:
    path = directory / "users.parquet"
    table = pq.read_table(path)
    if "role" not in table.column_names:
        raise ArtifactError(
            f"{path}: no column 'role' (made by an allmrec before the paper's scenarios); "
            "rerun `allmrec data prepare`"
        )
    roles = np.full(num_users + 1, "", dtype=object)
    roles[table.column("user_idx").to_numpy()] = table.column("role").to_pylist()
    return roles
