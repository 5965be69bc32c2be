from pathlib import Path

import pytest

from privet.common.config import (
    AdapterConfig,
    DataConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    PrivetConfig,
    SimulationConfig,
    TrainConfig,
    apply_overrides,
    config_reference,
    dump_config,
    load_config,
)
from privet.common.errors import ConfigError

SECTIONS = [
    ModelConfig,
    AdapterConfig,
    PrivacyConfig,
    TrainConfig,
    DataConfig,
    FederationConfig,
    SimulationConfig,
]


@pytest.mark.parametrize("model", SECTIONS)
def test_every_section_rejects_unknown_fields(model: type) -> None:
    with pytest.raises(Exception, match="Extra inputs|extra"):
        model(no_such_field=1)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("privacy.accountant='gdp'", "privacy.accountant"),
        ("train.lr=0", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.local_epochs=-0.5", "train.local_epochs"),
        ("adapter.r=0", "adapter.r"),
        ("adapter.dropout=1.0", "adapter.dropout"),
        ("model.max_length=2", "model.max_length"),
        ("model.device='tpu'", "model.device"),
        ("data.partition='random'", "data.partition"),
        ("data.alpha=0", "data.alpha"),
        ("data.num_clients=0", "data.num_clients"),
        ("federation.rounds=0", "federation.rounds"),
        ("federation.fraction_train=1.5", "federation.fraction_train"),
        ("simulation.cpus_per_client=0", "simulation.cpus_per_client"),
        ("simulation.run_name='a b'", "simulation.run_name"),
        ("train.nosuch=1", "train.nosuch"),
    ],
)
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(field + ":"), message
    assert "\n" not in message  # one problem, one line


def test_unknown_field_message_says_how_to_find_the_right_one() -> None:
    with pytest.raises(ConfigError, match="unknown field.*config-reference"):
        load_config(None, ["train.learning_rate=0.1"])


def test_literal_message_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match="'rdp' or 'prv'"):
        load_config(None, ["privacy.accountant=gdp"])


def test_privacy_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="no privacy at all"):
        load_config(None, ["privacy.target_epsilon=none", "privacy.noise_multiplier=0"])
    with pytest.raises(ConfigError, match="above privacy.budget_epsilon"):
        load_config(None, ["privacy.target_epsilon=8", "privacy.budget_epsilon=4"])
    cfg = load_config(None, ["privacy.target_epsilon=none", "privacy.noise_multiplier=1.1"])
    assert cfg.privacy.noise_multiplier == 1.1
    assert cfg.privacy.effective_budget is None
    off = load_config(None, ["privacy.enabled=false"])
    assert off.privacy.effective_budget is None


def test_federation_cannot_wait_for_more_clients_than_exist() -> None:
    with pytest.raises(ConfigError, match="min_train_clients"):
        load_config(None, ["data.num_clients=2", "federation.min_train_clients=3"])


def test_overrides_parse_toml_values() -> None:
    data = apply_overrides(
        {},
        [
            "train.lr=3e-4",
            "adapter.target_modules=['query','key']",
            "privacy.enabled=false",
            "simulation.run_name=abc",
        ],
    )
    assert data == {
        "train": {"lr": 3e-4},
        "adapter": {"target_modules": ["query", "key"]},
        "privacy": {"enabled": False},
        "simulation": {"run_name": "abc"},
    }
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["lr"])


def test_toml_and_overrides_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text(
        '[train]\nlr = 0.01\n[federation]\nrounds = 7\n[data]\npartition = "dirichlet"\nalpha = 0.3\n'
    )
    cfg = load_config(path, ["federation.rounds=5", "model.num_hidden_layers=1"])
    assert (cfg.train.lr, cfg.federation.rounds, cfg.data.partition, cfg.data.alpha) == (
        0.01,
        5,
        "dirichlet",
        0.3,
    )
    again = tmp_path / "again.toml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_reference_documents_every_field() -> None:
    ref = config_reference()
    for name, field in PrivetConfig.model_fields.items():
        section = field.default_factory()  # type: ignore[misc,call-arg]
        assert f"## [{name}]" in ref
        for key in type(section).model_fields:
            assert f"| `{key}` |" in ref


def test_docs_config_reference_is_current() -> None:
    path = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert path.read_text() == config_reference() + "\n", (
        'docs/config.md is stale: python -c "from privet.common.config import config_reference; '
        "open('docs/config.md','w').write(config_reference()+'\\n')\""
    )


def test_dump_round_trips_a_field_unset_against_its_default(tmp_path: Path) -> None:
    # target_epsilon and top_layers default to numbers; a run that unset them must read back the
    # same, or a fixed-noise run's saved config.toml would not validate (both noise settings given).
    cfg = load_config(
        None,
        ["privacy.target_epsilon=none", "privacy.noise_multiplier=1.1", "adapter.top_layers=none"],
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_config(cfg))
    back = load_config(path)
    assert back == cfg
    assert back.privacy.target_epsilon is None
    assert back.adapter.top_layers is None
    assert back.privacy.noise_multiplier == 1.1
