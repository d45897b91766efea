"""The one memory-bank reader: every malformed bank is one `DataError` naming the file."""

import numpy as np
import pytest

from ddeseg.bank import read_memory_bank
from ddeseg.errors import DataError


def _write(tmp_path, array, name="bank.npy"):
    path = tmp_path / name
    np.save(path, array, allow_pickle=True)
    return path


def test_good_bank_reads_as_float32(tmp_path):
    path = _write(tmp_path, np.ones((3, 2, 4), dtype=np.float64))
    bank = read_memory_bank(path, classes=3, embed_dim=4)
    assert bank.dtype == np.float32 and bank.shape == (3, 2, 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _write(p, np.ones((9, 0, 4), np.float32)), "k >= 1"),
        (lambda p: _write(p, np.ones((3, 2, 4), np.int32)), "dtype int32"),
        (lambda p: _write(p, np.ones((3, 4), np.float32)), "shape (3, 4)"),
        (lambda p: _write(p, np.ones((5, 2, 4), np.float32)), "5 classes, but task v2 needs 3"),
        (lambda p: _write(p, np.ones((3, 2, 8), np.float32)), "8 dims"),
        (lambda p: _write(p, np.full((3, 2, 4), np.nan, np.float32)), "NaN"),
        (lambda p: _write(p, np.array([{"a": 1}], dtype=object)), "pickled"),
        (lambda p: (p / "bank.npy").write_text("not a bank") and p / "bank.npy", "not a readable"),
        (lambda p: p / "missing.npy", "not found"),
    ],
)
def test_bad_banks_fail_with_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError) as caught:
        read_memory_bank(path, classes=3, embed_dim=4, task="v2")
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text


def test_truncated_bank(tmp_path):
    path = _write(tmp_path, np.ones((3, 2, 4), np.float32))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="not a readable"):
        read_memory_bank(path)
