import pytest

from indexing.errors import ConfigError
from workers.commands.evaluate import parse_fusion_options


def test_fusion_options_are_parsed_and_checked():
    assert parse_fusion_options(["max_minutes=2.5", "epochs=3", "loss=lambda"]) == {"max_minutes": 2.5, "epochs": 3, "loss": "lambda"}
    assert parse_fusion_options([]) == {}
    with pytest.raises(ConfigError, match="unknown --fusion-option 'speed'"):
        parse_fusion_options(["speed=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_fusion_options(["epochs"])
