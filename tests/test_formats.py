"""The format registry: the paper's grids, INT grids, custom tables, modes.

References are the tables copied from docs/format.md ("Grids"), never the
library's own constants.
"""

from __future__ import annotations

import math

import pytest
import torch

from afpq_plugins.core.formats import MODES, Format, get_format, list_formats, register_format, resolve_mode

# -- the grids, typed in from docs/format.md ------------------------------------------
FP4_MAG = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # E2M1 magnitudes
FP3_MAG = [0.0, 1.0, 2.0, 4.0]  # E2M0 magnitudes
NF4 = [
    -1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1,
]
NF3 = [-1, -0.5350227355957031, -0.2469314038753510, 0, 0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1]


def _sign_mag_value(code: int, mags, sign_bit: int) -> float:
    sign = -1.0 if code >> sign_bit & 1 else 1.0
    return sign * mags[code & ((1 << sign_bit) - 1)]


# -- the four paper tables ---------------------------------------------------------------------
def test_fp4_is_e2m1_sign_magnitude_nibble():
    f = get_format("fp4")
    assert f.bits == 4 and f.kind == "fp" and len(f.values) == 16
    for code in range(16):
        expect = _sign_mag_value(code, FP4_MAG, 3)  # code = sign << 3 | magnitude index
        assert f.values[code] == expect, code
        assert math.copysign(1.0, f.values[code]) == math.copysign(1.0, expect), code  # code 8 is -0
    # 15 distinct values; +-6 are the extremes.
    assert sorted(set(f.values)) == sorted({v for m in FP4_MAG for v in (m, -m)})
    assert (f.top_pos, f.top_neg, f.range) == (6.0, 6.0, 12.0)


def test_fp3_is_e2m0_sign_magnitude():
    f = get_format("fp3")
    assert f.bits == 3 and f.kind == "fp" and len(f.values) == 8
    for code in range(8):
        assert f.values[code] == _sign_mag_value(code, FP3_MAG, 2), code  # code = sign << 2 | idx
    assert math.copysign(1.0, f.values[4]) == -1.0  # -0
    assert len(set(f.values)) == 7  # "only 7 distinct values"
    assert (f.top_pos, f.top_neg, f.range) == (4.0, 4.0, 8.0)


@pytest.mark.parametrize("name, table", [("nf4", NF4), ("nf3", NF3)])
def test_nf_tables_match_the_paper(name, table):
    f = get_format(name)
    assert f.kind == "nf"
    assert f.bits == int(math.log2(len(table)))
    assert list(f.values) == [float(v) for v in table]  # index = code, exact
    assert list(f.sorted_values) == [float(v) for v in table]
    assert list(f.sorted_codes) == list(range(len(table)))
    assert (f.top_pos, f.top_neg, f.range) == (1.0, 1.0, 2.0)
    # The fp32 LUT holds the published values to within one fp32 rounding.
    lut = f.lut("afpq").double()
    assert torch.allclose(lut, torch.tensor(table, dtype=torch.float64), rtol=2**-24, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_grids(bits):
    f = get_format(f"int{bits}")
    assert f.kind == "int" and f.bits == bits
    assert list(f.values) == [float(i) for i in range(2**bits)]
    assert f.uniform_int
    assert f.default_mode == "zp"
    assert f.range == 2**bits - 1
    assert f.supports("zp")
    assert not f.supports("afpq") and not f.supports("sym")


def test_sorted_codes_of_sign_magnitude_grid():
    """Sorted grid -> code, with +0 taking code 0 (the encoder never emits -0 = code 8)."""
    f = get_format("fp4")
    expect_vals = sorted({v for m in FP4_MAG for v in (m, -m)})
    assert list(f.sorted_values) == expect_vals
    for v, c in zip(f.sorted_values, f.sorted_codes):
        assert f.values[c] == v
    assert f.sorted_codes[expect_vals.index(0.0)] == 0
    assert 8 not in f.sorted_codes


@pytest.mark.parametrize("name", ["fp4", "fp3", "nf4", "nf3", "int2", "int3", "int4", "int8"])
def test_zp_lut_is_the_grid_shifted_by_minus_min(name):
    f = get_format(name)
    lo = min(f.values)
    zp = f.lut("zp").double()
    plain = torch.tensor(f.values, dtype=torch.float64)
    # float32 LUT of the shifted float64 grid: within one fp32 ulp of the exact shift.
    assert torch.allclose(zp, plain - lo, rtol=2**-23, atol=0)
    assert float(zp.min()) == 0.0
    assert torch.equal(f.lut("afpq").double(), torch.tensor(f.values, dtype=torch.float32).double())


def test_builtins_listed():
    names = list_formats()
    for n in ("fp4", "fp3", "nf4", "nf3", "int2", "int3", "int4", "int8"):
        assert n in names
    assert names == sorted(names)


# -- get_format ----------------------------------------------------------------------------------
def test_get_format_unknown_names_it_and_lists_registered():
    with pytest.raises(ValueError) as exc:
        get_format("fp5")
    msg = str(exc.value)
    assert "'fp5'" in msg and "nf4" in msg and "fp4" in msg


def test_get_format_passthrough_and_case_insensitive():
    f = get_format("nf4")
    assert get_format(f) is f
    assert get_format("NF4") is f
    assert get_format("Fp4") is get_format("fp4")


# -- modes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp4", "fp3", "nf4", "nf3"])
def test_fp_nf_support_all_modes_default_afpq(name):
    f = get_format(name)
    assert f.default_mode == "afpq"
    for m in MODES:
        assert f.supports(m)
        assert resolve_mode(f, m) == m
    assert resolve_mode(name) == "afpq"
    assert resolve_mode(name, sym=True) == "sym"
    assert resolve_mode(name, "zp", sym=True) == "zp"  # explicit mode wins


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_only_zp(bits):
    assert resolve_mode(f"int{bits}") == "zp"
    for m in ("afpq", "sym"):
        with pytest.raises(ValueError) as exc:
            resolve_mode(f"int{bits}", m)
        assert f"int{bits}" in str(exc.value) and m in str(exc.value) and "'zp'" in str(exc.value)
    with pytest.raises(ValueError):
        resolve_mode(f"int{bits}", sym=True)


def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError) as exc:
        resolve_mode("nf4", "asym")
    msg = str(exc.value)
    assert "'asym'" in msg
    for m in MODES:
        assert m in msg


def test_mode_support_of_custom_tables(restore_format_registry):
    no_zero = register_format("t_nozero", [-1.5, -0.5, 0.5, 1.5])
    assert no_zero.supports("sym") and no_zero.supports("zp")
    assert not no_zero.supports("afpq")  # afpq needs 0 on the grid
    with pytest.raises(ValueError, match="t_nozero"):
        no_zero.check_mode("afpq")

    positive = register_format("t_pos", [0.0, 1.0, 2.0, 3.0])
    assert positive.supports("zp")
    assert not positive.supports("afpq") and not positive.supports("sym")  # afpq/sym need both signs
    with pytest.raises(ValueError, match="both signs"):
        positive.check_mode("sym")

    negative = register_format("t_neg", [-3.0, -2.0, -1.0, 0.0])
    assert negative.supports("zp") and not negative.supports("afpq") and not negative.supports("sym")

    flat = register_format("t_flat", [1.0, 1.0])
    assert not any(flat.supports(m) for m in MODES)  # zero range: not even zp

    skew = register_format("t_skew", [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    assert all(skew.supports(m) for m in MODES)
    assert (skew.top_pos, skew.top_neg, skew.range) == (3.0, 4.0, 7.0)


# -- registration ---------------------------------------------------------------------------------
def test_register_custom_table(restore_format_registry):
    table = [-2.0, -1.0, -0.25, 0.0, 0.25, 1.0, 2.0, 3.0]
    f = register_format("t_custom3", table)
    assert f.bits == 3 and f.kind == "custom" and f.default_mode == "afpq"
    assert list(f.values) == table
    assert get_format("t_custom3") is f
    assert "t_custom3" in list_formats()
    assert (f.top_pos, f.top_neg) == (3.0, 2.0)
    # Its LUT and encoder work like any other grid.
    assert f.lut("afpq").tolist() == table


def test_register_requires_sorted_custom_table(restore_format_registry):
    with pytest.raises(ValueError, match="sorted"):
        register_format("t_unsorted", [0.0, -1.0, 1.0, 2.0])
    assert "t_unsorted" not in list_formats()


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_register_requires_power_of_two_length(restore_format_registry, n):
    with pytest.raises(ValueError, match="power of two"):
        register_format("t_len", [float(i) for i in range(n)])
    assert "t_len" not in list_formats()


def test_register_explicit_bits_must_match_length(restore_format_registry):
    with pytest.raises(ValueError, match="16 values"):
        register_format("t_bits", [-1.0, 0.0, 0.5, 1.0], bits=4)
    with pytest.raises(ValueError, match="bits"):
        register_format("t_one", [0.0])  # 1 value = 0 bits
    with pytest.raises(ValueError, match="bits"):
        register_format("t_nine", [float(i) for i in range(512)])


def test_register_rejects_non_finite_and_bad_names(restore_format_registry):
    with pytest.raises(ValueError, match="finite"):
        register_format("t_inf", [-math.inf, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        register_format("t_nan", [-1.0, 0.0, 1.0, math.nan])
    with pytest.raises(ValueError, match="name"):
        register_format("", [-1.0, 0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="name"):
        register_format(None, [-1.0, 0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="mode"):
        register_format("t_mode", [-1.0, 0.0, 0.5, 1.0], default_mode="asym")


def test_reregistration_rules(restore_format_registry):
    a = [-1.0, 0.0, 0.5, 1.0]
    b = [-1.0, 0.0, 0.25, 1.0]
    f1 = register_format("t_rereg", a)
    f2 = register_format("t_rereg", list(a))  # same table again: a no-op
    assert f2 == f1 and get_format("t_rereg") == f1
    with pytest.raises(ValueError, match="already registered"):
        register_format("t_rereg", b)
    assert list(get_format("t_rereg").values) == a  # the refused call changed nothing
    f3 = register_format("t_rereg", b, overwrite=True)
    assert list(f3.values) == b and get_format("t_rereg") is f3


def test_builtin_cannot_be_replaced_silently(restore_format_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_format("nf4", [-1.0, 0.0, 0.5, 1.0])
    assert list(get_format("nf4").values) == [float(v) for v in NF4]


def test_overwrite_changes_what_the_encoder_uses(restore_format_registry):
    """After an overwrite, encoding uses the new table (no stale cache)."""
    from afpq_plugins.core.quantize import decode, encode

    one = torch.ones(())
    y = torch.tensor([0.3, 0.6, -0.3, -0.9])
    register_format("t_cache", [-1.0, 0.0, 0.5, 1.0])
    c = encode(y, "t_cache", "afpq", one, one)
    assert decode(c, "t_cache", "afpq", one, one).tolist() == [0.5, 0.5, 0.0, -1.0]
    register_format("t_cache", [-1.0, 0.0, 0.25, 1.0], overwrite=True)
    c = encode(y, "t_cache", "afpq", one, one)
    assert decode(c, "t_cache", "afpq", one, one).tolist() == [0.25, 0.25, 0.0, -1.0]


def test_custom_name_with_capitals_is_found_again(restore_format_registry):
    """get_format lower-cases the name it looks up, so registration must store names so
    that the registered name finds its format again."""
    f = register_format("MyGrid", [-1.0, 0.0, 0.5, 1.0])
    assert get_format("MyGrid").values == f.values
    assert get_format("mygrid").values == f.values


def test_format_constructor_validation():
    with pytest.raises(ValueError, match="needs 4 values"):
        Format(name="x", bits=2, kind="custom", values=(0.0, 1.0, 2.0), default_mode="zp")
    with pytest.raises(ValueError, match="finite"):
        Format(name="x", bits=1, kind="custom", values=(0.0, math.inf), default_mode="zp")
    with pytest.raises(ValueError, match="default mode"):
        Format(name="x", bits=1, kind="custom", values=(0.0, 1.0), default_mode="nope")


def test_to_dict():
    d = get_format("fp3").to_dict()
    assert d == {"name": "fp3", "bits": 3, "kind": "fp", "values": [_sign_mag_value(c, FP3_MAG, 2) for c in range(8)]}
