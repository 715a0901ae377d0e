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
        "enabled": True, "r": 0.975, "w0": [1.36, 14.4, 6.6, 40.2, 49.6], "wf": [1.0, 2.0, 2.0, 2.0, 2.0],
        "grade1_boost": 1.0}  # issue 14's lever, off (o_O's weights unchanged)
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


# ------------------------------------------------------------------ every value checked (issue 16, defect 9)
# (override, the start of the one-line error: the key, then the accepted values). The first group trained (with a
# negative learning rate for lr_drop_factor=-1) or failed only after training before issue 16.
BAD_VALUES = [
    ("optim.lr_drop_factor=-1", "optim.lr_drop_factor must be in (0, 1] (1: no drop); got -1"),
    ("optim.lr=.inf", "optim.lr must be a finite number > 0; got inf"),
    ("model.width=.inf", "model.width must be a finite number in (0, 16]; got inf"),
    ("model.min_filters=100000", "model.min_filters must be in [0, 4096] (0: no floor); got 100000"),
    ("precision=fp16", "config key 'precision': expected one of 'float32', 'mixed_bfloat16', 'auto', got str 'fp16'"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0; got -0.0001"),
    ("optim.clipnorm=-1", "optim.clipnorm must be > 0 (or null for no clipping); got -1"),
    ("model.l2=-5e-4", "model.l2 must be >= 0; got -0.0005"),
    ("resample.r=1.5", "resample.r must be in [0, 1], got 1.5"),
    ("nan.max_events=-1", "nan.max_events must be >= 0; got -1"),
    ("optim.lr_drop_at=5", "optim.lr_drop_at must be in [0, 1] (a fraction of the stage's epochs); got 5"),
    ("model_name=../../..", "model_name must be one folder name of letters, digits, '.', '_' or '-'"),
    ("eval_bootstrap=-5", "eval_bootstrap must be >= 0 (0: no intervals); got -5"),
    # Further gaps found going through config.py field by field.
    ("stages.0.lr=.inf", "stages.0.lr must be a finite number > 0; got inf"),
    ("stages.1.augment_strength=-1", "stages.1.augment_strength must be >= 0 (or null for augment.strength)"),
    ("stages.0.max_seconds=.inf", "stages.0.max_seconds must be a finite number > 0 (or null for no limit)"),
    ("model.width=100", "model.width must be in (0, 16]; got 100"),
    ("model.dropout=1", "model.dropout must be in [0, 1); got 1"),
    ("model.leaky_slope=-0.01", "model.leaky_slope must be in [0, 1]; got -0.01"),
    ("model.seed=-1", "model.seed must be an integer in [0, 2**31 - 1]; got -1"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1); got 1"),
    ("optim.reference_batch_size=0", "optim.reference_batch_size must be >= 1 (or null for no scaling); got 0"),
    ("data.format=jpeg", "data.format: unknown format 'jpeg'; accepted: eyepacs, aptos, folders, csv"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1); got 0"),
    ("data.test_fraction=-0.1", "data.test_fraction must be in [0, 1); got -0.1"),
    ("data.val_fraction=0.9", "data.val_fraction + data.test_fraction must be < 1 (the rest trains); got 0.9 + 0.15"),
    ("data.split_seed=-3", "data.split_seed must be an integer in [0, 2**31 - 1]; got -3"),
    ("data.synth_count=0", "data.synth_count must be >= 1; got 0"),
    ("data.synth_size=100000", "data.synth_size must be in [64, 4096] pixels; got 100000"),
    ("data.synth_prior=uniform", "data.synth_prior must be eyepacs or balanced or five fractions a,b,c,d,e"),
    ("data.synth_prior='0.5,0.5,0.5,0,0'", "data.synth_prior must be eyepacs or balanced or five fractions"),
    ("data.synth_seed=2147483648", "data.synth_seed must be an integer in [0, 2**31 - 1]; got 2.14748e+09"),
    ("data.workers=-1", "data.workers must be >= 0 (0: every core); got -1"),
    ("data.cache=''", "data.cache must be a non-empty string without NUL bytes (or null); got ''"),
    ("data.label_col=' '", "data.label_col must be a non-empty string without NUL bytes (or null)"),
    ("runs_dir=''", "runs_dir must be a non-empty string without NUL bytes (or null); got ''"),
    ("export_dir=\"a\\0b\"", "export_dir must be a non-empty string without NUL bytes"),
    ("augment.strength=.nan", "augment.strength must be a finite number >= 0 (augmentation strength), got nan"),
    ("augment.zoom=.inf", "augment.zoom must be a finite number >= 1 (a factor such as 1.15), got inf"),
    ("augment.color_sigma=-1", "augment.color_sigma must be a finite number >= 0, got -1.0"),
    ("resample.w0=[.nan, 1, 1, 1, 1]", "resample.w0 must be 5 non-negative weights (finite, not all 0)"),
    ("resample.wf=[0, 0, 0, 0, 0]", "resample.wf must be 5 non-negative weights (finite, not all 0)"),
    ("tune.lr_max=.inf", "tune.lr_min and tune.lr_max must be finite numbers; got lr_min=0.0001, lr_max=inf"),
    ("tune.extra={momentum: {values: [.nan]}}", "tune.extra.momentum: values must be finite numbers; got [nan]"),
    ("seed=-1", "seed must be an integer in [0, 2**31 - 1]; got -1"),
    ("name=" + "n" * 300, "name must be a plain folder name (no '/', not '.' or '..', at most 255 bytes)"),
    # Refused before issue 16 already (kept in the table so that they stay refused).
    ("optim.lr=.nan", "optim.lr must be a finite number > 0; got nan"),
    ("resample.r=-1", "resample.r must be in [0, 1], got -1.0"),
    ("stages.0.epochs=0", "stages.0.epochs must be >= 1; got 0"),
    ("stages.0.max_seconds=-1", "stages.0.max_seconds must be > 0 (or null for no limit); got -1"),
    ("global_batch_size=0", "global_batch_size must be >= 1; got 0"),
    ("nan.lr_factor=1", "nan.lr_factor must be in (0, 1); got 1"),
    ("name=a/b", "name must be a plain folder name"),
    ("name=..", "name must be a plain folder name"),
    ("tune.lr_min=0", "tune.lr_min and tune.lr_max must be > 0 for log sampling; got lr_min=0.0"),
    ("tune.data_fraction=2", "tune.data_fraction must be in (0, 1]; got 2.0"),
    ("tune.seed=0", "tune.seed must be >= 1 (Keras Tuner reads 0 as 'random'); got 0"),
    ("strategy=gpu", "config key 'strategy': expected one of 'auto', 'default'"),
    ("optim.name=rmsprop", "config key 'optim.name': expected one of 'sgd', 'adam', 'adamw'"),
    ("data.normalize=clahe", "config key 'data.normalize': expected one of 'none', 'graham'"),
    ("export=1", "config key 'export': expected bool, got int 1"),
    ("stages.0.epochs=1.5", "config key 'stages[0].epochs': expected int, got float 1.5"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o[:40] for o, _ in BAD_VALUES])
def test_every_bad_value_is_a_one_line_error_naming_the_key_and_the_accepted_values(override, message):
    with pytest.raises(ConfigError) as info:
        load_train_config("quick", [override])
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text and len(text) < 400, text


def _leaves(cls, prefix=""):
    """Every field of a config class, recursively (``stages.*.lr`` for a list of sections)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        key = f"{prefix}{f.name}" if typing.get_origin(tp) is not list else f"{prefix}{f.name}.*"
        if dataclasses.is_dataclass(inner):
            yield from _leaves(inner, key + ".")
        else:
            yield key, tp


def test_every_field_of_a_run_has_a_check():
    from typing import Literal, get_origin

    from retina_scale.config import VALUE_RANGES, TrainConfig

    by_rule = {
        # _check_names: paths, names, choices
        "name", "runs_dir", "export_dir", "model_name", "data.data", "data.labels", "data.cache", "data.image_col",
        "data.label_col", "data.format", "data.synth_prior",
        "stages.*.stage",  # stage_index and the increasing sizes
        "augment.strength", "augment.zoom", "augment.translation", "augment.color_sigma",  # AugmentConfig
        "resample.r", "resample.w0", "resample.wf", "resample.grade1_boost",  # ResampleConfig
        "tune.tuner", "tune.lr_min", "tune.lr_max", "tune.max_trials", "tune.epochs", "tune.data_fraction", "tune.extra", "tune.seed",  # check_tune_config
    }
    unchecked = [key for key, tp in _leaves(TrainConfig)
                 if key not in VALUE_RANGES and key not in by_rule and tp is not bool and get_origin(tp) is not Literal]
    assert unchecked == []
    assert not set(VALUE_RANGES) & by_rule


def test_the_synthetic_priors_named_in_the_schema_are_those_the_generator_knows():
    from retina_scale.config import SYNTH_PRIORS
    from retina_scale.data.synthetic.plan import PRIORS

    assert set(SYNTH_PRIORS) == set(PRIORS)
    assert load_train_config("quick", ["data.synth_prior='0.5,0.5,0,0,0'"]).data.synth_prior == "0.5,0.5,0,0,0"


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


# ------------------------------------------------------------------ issue 14's levers: off by default
def test_the_levers_default_to_the_papers_design_in_every_preset():
    from retina_scale.config import PRESETS

    for name in PRESETS:
        config = load_train_config(name)
        assert config.model.head_pooling == "rms", name
        assert (config.loss.aux, config.resample.grade1_boost) == ("none", 1.0), name


def test_the_levers_are_config_options():
    config = load_train_config("quick", ["model.head_pooling=attention", "loss.aux=ordinal", "loss.aux_weight=0.5",
                                         "resample.grade1_boost=3"])
    assert (config.model.head_pooling, config.loss.aux, config.loss.aux_weight) == ("attention", "ordinal", 0.5)
    assert config.resample.grade1_boost == 3.0
    assert to_dict(config)["loss"] == {"aux": "ordinal", "aux_weight": 0.5}


@pytest.mark.parametrize("overrides, message", [
    (["model.head_pooling=avg"], "'model.head_pooling': expected one of 'rms', 'max', 'attention', got str 'avg'"),
    (["loss.aux=focal"], "'loss.aux': expected one of 'none', 'ordinal', 'classification'"),
    (["loss.aux_weight=-0.5"], "loss.aux_weight must be >= 0 (0: the MSE alone); got -0.5"),
    (["loss.aux_weight=.inf"], "loss.aux_weight must be a finite number >= 0"),
    (["resample.grade1_boost=0.5"], "resample.grade1_boost must be a finite factor >= 1 (1: o_O's weights), got 0.5"),
    (["resample.grade1_boost=.nan"], "resample.grade1_boost must be a finite factor >= 1"),
    (["resample.enabled=false", "resample.grade1_boost=2"], "resample.grade1_boost 2 needs enabled: true"),
])
def test_bad_lever_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_train_config("quick", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_levers_given_as_dataclasses_are_checked_too():
    from retina_scale.config import LossConfig, ModelConfig

    with pytest.raises(ConfigError, match="model.head_pooling must be one of rms, max, attention"):
        ModelConfig(head_pooling="mean")
    with pytest.raises(ConfigError, match="loss.aux must be one of none, ordinal, classification"):
        LossConfig(aux="ranking")
    with pytest.raises(UserError, match="grade1_boost must be a finite factor >= 1"):
        ResampleConfig(grade1_boost=0.0)
