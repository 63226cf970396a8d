"""The Ray Data pipeline on real MovieLens-100K and on small files written here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from allmrec.config import load_config
from allmrec.distributed.data_pipeline import DataPreparationError, prepare_data


def _read_interactions(run_dir: Path):
    return pq.read_table(run_dir / "data" / "interactions").sort_by(
        [("user_idx", "ascending"), ("position", "ascending")]
    )


@pytest.mark.slow
def test_movielens_100k_counts_and_splits(ml100k_prepared):
    run_dir, manifest = ml100k_prepared
    counts = manifest["counts"]
    # The known raw counts of MovieLens-100K.
    assert counts["raw"] == {
        "users": 943,
        "items": 1682,
        "interactions": 100_000,
        "interactions_after_dedupe": 100_000,
    }
    assert manifest["expected_raw"] == {"users": 943, "items": 1682, "interactions": 100_000}
    assert counts["users"] == 943 and counts["items"] == 1349  # 5-core on items, one pass

    table = _read_interactions(run_dir)
    assert table.num_rows == counts["interactions"]
    splits = table.column("split").to_numpy(zero_copy_only=False)
    for name in ("train", "valid", "test"):
        assert int((splits == name).sum()) == counts["splits"][name]
    df = table.to_pandas()
    for _, user in df.groupby("user_idx"):
        assert list(user["position"]) == list(range(len(user)))
        assert user["timestamp"].is_monotonic_increasing  # chronological
        assert list(user["split"].iloc[-2:]) == ["valid", "test"]
        train_items = set(user.loc[user["split"] == "train", "item_idx"])
        held_out = user.loc[user["split"] != "train", "item_idx"]
        assert not train_items & set(held_out)
    assert df["user_idx"].min() == 1 and df["user_idx"].max() == 943
    assert sorted(df["item_idx"].unique()) == list(range(1, 1350))

    items = pq.read_table(run_dir / "data" / "items.parquet")
    assert items.num_rows == 1349
    assert items.column("text")[0].as_py() == "Toy Story (1995), Animation Children's Comedy"
    # The paper's scenarios: a seeded 10% of the users held out of every training stage (role
    # "cold"), the others trained on; items count the interactions of the trained users only
    # and fall into the bottom / top 35% by that count (cold / warm).
    users = pq.read_table(run_dir / "data" / "users.parquet").to_pandas()
    assert (users["role"] == "cold").sum() == 94 and (users["role"] == "train").sum() == 849
    assert counts["users_by_role"] == {"cold": 94, "train": 849}
    trained = set(users.loc[users["role"] == "train", "user_idx"])
    rows = df[(df["split"] == "train") & df["user_idx"].isin(trained)]
    train_counts = np.bincount(rows["item_idx"], minlength=1350)[1:]
    assert np.array_equal(items.column("num_train").to_numpy(), train_counts)
    ranked = np.sort(train_counts)
    cold_max, warm_min = ranked[int(np.ceil(0.35 * 1349)) - 1], ranked[1349 - 473]
    assert manifest["item_sections"]["cold_max_interactions"] == cold_max
    assert manifest["item_sections"]["warm_min_interactions"] == warm_min
    is_cold = items.column("is_cold").to_numpy(zero_copy_only=False)
    is_warm = items.column("is_warm").to_numpy(zero_copy_only=False)
    assert np.array_equal(is_cold, train_counts <= cold_max)
    assert np.array_equal(is_warm, (train_counts >= warm_min) & ~is_cold)
    assert 0.35 <= is_cold.mean() < 0.40 and 0.35 <= is_warm.mean() < 0.40
    assert int(is_cold.sum()) == counts["cold_items"] and int(is_warm.sum()) == counts["warm_items"]

    emb = pq.read_table(run_dir / "data" / "item_text_emb.parquet")
    assert emb.num_rows == 1349 and manifest["text_encoder"]["dim"] == 384
    vectors = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.shape == (1349, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # MiniLM normalises
    assert emb.column("item_idx").to_pylist() == list(range(1, 1350))

    on_disk = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"]
    assert "tie_break" in on_disk["preprocessing"]


def _write_ml100k(directory: Path, rows: list[str], items: list[tuple[int, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text("".join(r + "\n" for r in rows))
    flags = "|".join(["0"] * 18 + ["1"])
    (directory / "u.item").write_text(
        "".join(f"{i}|{title}|01-Jan-1995||http://x|{flags}\n" for i, title in items),
        encoding="latin-1",
    )
    return directory


def _small_source(directory: Path, users: int = 4, per_user: int = 5) -> list[str]:
    rows = []
    for u in range(1, users + 1):
        for k in range(per_user):
            rows.append(f"{u}\t{k + 1}\t4\t{1000 + 10 * k}")
    return rows


def _config(directory: Path, *overrides: str):
    return load_config(
        [],
        [
            f"data.source={directory}",
            "data.format=grouplens-100k",
            "data.min_user_interactions=3",
            "data.min_item_interactions=2",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_small_files_tie_break_dedupe_and_bad_lines(ray_local, tmp_path):
    rows = _small_source(tmp_path)
    # user 1: items 6 and 7 share the last timestamp; the later line must become the test item.
    rows += ["1\t6\t5\t5000", "1\t7\t5\t5000", "1\t2\t1\t6000"]  # item 2 again: a duplicate
    rows += ["2\t6\t3\t100", "2\t7\t3\t110", "3\t6\t3\t100", "3\t7\t3\t120"]
    rows += ["this line is broken", "2\t3\tfive\t1000"]  # lines 28 and 29
    src = _write_ml100k(tmp_path / "src", rows, [(i, f"Movie {i} (1995)") for i in range(1, 8)])

    with pytest.raises(DataPreparationError) as err:
        prepare_data(_config(src), tmp_path / "run")
    assert "2 malformed interaction line(s)" in str(err.value)
    assert "u.data line 29" in str(err.value) and "rating" in str(err.value)
    assert not (tmp_path / "run" / "data").exists()  # nothing half-written

    manifest = prepare_data(_config(src, "data.max_bad_lines=2"), tmp_path / "run")
    assert manifest["counts"]["bad_lines"]["interactions"] == 2
    assert any("line 28" in b for b in manifest["bad_lines"])
    table = _read_interactions(tmp_path / "run")
    user1 = table.filter(pc.equal(table.column("user_idx"), 1)).to_pandas()
    # dedupe kept the first interaction with item 2, at timestamp 1010
    assert (user1["item_idx"] == 2).sum() == 1
    assert user1.loc[user1["item_idx"] == 2, "timestamp"].item() == 1010
    assert list(user1["item_idx"].iloc[-2:]) == [6, 7]  # source order breaks the tie
    assert list(user1["split"].iloc[-2:]) == ["valid", "test"]


@pytest.mark.slow
def test_empty_after_filtering_leaves_nothing(ray_local, tmp_path):
    src = _write_ml100k(
        tmp_path / "src",
        _small_source(tmp_path, users=2, per_user=3),
        [(i, f"Movie {i}") for i in range(1, 4)],
    )
    with pytest.raises(DataPreparationError, match="no interactions left"):
        prepare_data(_config(src, "data.min_user_interactions=10"), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_unknown_source_and_missing_format(tmp_path):
    with pytest.raises(ValueError, match="not a fetchable data set"):
        prepare_data(load_config([], ["data.source=movielens-42m"]), tmp_path)
    with pytest.raises(ValueError, match="data.format: required"):
        prepare_data(load_config([], [f"data.source={tmp_path}"]), tmp_path / "run")


def _gz(path: Path, text: str, truncate: int = 0) -> None:
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


BROKEN_SOURCES = {
    # a .json.gz cut off in the middle of its gzip stream
    "truncated-json-gz": (
        "amazon-2018",
        lambda d: (
            _gz(
                d / "Books.json.gz",
                "".join(
                    json.dumps(
                        {
                            "reviewerID": f"u{u}",
                            "asin": f"i{i}",
                            "overall": 5.0,
                            "unixReviewTime": 1000 + i,
                        }
                    )
                    + "\n"
                    for u in range(40)
                    for i in range(10)
                ),
                truncate=200,
            ),
            _gz(d / "meta_Books.json.gz", json.dumps({"asin": "i1", "title": "A"}) + "\n"),
        ),
        "Books.json.gz",
    ),
    # a pair of zero-byte RecBole files
    "empty-recbole": (
        "recbole",
        lambda d: ((d / "x.inter").write_bytes(b""), (d / "x.item").write_bytes(b"")),
        "x.inter",
    ),
    # GroupLens-1M's ratings.dat written with tabs where it uses '::'
    "ml-1m-with-tabs": (
        "grouplens-1m",
        lambda d: (
            (d / "ratings.dat").write_text(
                "".join(f"{u}\t{i}\t4\t97830{i}\n" for u in range(1, 9) for i in range(1, 9))
            ),
            (d / "movies.dat").write_text("1::A (1990)::Drama\n"),
        ),
        "ratings.dat",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_broken_data_through_ray_data_ends_in_one_line_of_ours(ray_local, tmp_path, capsys, case):
    from allmrec.cli import main
    from allmrec.console import shown_on_terminal

    fmt, write, bad_file = BROKEN_SOURCES[case]
    source = tmp_path / "source"
    source.mkdir()
    write(source)
    args = ["data", "prepare", "--run-dir", str(tmp_path / "run")]
    args += ["--set", f"data.source={source}", "--set", f"data.format={fmt}"]
    assert main(args) == 2
    # What a terminal shows: Ray forwards the failed task's own lines from its worker, and on
    # a loaded machine one can land after main() returned, past the command's filter (the
    # session's Ray outlives the command; a Ray the command starts is shut down first).
    err = [line for line in capsys.readouterr().err.splitlines() if shown_on_terminal(line)]
    assert err[-1].startswith("allmrec: error: ") and bad_file in err[-1], err[-5:]
    assert "retried_io_errors" not in err[-1] and "Ray" not in err[-1]
    # and Ray Data's record of the failed operator, with its traceback, only in the log
    assert not [line for line in err if line.startswith(("Traceback", "  File "))], err[:8]
    assert not [line for line in err if "streaming_executor" in line or "Full stack" in line]
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()
