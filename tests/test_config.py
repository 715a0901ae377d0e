"""Tests of retina_scale.config: the run's schema, its presets and the name lists the CLI takes."""

import argparse

import pytest

from retina_scale.config import (
    FORMATS,
    NORMALIZATIONS,
    STRATEGIES,
    TUNERS,
    ResampleConfig,
    load_train_config,
    stage_index,
    stage_name,
    stage_size,
)
from retina_scale.utils.errors import UserError
from retina_scale.utils.typed_config import ConfigError, to_dict


@pytest.mark.parametrize("given, index", [("tiny", 1), ("Median", 3), (" large ", 4), ("stage7", 7), (112, 1),
                                          ("224", 2), (896, 4), (1792, 5)])
def test_stage_index_reads_names_and_sizes(given, index):
    assert stage_index(given) == index


def test_stage_names_and_sizes_double_per_stage():
    assert [stage_name(i) for i in (1, 2, 3, 4, 5, 6)] == ["tiny", "small", "median", "large", "xlarge", "stage6"]
    assert [stage_size(i) for i in (1, 2, 3, 4)] == [112, 224, 448, 896]


@pytest.mark.parametrize("bad", ["huge", 100, 336, 0, True, "stage0", 1.5])
def test_unknown_stage_is_a_one_line_error_listing_the_accepted(bad):
    with pytest.raises(ValueError) as info:
        stage_index(bad)
    message = str(info.value)
    assert "\n" not in message and "accepted: tiny, small, median, large, xlarge" in message


def test_resample_section_is_one_class_with_enabled_and_balanced():
    cfg = load_train_config("quick", ["resample.enabled=false", "resample.w0=balanced"])
    assert isinstance(cfg.resample, ResampleConfig)
    assert cfg.resample.enabled is False and cfg.resample.w0 == "balanced"
    assert to_dict(load_train_config("quick").resample) == {
        "enabled": True, "r": 0.975, "w0": [1.36, 14.4, 6.6, 40.2, 49.6], "wf": [1.0, 2.0, 2.0, 2.0, 2.0]}
    with pytest.raises(ConfigError, match="w0 must be 5 weights or 'balanced'"):
        load_train_config("quick", ["resample.w0=uniform"])
    with pytest.raises(ConfigError, match="wf must be 5 non-negative weights"):
        load_train_config("quick", ["resample.wf=[1, 2]"])


def test_config_errors_are_user_errors():
    with pytest.raises(UserError):
        load_train_config("quick", ["strategy=gpu"])
    with pytest.raises(UserError, match="unknown preset 'fast'; accepted: quick, paper, study, study-full"):
        load_train_config("fast")


def test_a_ladder_whose_sizes_do_not_increase_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"must increase stage by stage; got \[224, 112\]"):
        load_train_config("quick", ["stages=[{stage: small}, {stage: tiny}]"])
    with pytest.raises(ConfigError, match=r"stages.0.stage: unknown stage 'huge'"):
        load_train_config("quick", ["stages=[{stage: huge}]"])


def _choices(command: str, option: str):
    from retina_scale.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


def test_command_line_choices_come_from_the_schema():
    assert _choices("train", "--strategy") == STRATEGIES
    assert _choices("train", "--format") == FORMATS == ("eyepacs", "aptos", "folders", "csv")
    assert _choices("prepare", "--normalize") == NORMALIZATIONS == ("none", "graham")
    assert TUNERS == ("random", "bayesian", "hyperband")
    assert load_train_config("quick").strategy in STRATEGIES


@pytest.mark.parametrize("precision, flags, gpus, policy", [
    ("auto", {"fma", "avx512f", "amx_bf16", "amx_tile"}, (), "mixed_bfloat16"),  # Sapphire Rapids
    ("auto", {"fma", "avx512f", "avx512_bf16"}, (), "mixed_bfloat16"),  # Zen 4, Cooper Lake
    ("auto", {"fma", "avx512f", "avx2"}, (), "float32"),  # Skylake-SP: no native bf16
    ("auto", set(), (), "float32"),  # nothing known
    ("auto", {"avx512f"}, [(8, 0)], "mixed_bfloat16"),  # an A100 computes
    ("auto", {"amx_bf16"}, [(7, 0)], "float32"),  # a V100 computes: no bf16, whatever the CPU has
    ("auto", set(), [(9, 0), (7, 5)], "float32"),  # every GPU must have it
    ("float32", {"amx_bf16"}, (), "float32"),
    ("mixed_bfloat16", set(), (), "mixed_bfloat16"),
])
def test_precision_auto_is_bf16_where_the_computing_device_has_it(precision, flags, gpus, policy):
    from retina_scale.config import resolve_precision

    assert resolve_precision(precision, flags, gpus) == policy


def test_precision_is_a_config_switch_float32_by_default():
    from retina_scale.config import PRECISIONS, PRESETS, resolve_precision

    assert PRECISIONS == ("float32", "mixed_bfloat16", "auto")
    assert {PRESETS[name]().precision for name in PRESETS} == {"float32"}
    assert load_train_config("quick", ["precision=auto"]).precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_train_config("quick", ["precision=bf16"])
    with pytest.raises(ConfigError, match="unknown precision 'fp16'; accepted: float32, mixed_bfloat16, auto"):
        resolve_precision("fp16")


def test_min_filters_is_off_by_default_and_refuses_a_negative_floor():
    assert {load_train_config(name).model.min_filters for name in ("quick", "paper", "study", "study-full")} == {0}
    assert load_train_config("quick", ["model.min_filters=16"]).model.min_filters == 16
    with pytest.raises(ConfigError, match="model.min_filters must be >= 0"):
        load_train_config("quick", ["model.min_filters=-4"])
