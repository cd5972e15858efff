"""Each reader on a small fixture the test writes itself, and on ../shared/data where it applies."""

from __future__ import annotations

import pytest

from facetrec.config import DataConfig, ItemTable
from facetrec.data.readers import read_log
from facetrec.errors import DataError
from tests.conftest import real_data


def _write(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_generic_tsv_with_mapping_and_item_tables(tmp_path):
    _write(tmp_path / "log.tsv", "u\ti\tts\n1\ta\t10\n1\tb\t5\n2\ta\t7\n")
    _write(tmp_path / "items.tsv", "item_id\tcate\tattrs\na\tc1\tx,y\nb\tc2\ty\n")
    cfg = DataConfig(root=str(tmp_path), interactions="log.tsv", user="u", item="i", time="ts",
                     item_tables=(ItemTable(file="items.tsv", fields={"cate": "cate", "attrs": "attrs"}, multi=("attrs",)),))
    log = read_log(cfg)
    assert log.events["user"].to_list() == ["1", "1", "2"]
    assert log.events["time"].to_list() == [10, 5, 7]
    assert log.events["__line"].to_list() == [2, 3, 4]
    assert sorted(log.item_attrs["attrs"].rows()) == [("a", "x"), ("a", "y"), ("b", "y")]
    assert log.multi == {"attrs"}


def test_generic_parquet(tmp_path):
    import polars as pl

    pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [5, 6]}).write_parquet(tmp_path / "x.parquet")
    log = read_log(DataConfig(root=str(tmp_path), interactions="x.parquet"))
    assert log.events.height == 2 and log.events["item"].to_list() == ["3", "4"]


def test_long_item_table_multi_valued(tmp_path):
    _write(tmp_path / "ui.dat", "1\t10\t5\t100\n2\t11\t3\t200\n")
    _write(tmp_path / "cat.dat", "10,0\n10,1\n11,0\n")
    cfg = DataConfig(root=str(tmp_path), interactions="ui.dat", header=False, columns=("user", "item", "rating", "timestamp"),
                     user="user", item="item", time="timestamp", rating="rating",
                     item_tables=(ItemTable(file="cat.dat", layout="long", sep=",", header=False,
                                            columns=("item_id", "category"), fields={"cate": "category"}),))
    log = read_log(cfg)
    assert log.events["rating"].to_list() == [5.0, 3.0]
    assert sorted(log.item_attrs["cate"].rows()) == [("10", "0"), ("10", "1"), ("11", "0")]
    assert "cate" in log.multi


def test_amazon_ratings_with_metadata(tmp_path):
    _write(tmp_path / "ratings.csv", "A1,B01,5.0,1300000000\nA2,B02,3.0,1300000100\n")
    _write(tmp_path / "meta.json", '{"asin": "B01", "categories": [["Beauty", "Skin"]]}\n'
                                   "{'asin': 'B02', 'categories': [['Beauty']]}\n")
    log = read_log(DataConfig(format="amazon", root=str(tmp_path), interactions="ratings.csv", metadata="meta.json"))
    assert log.events["user"].to_list() == ["A1", "A2"]
    assert sorted(log.item_attrs["cate"].rows()) == [("B01", "Beauty"), ("B01", "Skin"), ("B02", "Beauty")]


@pytest.mark.parametrize("name,text", [
    ("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"),
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1193,5.0,978300760\n1,661,3.0,978302109\n"),
])
def test_movielens_formats(tmp_path, name, text):
    _write(tmp_path / name, text)
    _write(tmp_path / "movies.dat", "1193::One Flew: Over (1975)::Drama\n661::James (1996)::Animation|Children's\n")
    movies = "movies.dat" if name != "u.data" else ""
    log = read_log(DataConfig(format="movielens", root=str(tmp_path), interactions=name, movies=movies))
    assert log.events.height == 2
    assert log.events["rating"].to_list()[0] in (3.0, 5.0)
    if movies:
        assert ("661", "Children's") in log.item_attrs["genre"].rows()


def test_taobao_format_and_behavior(tmp_path):
    _write(tmp_path / "ub.csv", "1,100,7,pv,1511544070\n1,101,8,buy,1511544080\n")
    log = read_log(DataConfig(format="taobao", root=str(tmp_path), interactions="ub.csv"))
    assert log.events["behavior"].to_list() == ["pv", "buy"]
    assert sorted(log.item_attrs["cate"].rows()) == [("100", "7"), ("101", "8")]


# ------------------------------------------------------------------ bad input


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="nope.tsv.*not found"):
        read_log(DataConfig(root=str(tmp_path), interactions="nope.tsv"))


def test_missing_root_says_what_to_set(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        read_log(DataConfig(root=str(tmp_path / "absent")))


def test_empty_file(tmp_path):
    _write(tmp_path / "e.tsv", "")
    with pytest.raises(DataError, match="empty"):
        read_log(DataConfig(root=str(tmp_path), interactions="e.tsv"))


def test_header_only_file(tmp_path):
    _write(tmp_path / "e.tsv", "user_id\titem_id\ttimestamp\n")
    with pytest.raises(DataError, match="no rows"):
        read_log(DataConfig(root=str(tmp_path), interactions="e.tsv"))


def test_missing_column_lists_columns(tmp_path):
    _write(tmp_path / "x.tsv", "user_id\titem\ttimestamp\n1\t2\t3\n")
    with pytest.raises(DataError, match=r"column 'item_id' missing.*have \['user_id', 'item', 'timestamp'\]"):
        read_log(DataConfig(root=str(tmp_path), interactions="x.tsv"))


def test_non_numeric_timestamp_names_line(tmp_path):
    _write(tmp_path / "x.tsv", "user_id\titem_id\ttimestamp\n1\t2\t3\n1\t2\tyesterday\n")
    with pytest.raises(DataError, match=r"x.tsv, line 3: timestamp 'yesterday' is not a number.*--lenient"):
        read_log(DataConfig(root=str(tmp_path), interactions="x.tsv"))


def test_truncated_last_line_fails_then_lenient_counts(tmp_path):
    _write(tmp_path / "ub.csv", "1,100,7,pv,1511544070\n1,101,8,pv,1511544080\n1,102,8,pv")
    with pytest.raises(DataError, match=r"ub.csv, line 3: has 4 of 5 fields \(the last line, after 2 complete lines: the file looks truncated\)"):
        read_log(DataConfig(format="taobao", root=str(tmp_path), interactions="ub.csv"))
    log = read_log(DataConfig(format="taobao", root=str(tmp_path), interactions="ub.csv"), lenient=True)
    assert log.events.height == 2 and log.skipped == {"missing field": 1}


def test_non_utf8_bytes_name_line(tmp_path):
    _write(tmp_path / "x.tsv", b"user_id\titem_id\ttimestamp\n1\t2\t3\n1\t\xff\xfe\t4\n")
    with pytest.raises(DataError, match=r"x.tsv, line 3: bytes that are not UTF-8"):
        read_log(DataConfig(root=str(tmp_path), interactions="x.tsv"))


def test_too_many_fields_name_line(tmp_path):
    _write(tmp_path / "x.tsv", "user_id\titem_id\ttimestamp\n1\t2\t3\n1\t2\t3\t4\n")
    with pytest.raises(DataError, match=r"x.tsv, line 3: 4 fields where 3"):
        read_log(DataConfig(root=str(tmp_path), interactions="x.tsv"))


def test_unknown_format():
    with pytest.raises(DataError, match="data.format 'xml'"):
        read_log(DataConfig(format="xml"))


# ------------------------------------------------------------------ real data


def test_real_taobao_truncated_last_line():
    root = real_data("taobao-userbehavior-sample")
    cfg = DataConfig(format="taobao", root=str(root), interactions="UserBehavior.csv")
    with pytest.raises(DataError, match=r"line 84476: has 4 of 5 fields \(the last line"):
        read_log(cfg)
    log = read_log(cfg, lenient=True)
    assert log.events.height == 84475 and sum(log.skipped.values()) == 1


def test_real_amazon_hin_category_is_multi_valued():
    root = real_data("amazon-hin")
    cfg = DataConfig(root=str(root), interactions="user_item.dat", header=False, columns=("user", "item", "rating", "timestamp"),
                     user="user", item="item", time="timestamp", rating="rating",
                     item_tables=(ItemTable(file="item_category.dat", layout="long", sep=",", header=False,
                                            columns=("item_id", "category"), fields={"cate": "category"}),))
    log = read_log(cfg)
    assert log.events.height == 195791
    assert "cate" in log.multi and log.item_attrs["cate"]["value"].n_unique() == 22
