"""Typed settings: YAML, command-line overrides, and one-line errors for bad values."""

import pytest

from uniner.config import STAGES, PassagesConfig, PipelineConfig, load_config
from uniner.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_every_field_of_every_config_has_help_and_default():
    import dataclasses

    for cls in [*(s.config for s in STAGES.values()), PipelineConfig]:
        for spec in dataclasses.fields(cls):
            assert spec.metadata.get("help"), f"{cls.__name__}.{spec.name} has no help"
            assert spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING


def test_yaml_then_command_line_wins(tmp_path):
    path = write(tmp_path, "input: docs/\noutput: out/\nmax-tokens: 128\nseed: 3\n")
    config = load_config(PassagesConfig, yaml_path=path, overrides={"seed": "7"})
    assert (config.input, config.output, config.max_tokens, config.seed) == ("docs/", "out/", 128, 7)


def test_values_are_converted_by_type(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\ndedup: 'no'\n")
    config = load_config(PassagesConfig, yaml_path=path, overrides={"max_tokens": "64"})
    assert config.dedup is False and config.max_tokens == 64


@pytest.mark.parametrize(
    "text, message",
    [
        ("input: a\noutput: b\nmax_tokens: many\n", "setting 'max_tokens' in .*expected an integer, got 'many'"),
        ("input: a\noutput: b\nmax_tokenz: 5\n", "unknown setting 'max_tokenz'.*known settings: .*max-tokens"),
        ("input: a\noutput: b\ndedup: maybe\n", "expected true or false"),
        ("input: [a\n", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("output: b\n", "missing --input"),
        ("input: a\noutput: b\ninput_format: csv\n", "unknown --input-format 'csv'"),
    ],
)
def test_bad_settings_are_one_line_user_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as caught:
        load_config(PassagesConfig, yaml_path=write(tmp_path, text), overrides={})
    assert "\n" not in str(caught.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.yaml does not exist"):
        load_config(PassagesConfig, yaml_path=str(tmp_path / "nope.yaml"), overrides={})


def test_pipeline_stages_must_be_known_and_in_order():
    with pytest.raises(UserError, match="in the order"):
        PipelineConfig(stages=["build-data", "passages"]).check()
    with pytest.raises(UserError, match="once each"):
        PipelineConfig(stages=["passages", "passages"]).check()
    PipelineConfig(stages=["build-data", "train", "evaluate"]).check()
    with pytest.raises(UserError, match="unknown stage"):
        PipelineConfig(stages=["passages", "label"]).check()
    PipelineConfig(stages=["annotate", "build-data", "train"]).check()
