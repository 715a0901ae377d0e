"""Tests of retina_scale.utils.typed_config: typed dataclass configs from YAML/JSON/dicts, overrides, dumping."""

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from retina_scale.utils.typed_config import (
    ConfigError,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    load_mapping,
    parse_override,
    to_dict,
    to_yaml,
)


@dataclass
class Optim:
    lr: float = 0.003
    momentum: float = 0.9
    nesterov: bool = True


@dataclass
class Tuner:
    trials: int = 10
    lr_range: tuple[float, float] = (1e-4, 1e-1)
    seed: int | None = None  # PEP 604 unions work as Optional does


@dataclass
class Run:
    name: str = "quick"
    sizes: tuple[int, ...] = (112, 224, 448)
    widths: list[float] = field(default_factory=lambda: [0.25, 0.5])
    seed: Optional[int] = None
    strategy: Literal["auto", "default", "mirrored"] = "auto"
    optim: Optim = field(default_factory=lambda: Optim(lr=0.01))  # differs from Optim()'s default
    tuner: Optional[Tuner] = None
    class_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must increase, got {list(self.sizes)}")


@dataclass
class Required:
    data: str
    epochs: int = 1


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- loading


def test_load_yaml_and_json_files_give_typed_nested_configs(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "name: paper\n"
        "sizes: [112, 224, 448, 896]\n"
        "seed: 3\n"
        "optim:\n  lr: 1e-3\n  momentum: 1\n"
        "tuner:\n  lr_range: [1.0e-5, 0.5]\n"
        "class_weights: {'0': 1, '1': 2.5}\n"
    )
    config = load_config(Run, yaml_file)
    assert config.sizes == (112, 224, 448, 896) and isinstance(config.sizes, tuple)
    assert config.optim == Optim(lr=0.001, momentum=1.0, nesterov=True)
    assert isinstance(config.optim.momentum, float)  # an int is accepted for a float field
    assert config.tuner == Tuner(trials=10, lr_range=(1e-5, 0.5))
    assert config.class_weights == {"0": 1.0, "1": 2.5}
    assert config.widths == [0.25, 0.5] and config.strategy == "auto"

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps(to_dict(config)))
    assert load_config(Run, json_file) == config


def test_defaults_and_preset_instances():
    assert load_config(Run) == Run()
    assert load_config(Run, {}).optim.lr == 0.01  # the field's default factory, not Optim()'s
    preset = Run(name="paper", sizes=(112, 224, 448, 896))
    derived = load_config(Run, preset, overrides=["optim.momentum=0.8"])
    assert derived.sizes == preset.sizes and derived.optim == Optim(lr=0.01, momentum=0.8)
    assert preset.optim.momentum == 0.9  # the preset itself is not changed


def test_yaml_follows_yaml_1_2_for_numbers_and_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: no\noptim:\n  lr: 5E-4\n  nesterov: false\n")
    config = load_config(Run, path)
    assert config.name == "no"  # YAML 1.1 would make this False
    assert config.optim.lr == 5e-4 and config.optim.nesterov is False


def test_unknown_keys_are_named_with_the_accepted_keys():
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, {"sizez": [112]})
    assert one_line(exc) == (
        "unknown config key 'sizez' (accepted keys: name, sizes, widths, seed, strategy, optim, "
        "tuner, class_weights); did you mean 'sizes'?"
    )
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, {"optim": {"rate": 0.1}})
    assert one_line(exc) == "unknown config key 'optim.rate' (accepted keys: lr, momentum, nesterov)"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lr": "fast"}}, "config key 'optim.lr': expected float, got str 'fast'"),
        ({"sizes": [112, "x"]}, "config key 'sizes[1]': expected int, got str 'x'"),
        ({"sizes": 112}, "config key 'sizes': expected list of int, got int 112"),
        ({"seed": 1.5}, "config key 'seed': expected int or None, got float 1.5"),
        ({"seed": True}, "config key 'seed': expected int or None, got bool True"),
        ({"optim": {"nesterov": 1}}, "config key 'optim.nesterov': expected bool, got int 1"),
        ({"optim": {"lr": False}}, "config key 'optim.lr': expected float, got bool False"),
        ({"name": 42}, "config key 'name': expected str, got int 42"),
        ({"optim": 3}, "config key 'optim': expected mapping (section Optim), got int 3"),
        ({"optim": None}, "config key 'optim': expected mapping (section Optim), got NoneType None"),
        (
            {"strategy": "gpu"},
            "config key 'strategy': expected one of 'auto', 'default', 'mirrored', got str 'gpu'",
        ),
        (
            {"tuner": {"lr_range": [0.1]}},
            "config key 'tuner.lr_range': expected list of 2 (float, float), got list [0.1]",
        ),
        ({"class_weights": {"0": "a"}}, "config key 'class_weights.0': expected float, got str 'a'"),
    ],
)
def test_wrong_types_name_the_field_the_type_and_the_value(data, message):
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, data)
    assert one_line(exc) == message


def test_missing_required_keys_and_post_init_checks():
    with pytest.raises(ConfigError) as exc:
        from_dict(Required, {"epochs": 2})
    assert one_line(exc) == "missing config key 'data' (str, required)"
    assert from_dict(Required, {"data": "/eyepacs"}) == Required("/eyepacs", 1)
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, {"sizes": [224, 112]})
    assert one_line(exc) == "config: sizes must increase, got [224, 112]"
    with pytest.raises(ConfigError, match="config section 'optim' must be a mapping"):
        from_dict(Optim, [1, 2], _prefix="optim")


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("sizes: [112]\nsizes: [224]\n", ".yaml", "duplicate key 'sizes' (line 2)"),
        ('{"name": "a", "name": "b"}', ".json", "duplicate key 'name'"),
        ("- 1\n- 2\n", ".yaml", "the top level must be a mapping of keys, got list"),
        ("sizes: [112\n", ".yaml", "not valid YAML"),
        ('{"name": ', ".json", "not valid JSON"),
        ("name: x\n", ".toml", "must end in .yaml, .yml or .json"),
        ("optim: {lr: x}\n", ".yml", "config key 'optim.lr': expected float, got str 'x'"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, content, suffix, message):
    path = tmp_path / f"config{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_config(Run, path)
    text = one_line(exc)
    assert message in text and str(path) in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(Run, tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(Run, tmp_path / "empty.yaml") == Run()
    assert load_mapping(tmp_path / "empty.yaml") == {}


# ----------------------------------------------------------------------------------- overrides


def test_overrides_parse_values_with_yaml_scalar_rules():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("sizes=[112, 224]") == (["sizes"], [112, 224])
    assert parse_override("seed=null") == (["seed"], None)
    assert parse_override("seed=") == (["seed"], None)
    assert parse_override("name='42'") == (["name"], "42")
    assert parse_override("name=a=b") == (["name"], "a=b")  # split on the first '='
    assert parse_override("optim.nesterov=off") == (["optim", "nesterov"], "off")


def test_apply_overrides_sets_nested_values_and_checks_them():
    config = apply_overrides(
        Run(),
        ["optim.lr=3e-4", "sizes=[112,224]", "seed=7", "strategy=mirrored", "seed=8",
         "tuner.trials=5"],
    )
    assert config.optim == Optim(lr=3e-4)
    assert config.sizes == (112, 224) and config.seed == 8 and config.strategy == "mirrored"
    assert config.tuner == Tuner(trials=5)  # a None section is created with its defaults
    assert apply_overrides(config, ["tuner.seed=3"]).tuner.seed == 3
    with pytest.raises(ConfigError, match="'tuner.seed': expected int or None, got str 'x'"):
        apply_overrides(config, ["tuner.seed=x"])
    # Overriding one key of a section keeps the others, including factory defaults.
    assert apply_overrides(Run(), ["optim.momentum=0.5"]).optim == Optim(lr=0.01, momentum=0.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (accepted keys: lr, momentum, nesterov)"),
        ("name=42", "config key 'name': expected str, got int 42"),
        ("optim.nesterov=yes", "config key 'optim.nesterov': expected bool, got str 'yes'"),
        ("optim.lr", "override 'optim.lr' must look like key=value or section.key=value"),
        ("optim..lr=1", "must look like key=value"),
        ("sizes.first=1", "override 'sizes.first=1': 'sizes' is a list of 3 item(s); index it with 0..2, got 'first'"),
        ("sizes=[1, 2", "override 'sizes=[1, 2': not valid YAML"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(Run, None, overrides=[override])
    assert message in one_line(exc)


# ---------------------------------------------------------------------------------------- dump


@pytest.mark.parametrize("name", ["run.yaml", "run.json"])
def test_dump_and_load_round_trip(tmp_path, name):
    config = Run(
        name="paper", sizes=(112, 224), seed=1, tuner=Tuner(trials=3, lr_range=(1e-7, 0.5)),
        optim=Optim(lr=1e-6), class_weights={"4": 49.6},
    )
    path = tmp_path / "sub" / name
    (tmp_path / "sub").mkdir()
    path.write_text("old content")  # replaced, not appended to
    assert dump_config(config, path) == path
    assert load_config(Run, path) == config
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary file left


def test_to_dict_and_yaml_are_plain_and_ordered():
    data = to_dict(Run(tuner=Tuner()))
    assert data["sizes"] == [112, 224, 448] and data["tuner"]["lr_range"] == [1e-4, 1e-1]
    assert list(data) == ["name", "sizes", "widths", "seed", "strategy", "optim", "tuner",
                          "class_weights"]
    text = to_yaml(Run())
    assert text.splitlines()[0] == "name: quick"
    assert "optim:\n  lr: 0.01\n  momentum: 0.9\n  nesterov: true\n" in text
    assert from_dict(Run, json.loads(json.dumps(to_dict(Run())))) == Run()


def test_dump_refuses_unknown_suffix_and_keeps_old_file(tmp_path):
    with pytest.raises(ConfigError, match="must end in .yaml, .yml or .json"):
        dump_config(Run(), tmp_path / "run.txt")
    assert list(tmp_path.iterdir()) == []


def test_override_indexes_into_a_list_of_sections():
    from dataclasses import dataclass, field

    @dataclass
    class Rung:
        stage: str = "tiny"
        epochs: int = 5

    @dataclass
    class Ladder:
        stages: list[Rung] = field(default_factory=lambda: [Rung(), Rung("small")])

    cfg = load_config(Ladder, None, ["stages.1.epochs=3"])
    assert cfg.stages[1].epochs == 3 and cfg.stages[0].epochs == 5 and isinstance(cfg.stages[1], Rung)
    with pytest.raises(ConfigError, match=r"list of 2 item\(s\); index it with 0..1, got '2'"):
        load_config(Ladder, None, ["stages.2.epochs=3"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(Ladder, None, ["stages.0.epoch=3"])


# ------------------------------------------------------------------------ hostile files (issue 16, defect 8)
# 10**9 "lol"s once expanded, in a few hundred bytes: each anchor holds nine aliases of the one before.
LAUGHS = ", ".join(["&a [" + ", ".join(["lol"] * 9) + "]"]
                   + [f"&{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")])
BILLION_LAUGHS = f"name: [{LAUGHS}]\n"

BOMB_IN_A_SUBPROCESS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: the expansion needs far more
from retina_scale.utils.typed_config import load_config
from dataclasses import dataclass

@dataclass
class Run:
    name: str = "quick"

try:
    load_config(Run, sys.argv[1])
except ValueError as exc:
    print("refused:", exc)
"""


def test_a_billion_laughs_file_is_refused_without_expanding_it(tmp_path, subprocess_env):
    import subprocess
    import sys

    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 1000  # 10**9 "lol"s once expanded
    # In a process limited to 1 GiB: building the error message used to repr() the whole expansion.
    proc = subprocess.run([sys.executable, "-c", BOMB_IN_A_SUBPROCESS, str(path)], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.strip() == (f"refused: {path}: more than 100000 values once its aliases (*name) are "
                                   "expanded; a config is not that large (a 'billion laughs' document?)")
    with pytest.raises(ConfigError, match="more than 100000 values once its aliases"):
        parse_override(f"name=[{LAUGHS}]")  # the same bomb as a command-line override


def test_the_error_message_of_a_huge_shared_value_stays_small():
    import tracemalloc

    laughs = ["lol"] * 9
    for _ in range(7):
        laughs = [laughs] * 9  # 9**8 items through shared lists: a repr() of 50 MB
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            from_dict(Run, {"name": laughs})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith("config key 'name': expected str, got list [[[[...]")
    assert len(str(info.value)) < 150 and peak < 1 << 20


@pytest.mark.parametrize("content, message", [
    ("name: &a [*a]\n", "an alias refers to a value that contains it"),
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", "values nested too deeply"),
], ids=["recursive", "deep"])
def test_recursive_and_deeply_nested_yaml_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(Run, path)


def test_a_config_file_over_a_mebibyte_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"big.yaml: 1200008 bytes; a config file holds at most 1048576"):
        load_config(Run, path)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_mapping(tmp_path / "deep.json")
