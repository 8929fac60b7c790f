"""Data files: tidy CSV and JSON in, checked against the model, with errors naming row and field."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

import hierdsl
from hierdsl.cli import main
from hierdsl.data import Dataset, DataError, dataset_to_csv, read_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module")
def schools():
    return hierdsl.compile(os.path.join(EXAMPLES, "eight_schools.hsbi")).ir


@pytest.fixture(scope="module")
def sir():
    return hierdsl.compile(os.path.join(EXAMPLES, "sir.hsbi"), args={"n_sites": 3}).ir


def test_reads_eight_schools_keeping_site_labels(schools):
    data = read_data(os.path.join(EXAMPLES, "eight_schools.csv"), schools)
    assert data.sites[:2] == ("Choate", "Deerfield") and data.sites[-1] == "Mt. Hermon"
    np.testing.assert_array_equal(data.values["y"], [28, 8, -3, 7, -1, 1, 18, 12])
    np.testing.assert_array_equal(data.values["sigma"], [15, 10, 16, 11, 9, 11, 10, 18])


def test_csv_round_trip_with_vectors(tmp_path, sir):
    values = {"y": np.arange(30, dtype=float).reshape(3, 10)}
    path = tmp_path / "d.csv"
    path.write_text(dataset_to_csv(Dataset(("a", "b", "c"), values)))
    again = read_data(str(path), sir)
    assert again.sites == ("a", "b", "c")
    np.testing.assert_array_equal(again.values["y"], values["y"])


def test_json(tmp_path, schools):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"sites": {"A": {"y": 1.0, "sigma": 2.0}, "B": {"y": 3, "sigma": 4}}}))
    data = read_data(str(path), schools)
    assert data.sites == ("A", "B")
    np.testing.assert_array_equal(data.values["y"], [1.0, 3.0])
    path.write_text(json.dumps({"sites": {"A": {"y": [1.0, 2.0], "sigma": 2.0}}}))
    with pytest.raises(DataError, match=r"`y` has shape \(2,\), the model expects \(\)"):
        read_data(str(path), schools)


BAD = [
    ("missing_site_variable", "site,variable,index,value\nA,y,,1\nA,sigma,,2\nB,y,,3\n",
     "site `B` has no `sigma`"),
    ("unknown_variable", "site,variable,index,value\nA,y,,1\nA,sigma,,2\nA,yy,,3\n",
     "row 4: unknown data variable `yy`"),
    ("parameter_given_as_data", "site,variable,index,value\nA,y,,1\nA,sigma,,2\nA,theta,,3\n",
     "it is a parameter to infer, not data"),
    ("nan_value", "site,variable,index,value\nA,y,,nan\nA,sigma,,2\n", "row 2: `y` is nan"),
    ("bad_index", "site,variable,index,value\nA,y,2,1\nA,sigma,,2\n", "row 2: bad index `2` for `y`"),
    ("not_a_number", "site,variable,index,value\nA,y,,abc\nA,sigma,,2\n", "`abc` is not a number"),
    ("missing_column", "site,variable,value\nA,y,1\n", "the header lacks column `index`"),
    ("duplicate", "site,variable,index,value\nA,y,,1\nA,y,,1\nA,sigma,,2\n", "given twice"),
    ("empty", "", "is empty"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_a_clear_error(tmp_path, schools, name, text, message):
    path = tmp_path / f"{name}.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_data(str(path), schools)
    rendered = info.value.render()
    assert message in rendered
    assert f"{name}.csv" in rendered


def test_missing_vector_elements(tmp_path, sir):
    path = tmp_path / "d.csv"
    path.write_text("site,variable,index,value\n" + "".join(f"A,y,{k},1\n" for k in range(1, 10)))
    with pytest.raises(DataError, match=r"1 element\(s\) of `y` missing, first \[10\]"):
        read_data(str(path), sir)


def test_infer_with_bad_data_exits_1_before_training(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("site,variable,index,value\nA,y,,1\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["infer", os.path.join(EXAMPLES, "eight_schools.hsbi"), "--data", str(path),
                       "-o", str(tmp_path / "run")])
    assert status == 1
    assert "site `A` has no `sigma`" in err.getvalue()
    assert not (tmp_path / "run").exists()
