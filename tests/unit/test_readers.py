"""Tests of the raw-format readers on small, realistic files written into tmp_path."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from allmrec.config import DataConfig
from allmrec.data.readers import (
    FORMATS,
    BadLine,
    DataFormatError,
    find_source_files,
    iter_interaction_batches,
    open_text,
    read_items,
    readable_from_every_node,
    source_sha256,
)
from allmrec.data.schema import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA
from allmrec.data.sources import resolve_source


def write(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def jsonl(*objs: object) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def read_all(path: str, fmt: str, **kw: object) -> tuple[pa.Table, list[BadLine]]:
    tables, bad = [], []
    for table, batch_bad in iter_interaction_batches(path, fmt, **kw):
        assert table.schema.equals(RAW_INTERACTIONS_SCHEMA)
        tables.append(table)
        bad.extend(batch_bad)
    return pa.concat_tables(tables), bad


def rows(table: pa.Table) -> list[tuple]:
    return [tuple(r.values()) for r in table.to_pylist()]


def bad_summary(bad: list[BadLine]) -> list[tuple[int, str]]:
    return [(b.line_no, b.reason) for b in bad]


# ---------------------------------------------------------------------------- grouplens-100k


def test_grouplens_100k_interactions(tmp_path: Path) -> None:
    path = write(
        tmp_path / "u.data",
        "196\t242\t3\t881250949\n"
        "186\t302\t3\t891717742\n"
        "\n"  # blank: skipped, not bad
        "22\t377\t1\n"  # 4: too few fields
        "244\t51\tabc\t880606923\n"  # 5: rating not a number
        "166\t346\t1\tyesterday\n"  # 6: timestamp not a number
        "\t474\t4\t884182806\n"  # 7: empty user id
        "115\t265\t2\t881171488\n",
    )
    table, bad = read_all(path, "grouplens-100k")
    assert rows(table) == [
        ("196", "242", 881250949, 3.0, 1),
        ("186", "302", 891717742, 3.0, 2),
        ("115", "265", 881171488, 2.0, 8),
    ]
    assert bad_summary(bad) == [
        (4, "expected 4 tab-separated fields (user id, item id, rating, timestamp), got 3"),
        (5, "field 'rating': expected a number, got 'abc'"),
        (6, "field 'timestamp': expected an integer timestamp, got 'yesterday'"),
        (7, "field 'user id': expected a non-empty id, got an empty one"),
    ]
    assert bad[1].path == path and bad[1].text == "244\t51\tabc\t880606923"
    assert bad[1].describe() == (
        "u.data line 5: field 'rating': expected a number, got 'abc' "
        "(line: '244\\t51\\tabc\\t880606923')"
    )


def test_grouplens_100k_items_latin1_genres_and_duplicates(tmp_path: Path) -> None:
    flags_toy = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"  # Animation, Children's, Comedy
    flags_drama = "0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0"
    url = "http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
    path = write(
        tmp_path / "u.item",
        f"1|Toy Story (1995)|01-Jan-1995||{url}|{flags_toy}\n"
        f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{flags_drama}\n"
        "3|Too short|01-Jan-1995\n"  # bad: field count
        f"4|Bad flag|01-Jan-1995||http://x|{flags_drama[:-1]}2\n"  # bad: flag 2
        f"1|Toy Story again|01-Jan-1995||{url}|{flags_drama}\n"  # duplicate: first kept
        f"267|unknown|||http://x|{'1|' + '0|' * 17 + '0'}\n",
        encoding="latin-1",
    )
    table, bad = read_items(path, "grouplens-100k")
    assert table.schema.names == [*RAW_ITEMS_SCHEMA.names, "genres", "release_date"]
    assert table.schema.field("item_id").equals(RAW_ITEMS_SCHEMA.field("item_id"))
    assert table.to_pylist() == [
        {
            "item_id": "1",
            "title": "Toy Story (1995)",
            "description": None,
            "genres": "Animation, Children's, Comedy",
            "release_date": "01-Jan-1995",
        },
        {
            "item_id": "2",
            "title": "Misérables, Les (1995)",
            "description": None,
            "genres": "Drama",
            "release_date": "01-Jan-1995",
        },
        {
            "item_id": "267",
            "title": "unknown",
            "description": None,
            "genres": "unknown",
            "release_date": None,
        },
    ]
    assert [b.line_no for b in bad] == [3, 4]
    assert "expected 24 '|'-separated fields" in bad[0].reason
    assert bad[1].reason == "field 'genre Western': expected 0 or 1, got '2'"


# ------------------------------------------------------------------------------ grouplens-1m


def test_grouplens_1m(tmp_path: Path) -> None:
    ratings = write(
        tmp_path / "ratings.dat",
        "1::1193::5::978300760\n1::661::3::978302109\n2::3068\n2::1357::nan::978298709\n",
    )
    table, bad = read_all(ratings, "grouplens-1m")
    assert rows(table) == [("1", "1193", 978300760, 5.0, 1), ("1", "661", 978302109, 3.0, 2)]
    assert bad_summary(bad) == [
        (3, "expected 4 '::'-separated fields (UserID::MovieID::Rating::Timestamp), got 2"),
        (4, "field 'Rating': expected a finite number, got 'nan'"),
    ]
    movies = write(
        tmp_path / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "73::Misérables, Les (1995)::Drama|Musical\n"
        "74::Bumblebee Flies Anyway, The (1999)\n",
        encoding="latin-1",
    )
    items, bad = read_items(movies, "grouplens-1m")
    assert items.schema.names == [*RAW_ITEMS_SCHEMA.names, "genres"]
    assert rows(items) == [
        ("1", "Toy Story (1995)", None, "Animation, Children's, Comedy"),
        ("73", "Misérables, Les (1995)", None, "Drama, Musical"),
    ]
    assert bad_summary(bad) == [
        (3, "expected 3 '::'-separated fields (MovieID::Title::Genres), got 2")
    ]


# ----------------------------------------------------------------------------------- recbole


def test_recbole_interactions_float_timestamps_and_string_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ml-1m.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
        "1m_1\tOne Flew Over the Cuckoo's Nest (1975)\t5\t978300760\r\n"
        "1m_1\tMy Fair Lady (1964)\t3.5\t978301968.0\r\n"
        "1m_2\tBug's Life, A (1998)\t\t978824291\r\n"  # empty rating: null
        "1m_2\tToo few\t4\r\n"  # bad: 3 fields
        "1m_3\t\t4\t978824291\r\n"  # bad: empty item id
        "1m_3\tHeat (1995)\t4\tsoon\r\n",  # bad: timestamp
    )
    table, bad = read_all(path, "recbole")
    assert rows(table) == [
        ("1m_1", "One Flew Over the Cuckoo's Nest (1975)", 978300760, 5.0, 2),
        ("1m_1", "My Fair Lady (1964)", 978301968, 3.5, 3),
        ("1m_2", "Bug's Life, A (1998)", 978824291, None, 4),
    ]
    assert bad_summary(bad) == [
        (5, "expected 4 tab-separated fields (user_id, item_id, rating, timestamp), got 3"),
        (6, "field 'item_id': expected a non-empty id, got an empty one"),
        (7, "field 'timestamp': expected an integer timestamp, got 'soon'"),
    ]


def test_recbole_interactions_without_rating_column(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.inter",
        "timestamp:float\titem_id:token\tuser_id:token\n881250949\t242\t196\n",
    )
    table, bad = read_all(path, "recbole")
    assert rows(table) == [("196", "242", 881250949, None, 2)] and bad == []


def test_recbole_header_missing_field(tmp_path: Path) -> None:
    path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    with pytest.raises(DataFormatError) as info:
        list(iter_interaction_batches(path, "recbole"))
    err = info.value
    assert err.path == path and err.line_no == 1 and err.field == "timestamp"
    assert str(err) == (
        f"{path} line 1: field 'timestamp': expected header fields user_id, item_id, "
        "timestamp; missing timestamp (found user_id, item_id, rating)"
    )
    only_header = write(tmp_path / "h.inter", "user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(DataFormatError, match="expected interaction lines after the header"):
        list(iter_interaction_batches(only_header, "recbole"))
    items = write(tmp_path / "x.item", "movie_title:token_seq\tyear:token\nToy Story\t1995\n")
    with pytest.raises(DataFormatError, match="line 1: field 'item_id'.*found movie_title, year"):
        read_items(items, "recbole")


def test_recbole_items_from_zip_member(tmp_path: Path) -> None:
    archive = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(
            "recbole/dataset_example/ml-100k/ml-100k.item",
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
            "1\tToy Story\t1995\tAnimation Children's Comedy\n"
            "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
            "3\tFour Rooms\t\tThriller\n"
            "4\tGet Shorty\n"
            "2\tGoldenEye (dup)\t1995\tAction\n",
        )
        zf.writestr(
            "recbole/dataset_example/ml-100k/ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n",
        )
    member = f"{archive}!recbole/dataset_example/ml-100k/ml-100k.item"
    table, bad = read_items(member, "recbole")
    assert table.schema.names == [*RAW_ITEMS_SCHEMA.names, "release_year", "class"]
    assert rows(table) == [
        ("1", "Toy Story", None, "1995", "Animation Children's Comedy"),
        ("2", "GoldenEye", None, "1995", "Action Adventure Thriller"),
        ("3", "Four Rooms", None, None, "Thriller"),
    ]
    assert bad_summary(bad) == [
        (5, "expected 4 tab-separated fields (item_id, movie_title, release_year, class), got 2")
    ]
    assert bad[0].describe().startswith("ml-100k.item line 5: ")

    inter, items = find_source_files(f"{archive}!recbole/dataset_example/ml-100k", "recbole")
    assert items == [member]
    table, _ = read_all(inter[0], "recbole")
    assert rows(table) == [("196", "242", 881250949, 3.0, 2)]

    with pytest.raises(FileNotFoundError, match=r"no member 'recbole/ml-100k.item' in .*\.whl"):
        read_items(f"{archive}!recbole/ml-100k.item", "recbole")
    with pytest.raises(FileNotFoundError, match="no-such.zip"):
        read_items(f"{tmp_path}/no-such.zip!a/b.item", "recbole")


def test_recbole_item_title_and_description_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.item",
        "item_id:token\tname:token_seq\ttitle:token_seq\tdescription:token_seq\tbrand:token\n"
        "B1\tLong name\tShort title\tA fine thing.\tAcme\n",
    )
    table, _ = read_items(path, "recbole")
    # `title` wins over `name`, which then is an extra like any other field.
    assert table.schema.names == ["item_id", "title", "description", "name", "brand"]
    assert rows(table) == [("B1", "Short title", "A fine thing.", "Long name", "Acme")]


# ------------------------------------------------------------------------------- amazon-2018


def test_amazon_2018(tmp_path: Path) -> None:
    reviews = write(
        tmp_path / "All_Beauty.json.gz",
        jsonl(
            {
                "overall": 5.0,
                "verified": True,
                "reviewTime": "09 1, 2016",
                "reviewerID": "A3CIUOJXQ5VDQ2",
                "asin": "B0000530HU",
                "reviewText": "As advertised.",
                "unixReviewTime": 1472688000,
            },
            '{"overall": 4.0, "reviewerID": "A1", "asin": "B1"',  # 2: invalid JSON
            '["A1", "B1"]',  # 3: not an object
            {"overall": 4.0, "reviewerID": "A1", "unixReviewTime": 1},  # 4: no asin
            {"overall": "great", "reviewerID": "A1", "asin": "B1", "unixReviewTime": 1},  # 5
            {"reviewerID": "A2", "asin": "B2", "unixReviewTime": 1400000000},  # no rating: null
            {"overall": 3, "reviewerID": "", "asin": "B2", "unixReviewTime": 1400000000},  # 7
        ),
    )
    table, bad = read_all(reviews, "amazon-2018")
    assert rows(table) == [
        ("A3CIUOJXQ5VDQ2", "B0000530HU", 1472688000, 5.0, 1),
        ("A2", "B2", 1400000000, None, 6),
    ]
    assert [b.line_no for b in bad] == [2, 3, 4, 5, 7]
    assert bad[0].reason.startswith("expected a JSON object, got invalid JSON (")
    assert bad[1].reason == "expected a JSON object, got a JSON list"
    assert bad[2].reason == "field 'asin': expected a key 'asin', it is missing"
    assert bad[3].reason == "field 'overall': expected a number, got 'great'"
    assert bad[4].reason == "field 'reviewerID': expected a non-empty id, got an empty one"

    meta = write(
        tmp_path / "meta_All_Beauty.json.gz",
        jsonl(
            {
                "asin": "B0000530HU",
                "title": "Gillette Shave Gel",
                "description": ["Soothing gel.", "", "For sensitive skin."],
                "brand": "Gillette",
                "category": ["Beauty", "Shaving"],
                "also_buy": ["B1"],
            },
            {"asin": "B2", "title": "Plain", "description": "One string."},
            {"title": "no asin"},  # 3: bad
            {"asin": "B2", "title": "duplicate"},
            {"asin": "B3", "title": "", "description": []},
        ),
    )
    items, bad = read_items(meta, "amazon-2018")
    assert items.schema.names == [*RAW_ITEMS_SCHEMA.names, "brand", "category"]
    assert rows(items) == [
        (
            "B0000530HU",
            "Gillette Shave Gel",
            "Soothing gel. For sensitive skin.",
            "Gillette",
            "Beauty, Shaving",
        ),
        ("B2", "Plain", "One string.", None, None),
        ("B3", None, None, None, None),
    ]
    assert bad_summary(bad) == [(3, "field 'asin': expected a key 'asin', it is missing")]


# ------------------------------------------------------------------------------- amazon-2023


def test_amazon_2023_milliseconds_and_parent_asin(tmp_path: Path) -> None:
    reviews = write(
        tmp_path / "All_Beauty.jsonl.gz",
        jsonl(
            {
                "rating": 5.0,
                "title": "Such a lovely scent",
                "asin": "B00YQ6X8EO",
                "parent_asin": "B00YQ6X8EO",
                "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ",
                "timestamp": 1588687728923,
                "helpful_vote": 0,
            },
            {"rating": 4.0, "asin": "V1", "parent_asin": "P1", "user_id": "U", "timestamp": 999},
            {"rating": 4.0, "asin": "V1", "user_id": "U", "timestamp": 1588687728923},  # 3
            {"rating": 4.0, "parent_asin": "P1", "user_id": "U", "timestamp": True},  # 4
        ),
    )
    table, bad = read_all(reviews, "amazon-2023")
    assert rows(table) == [
        ("AGKHLEW2SOWHNMFQIJGBECAF7INQ", "B00YQ6X8EO", 1588687728, 5.0, 1),
        ("U", "P1", 0, 4.0, 2),
    ]
    assert bad_summary(bad) == [
        (3, "field 'parent_asin': expected a key 'parent_asin', it is missing"),
        (4, "field 'timestamp': expected an integer timestamp, got True"),
    ]
    meta = write(
        tmp_path / "meta_All_Beauty.jsonl",  # plain, not gzipped
        jsonl(
            {
                "main_category": "All Beauty",
                "title": "Howard LC0008 Leather Conditioner",
                "features": ["Soft", "Conditions"],
                "description": [],
                "store": "Howard Products",
                "parent_asin": "B01CUPMQZE",
            },
            {"parent_asin": "P1", "title": "Thing", "description": ["Does", "stuff."]},
            "not json",
        ),
    )
    items, bad = read_items(meta, "amazon-2023")
    assert items.schema.names == [*RAW_ITEMS_SCHEMA.names, "main_category", "store", "features"]
    assert rows(items) == [
        (
            "B01CUPMQZE",
            "Howard LC0008 Leather Conditioner",
            None,
            "All Beauty",
            "Howard Products",
            "Soft Conditions",
        ),
        ("P1", "Thing", "Does stuff.", None, None, None),
    ]
    assert [b.line_no for b in bad] == [3]


# ------------------------------------------------------------------------ batches and errors


def test_batches_split_with_source_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "".join(f"{u}\t{u + 10}\t4\t{1000 + u}\n" for u in range(5)))
    batches = list(iter_interaction_batches(path, "grouplens-100k", batch_rows=2))
    assert [t.num_rows for t, _ in batches] == [2, 2, 1]
    assert [t.column("source_line").to_pylist() for t, _ in batches] == [[1, 2], [3, 4], [5]]
    assert all(t.schema.equals(RAW_INTERACTIONS_SCHEMA) for t, _ in batches)
    # A bad line travels with the batch in which it was met.
    path = write(tmp_path / "v.data", "1\t2\t3\t4\nbad\n5\t6\t7\t8\n9\t10\t11\t12\n")
    batches = list(iter_interaction_batches(path, "grouplens-100k", batch_rows=2))
    assert [
        (t.column("source_line").to_pylist(), [b.line_no for b in bad]) for t, bad in batches
    ] == [
        ([1, 3], [2]),
        ([4], []),
    ]


def test_unknown_format_and_bad_batch_size(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(ValueError, match="known formats are: " + ", ".join(FORMATS)):
        iter_interaction_batches(path, "movielens")  # raised at the call, not at next()
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        read_items(path, "csv")
    with pytest.raises(ValueError, match="unknown data format"):
        find_source_files(str(tmp_path), "csv")
    with pytest.raises(ValueError, match="batch_rows"):
        iter_interaction_batches(path, "grouplens-100k", batch_rows=0)
    with pytest.raises(ValueError, match="'utf-16' is not ASCII-compatible"):
        iter_interaction_batches(path, "grouplens-100k", encoding="utf-16")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "u.data")
    with pytest.raises(FileNotFoundError, match="nope/u.data"):
        iter_interaction_batches(missing, "grouplens-100k")
    with pytest.raises(FileNotFoundError, match="nope/u.data"):
        read_items(missing, "grouplens-100k")
    with pytest.raises(FileNotFoundError, match="nope/u.data"):
        with open_text(missing):
            pass
    for name in ("u.data", "blank.data", "empty.json.gz"):
        path = write(tmp_path / name, "\n \n" if name == "blank.data" else "")
        fmt = "amazon-2018" if name.endswith(".gz") else "grouplens-100k"
        with pytest.raises(DataFormatError, match="file is empty") as info:
            list(iter_interaction_batches(path, fmt))
        assert info.value.path == path and str(info.value).startswith(path)


def test_corrupt_gzip_undecodable_text_and_all_bad(tmp_path: Path) -> None:
    fake = tmp_path / "Books.json.gz"
    fake.write_text('{"asin": "B1"}\n')  # named .gz but plain text
    with pytest.raises(DataFormatError, match="expected valid gzip data") as info:
        list(iter_interaction_batches(str(fake), "amazon-2018"))
    assert info.value.line_no == 1
    truncated = tmp_path / "Cut.json.gz"
    truncated.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-30])
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        list(iter_interaction_batches(str(truncated), "amazon-2018"))
    latin = tmp_path / "x.inter"
    latin.write_bytes(
        "user_id:token\titem_id:token\ttimestamp:float\n1\tCafé\t5\n".encode("latin-1")
    )
    with pytest.raises(DataFormatError, match="expected utf-8 text") as info:
        list(iter_interaction_batches(str(latin), "recbole"))
    assert info.value.line_no == 2 and "at byte 6 " in str(info.value)
    table, _ = read_all(str(latin), "recbole", encoding="latin-1")
    assert table.column("item_id").to_pylist() == ["Café"]
    wrong = write(tmp_path / "ratings.dat", "1\t2\t3\t4\n1\t3\t3\t5\n")  # 100k data, 1m format
    with pytest.raises(DataFormatError, match="all 2 are malformed .is the format right"):
        list(iter_interaction_batches(wrong, "grouplens-1m"))


def test_open_text_variants(tmp_path: Path) -> None:
    plain = write(tmp_path / "a.txt", "line one\nline two\n")
    gz = write(tmp_path / "a.txt.gz", "gz one\n")
    sniffed = tmp_path / "no_suffix"
    sniffed.write_bytes(gzip.compress(b"sniffed\n"))  # gzip recognised by its magic bytes
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dir/inner.txt", "zipped\r\n")
        zf.writestr("dir/inner.txt.gz", gzip.compress(b"zipped gz\n"))
    got = {}
    for path in (
        plain,
        gz,
        str(sniffed),
        f"{archive}!dir/inner.txt",
        f"{archive}!dir/inner.txt.gz",
    ):
        with open_text(path) as f:
            got[path] = f.read()
    assert list(got.values()) == [
        "line one\nline two\n",
        "gz one\n",
        "sniffed\n",
        "zipped\r\n",  # newlines untranslated: readers strip the "\r" themselves
        "zipped gz\n",
    ]
    with pytest.raises(FileNotFoundError, match=r"no member 'dir/other.txt' in .*bundle.zip"):
        with open_text(f"{archive}!dir/other.txt"):
            pass


def test_remote_files_and_archives_read_through_fsspec() -> None:
    """A bucket as the data's home: fsspec's in-memory filesystem stands for s3:// or gs://
    (the same code path: only the protocol differs)."""
    import io

    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/ml/u.data", b"1\t10\t5\t881250949\n2\t20\t3\t891717742\n")
    fs.pipe("/bucket/ml/u.item", gzip.compress(b"10|Toy Story (1995)|01-Jan-1995||" + b"|0" * 19))
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as zf:
        zf.writestr("inner/u.data", "3\t30\t4\t881250950\n")
    fs.pipe("/bucket/bundle.zip", packed.getvalue())

    assert find_source_files("memory://bucket/ml", "grouplens-100k") == (
        ["memory://bucket/ml/u.data"],
        ["memory://bucket/ml/u.item"],
    )
    batches = list(iter_interaction_batches("memory://bucket/ml/u.data", "grouplens-100k"))
    assert batches[0][0].column("user_id").to_pylist() == ["1", "2"]
    # gzip without the suffix, recognised by its magic bytes, remote too
    items, bad = read_items("memory://bucket/ml/u.item", "grouplens-100k")
    assert items.column("title").to_pylist() == ["Toy Story (1995)"] and not bad
    member = "memory://bucket/bundle.zip!inner/u.data"
    (table, _), *_ = iter_interaction_batches(member, "grouplens-100k")
    assert table.column("item_id").to_pylist() == ["30"]
    assert source_sha256(member) == hashlib.sha256(b"3\t30\t4\t881250950\n").hexdigest()
    with pytest.raises(FileNotFoundError, match=r"no member 'inner/u.item' in memory://bucket"):
        read_items("memory://bucket/bundle.zip!inner/u.item", "grouplens-100k")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_items("memory://bucket/ml/missing.item", "grouplens-100k")


def test_bad_line_text_is_truncated_and_error_pickles(tmp_path: Path) -> None:
    long_line = "x" * 500
    path = write(tmp_path / "u.data", f"1\t2\t3\t4\n{long_line}\n")
    _, bad = read_all(path, "grouplens-100k")
    assert bad[0].text == "x" * 200
    err = DataFormatError("f.inter", "expected x", 3, "rating")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "f.inter line 3: field 'rating': expected x"
    assert (again.path, again.line_no, again.field) == ("f.inter", 3, "rating")


# -------------------------------------------------------------------------- find_source_files


def test_find_source_files(tmp_path: Path) -> None:
    ml = tmp_path / "ml-100k"
    for name in ("u.data", "u.item", "u.user", "README"):
        write(ml / name, "x\n")
    assert find_source_files(str(ml), "grouplens-100k") == (
        [str(ml / "u.data")],
        [str(ml / "u.item")],
    )
    with pytest.raises(FileNotFoundError, match="no ratings.dat or movies.dat.*found: README"):
        find_source_files(str(ml), "grouplens-1m")

    rb = tmp_path / "rb"
    for name in ("ml.inter", "ml.item", "ml.user"):
        write(rb / name, "x\n")
    assert find_source_files(str(rb), "recbole") == ([str(rb / "ml.inter")], [str(rb / "ml.item")])

    az = tmp_path / "amazon"
    for name in ("Books.json.gz", "Books_5.json.gz", "meta_Books.json.gz", "Beauty_5.json"):
        write(az / name, "{}\n")
    with pytest.raises(DataFormatError, match="unpaired: Beauty"):
        find_source_files(str(az), "amazon-2018")
    write(az / "meta_Beauty.json", "{}\n")
    assert find_source_files(str(az), "amazon-2018") == (
        [str(az / "Beauty_5.json"), str(az / "Books.json.gz")],  # full file wins over _5
        [str(az / "meta_Beauty.json"), str(az / "meta_Books.json.gz")],
    )
    with pytest.raises(FileNotFoundError, match=r"no \{Category\}.jsonl\(.gz\)"):
        find_source_files(str(az), "amazon-2023")
    write(az / "All_Beauty.jsonl.gz", "{}\n")
    write(az / "meta_All_Beauty.jsonl", "{}\n")
    assert find_source_files(str(az), "amazon-2023") == (
        [str(az / "All_Beauty.jsonl.gz")],
        [str(az / "meta_All_Beauty.jsonl")],
    )
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        find_source_files(str(tmp_path / "missing-dir"), "recbole")


def test_each_member_of_an_archive_is_hashed_on_its_own_bytes(tmp_path):
    inter = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t5\t10\n"
    item = b"item_id:token\tmovie_title:token_seq\n2\tA Film\n"
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("d/d.inter", inter)
        zf.writestr("d/d.item", item)
    paths = [f"{archive}!d/d.inter", f"{archive}!d/d.item"]
    source = resolve_source(
        DataConfig(source=str(tmp_path), format="recbole", interactions=paths[:1], items=paths[1:])
    )
    assert source.hashes == {
        paths[0]: hashlib.sha256(inter).hexdigest(),
        paths[1]: hashlib.sha256(item).hexdigest(),
    }


def test_sources_in_a_shared_store_are_readable_from_every_node(tmp_path):
    # The data stage's read tasks run on any node for these, on the driver's for the rest.
    assert readable_from_every_node(["s3://bucket/ml-100k/u.data", "gs://b/x.inter"])
    assert readable_from_every_node(["https://host/recbole.whl!dataset/ml-100k.inter"])
    local = tmp_path / "u.data"
    local.write_text("1\t2\t3\t4\n")
    assert not readable_from_every_node([str(local)])
    assert not readable_from_every_node([f"file://{local}"])
    assert not readable_from_every_node([f"{tmp_path}/recbole.whl!ml-100k.inter"])
    assert not readable_from_every_node(["s3://bucket/u.data", str(local)])
    assert not readable_from_every_node([])
