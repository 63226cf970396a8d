from pathlib import Path

import pytest

from allmrec.config import ConfigError, load_config


def test_defaults_then_file_then_override(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\ndata:\n  min_user_interactions: 3\n  max_bad_lines: 4\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  max_bad_lines: 7\n")
    config = load_config([base, overlay], ["data.min_item_interactions=2", "seed=7"])
    assert config.name == "base"
    assert config.data.min_user_interactions == 3  # from base, untouched by the overlay
    assert config.data.max_bad_lines == 7  # overlay wins
    assert config.data.min_item_interactions == 2
    assert config.seed == 7
    assert config.data.text_template == "{title}, {description}"  # default


def test_name_defaults_to_file_stem(tmp_path: Path):
    path = tmp_path / "my-run.yaml"
    path.write_text("seed: 1\n")
    assert load_config([path]).name == "my-run"


def test_one_path_is_read_as_one_file(tmp_path: Path):
    path = tmp_path / "alone.yaml"
    path.write_text("seed: 5\n")
    for given in (path, str(path)):  # not one file per character of the string
        config = load_config(given)
        assert (config.name, config.seed) == ("alone", 5)


def test_unknown_key_names_key_and_file(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  min_user_interactons: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    message = str(err.value)
    assert "data.min_user_interactons" in message
    assert str(path) in message
    assert "min_user_interactions" in message  # the known keys are listed


def test_wrong_type_names_key_and_origin(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  max_bad_lines: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data.max_bad_lines"):
        load_config([path])
    with pytest.raises(ConfigError, match=r"--set data.min_user_interactions=x"):
        load_config([], ["data.min_user_interactions=x"])


def test_bad_override_syntax_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config([], ["data.max_bad_lines"])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])


def test_shipped_configs_load():
    for path in sorted(Path("configs").glob("*.yaml")):
        config = load_config([path])
        assert config.name == path.stem


def test_set_takes_text_with_braces_literally_for_a_string_field():
    # '{title}, {genre}' is not valid YAML and '{title}' parses as a mapping: a string
    # field takes what was written
    config = load_config([], ["data.text_template={title}, {genre}"])
    assert config.data.text_template == "{title}, {genre}"
    assert load_config([], ["data.text_template={title}"]).data.text_template == "{title}"
    assert load_config([], ["name=1.5"]).name == "1.5"
    assert load_config([], ['data.text_template="{title}: {genre}"']).data.text_template == (
        "{title}: {genre}"
    )
    assert load_config([], ["stage2.readout_layer=null"]).stage2.readout_layer is None


def test_set_value_that_is_not_yaml_names_the_set_and_how_to_quote():
    with pytest.raises(ConfigError) as err:
        load_config([], ["tune.alpha=[0.1, 0.5"])
    message = str(err.value)
    assert message.startswith("--set 'tune.alpha=[0.1, 0.5': the value is not valid YAML")
    assert "in quotes" in message and "Traceback" not in message
