"""Size parsing: qemu's qemu_strtosz rules, unit tests and against qemu-img itself."""
from __future__ import annotations

import warnings

import pytest
from hypothesis import given, strategies as st

from qcowpy.units import SizeError, cvtnum, format_size, parse_option_size, parse_size, strtosz

from .helpers import as_qemu, qcowpy, qemu

CASES = {
    "1": 1, "1b": 1, "1B": 1, "1k": 1024, "1K": 1024, "1m": 1 << 20, "1M": 1 << 20, "1g": 1 << 30,
    "1G": 1 << 30, "1t": 1 << 40, "1T": 1 << 40, "1p": 1 << 50, "1P": 1 << 50, "1E": 1 << 60,
    "1.5k": 1536, "1.k": 1024, "1.0": 1, "0.5k": 512, "1.5M": 1572864, "1.0000001k": 1024,
    "7.99999E": 9223360507639729792, "0x10": 16, "01": 1, "08": 8, " 1k": 1024, "+1k": 1024,
    "1.5e": 1729382256910270464, "20G": 21474836480, "0": 0, "1.": 1, "0.1k": 102, "0.3k": 307,
    "9223372036854775807": 9223372036854775807,
}
INVALID = ["", "k", "1.5", "1e3", "1kB", "1z", "1.9999999999b", "0x1.8k", "-1", "1 k", "1k ", "1.5e3k", "--1",
           "1-", "0x", "x1", "1.5.5k"]
RANGE = ["16E", "8E", "18446744073709551616", "99999999999999999999"]


@pytest.mark.parametrize("text,value", CASES.items())
def test_strtosz_values(text, value):
    assert strtosz(text) == value


@pytest.mark.parametrize("text", INVALID)
def test_strtosz_invalid(text):
    with pytest.raises(SizeError) as e:
        strtosz(text)
    assert not e.value.out_of_range


def test_strtosz_overflow():
    assert strtosz("15.99999999E") < 1 << 64
    for text in ("16E", "18446744073709551616", "99999999999999999999"):
        with pytest.raises(SizeError) as e:
            strtosz(text)
        assert e.value.out_of_range
    with pytest.raises(SizeError) as e:
        strtosz("99999999999999999999k")  # overflow with trailing characters is a syntax error
    assert not e.value.out_of_range


def test_hex_suffix_warns():
    with pytest.warns(UserWarning, match="deprecated: 0x10k"):
        assert strtosz("0x10k") == 16384


def test_cvtnum_messages():
    with pytest.raises(SizeError, match=r"^Invalid image size specified\. You may use k, M, G, T, P or E suffixes"):
        cvtnum("image size", "1.5")
    with pytest.raises(SizeError, match=r"Must be between 0 and 9223372036854775807\.$"):
        cvtnum("image size", "8E")
    assert cvtnum("image size", "7E") == 7 << 60


def test_api_and_option_sizes():
    assert parse_size("2M") == 2 << 20 and parse_size(4096) == 4096
    assert parse_option_size("cluster_size", "64k") == 65536
    with pytest.raises(SizeError) as e:
        parse_option_size("cluster_size", "1x")
    assert str(e.value) == "Parameter 'cluster_size' expects a non-negative number below 2^64"
    assert e.value.hint.startswith("Optional suffix k, M, G, T, P or E")
    with pytest.raises(ValueError):
        parse_size(-1)


@pytest.mark.parametrize("value,text", [(0, "0 B"), (1, "1 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
                                        (200704, "196 KiB"), (1314816, "1.25 MiB"), (21474836480, "20 GiB"),
                                        (1022976, "999 KiB"), (1023 << 50, "0.999 EiB")])
def test_format_size(value, text):
    assert format_size(value) == text


def test_size_parsing_matches_qemu_img(qemu_img, tmp_path):
    """Same accepted values (via the Formatting line) and same messages as qemu-img, for every case."""
    texts = list(CASES) + [t for t in INVALID if not t.startswith("-")] + RANGE
    for text in texts:
        # cluster_size=1000 makes both fail right after the Formatting line: nothing is written
        args = ["create", "-f", "qcow2", "-o", "cluster_size=1000", "s.qcow2", text]
        want = qemu(qemu_img, *args, cwd=tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = qcowpy(*args, cwd=tmp_path)
        assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err), text
    assert not (tmp_path / "s.qcow2").exists()


def test_hex_suffix_warning_matches_qemu_img(qemu_img, tmp_path):
    args = ["create", "-f", "qcow2", "-o", "cluster_size=1000", "s.qcow2", "0x10k"]
    want = qemu(qemu_img, *args, cwd=tmp_path)
    got = qcowpy(*args, cwd=tmp_path)
    assert as_qemu(got.err) == want.err and got.out == want.out


def _libc_strtoul(text: str):
    """qemu_strtoul(text, NULL, 0): libc's strtoul, an error when nothing or something extra is left."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.strtoul.restype = ctypes.c_ulong
    libc.strtoul.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
    raw = text.encode()
    buf = ctypes.create_string_buffer(raw)
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    value = libc.strtoul(buf, ctypes.byref(end), 0)
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(buf)
    if ctypes.get_errno() or consumed == 0 or consumed != len(raw):
        return None
    return value


@pytest.mark.parametrize("text", ["5", " 5", "\t+7", "010", "08", "0x10", "0X1f", "0x", "0xg", "", "-", "+", "5x",
                                  "-1", "-0", "0", "00", "18446744073709551615", "18446744073709551616",
                                  "-18446744073709551615", "0x10000000000000000", " ", "1 ", "0b1", "09"])
def test_strtoul_is_libc_strtoul(text):
    from qcowpy.units import strtoul
    assert strtoul(text) == _libc_strtoul(text)


@given(st.text(alphabet="0123456789abcdefxX+- \t", max_size=24))
def test_strtoul_is_libc_strtoul_random(text):
    from qcowpy.units import strtoul
    assert strtoul(text) == _libc_strtoul(text)
