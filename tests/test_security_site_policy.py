"""A site owns its privacy, its model and its ledger: the coordinator's attacks, played on the site.

The site's real ClientApp (``make_site_app``: the app ``privet client`` and ``Participant`` run)
gets real Flower messages whose run config is a coordinator's configuration, as a SuperNode
delivers them. A run asking for less privacy, another model or remote code is refused with one
error naming the setting, before anything is loaded or trained, and the ledger is untouched; a
round number far ahead does not lock the site out; a round asked again with the same inputs is
answered with the same update at no privacy cost, with other inputs it is charged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from privet.client.deploy import CONFIG_KEY, ERROR_POLICY, SiteSettings, make_site_app
from privet.client.policy import SiteModel, SitePolicy, SitePrivacy, apply_policy
from privet.client.privacy import ledger_path
from privet.common.arrays import state_to_arrayrecord
from privet.common.config import dump_config, load_config
from privet.common.data import Examples
from privet.common.errors import ConfigError, ModelError, PrivacyError
from privet.common.modeling import build_model, trainable_state
from tests.flower_fakes import run_identity

RECIPE = [
    "model.num_hidden_layers=1",
    "model.max_length=16",
    "train.batch_size=8",
    "train.local_epochs=0.3",
    "train.num_threads=1",
]
RUN = "/coordinator/runs/fed"


def _examples(n: int = 60) -> Examples:
    texts = [f"{'a fine' if i % 2 else 'an awful'} film, number {i}" for i in range(n)]
    return Examples(texts=texts, labels=np.asarray([i % 2 for i in range(n)], dtype=np.int64))


@pytest.fixture(scope="module")
def start_state() -> dict[str, torch.Tensor]:
    cfg = load_config(None, RECIPE)
    built = build_model(cfg.model, cfg.adapter, num_labels=2, seed=cfg.train.seed)
    return trainable_state(built.model)


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with run_identity():
        yield


def _site(tmp_path: Path, policy: SitePolicy | None = None) -> Any:
    settings = SiteSettings(
        name="site-a", state_dir=tmp_path / "state", policy=policy or SitePolicy()
    )
    return make_site_app(settings, _examples())


def _ask(
    app: Any,
    state: dict[str, torch.Tensor],
    *,
    round: int = 1,
    total: int = 3,
    sets: tuple[str, ...] = (),
    kind: str = "train",
) -> Message:
    """A coordinator's message for ``round`` with its configuration ``RECIPE + sets``."""
    cfg = load_config(None, [*RECIPE, *sets])
    content = RecordDict(
        {
            "arrays": state_to_arrayrecord(state),
            "config": ConfigRecord({"server-round": round, "total-rounds": total}),
        }
    )
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config={CONFIG_KEY: dump_config(cfg), "privet-run-dir": RUN},
    )
    reply: Message = app(Message(content, dst_node_id=1, message_type=kind), ctx)
    return reply


def _ledger(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ledger_path(tmp_path / "state", "site-a").read_text())
    return data


def _weights(reply: Message) -> dict[str, np.ndarray]:
    rec = reply.content.array_records["arrays"]
    return {k: rec[k].numpy() for k in rec}


ATTACKS = [
    # (the coordinator's settings, the setting the refusal names)
    (("privacy.target_epsilon=none", "privacy.noise_multiplier=0.05"), "privacy.noise_multiplier"),
    (("privacy.budget_epsilon=1000000",), "privacy.budget_epsilon"),
    (("privacy.target_epsilon=50", "privacy.budget_epsilon=50"), "privacy.target_epsilon"),
    (("privacy.enabled=false",), "privacy.enabled"),
    (("privacy.delta=0.001",), "privacy.delta"),
    (("model.name='bert-base-uncased'",), "model.name"),
    (("model.trust_remote_code=true",), "model.trust_remote_code"),
    (("privacy.clipping='ghost'",), "privacy.clipping"),
]


@pytest.mark.parametrize(("sets", "setting"), ATTACKS)
def test_a_run_asking_for_more_is_refused_and_nothing_is_spent(
    tmp_path: Path, start_state: dict[str, torch.Tensor], sets: tuple[str, ...], setting: str
) -> None:
    # Clipping kinds: this site allows only 'flat'; everything else is the safe default.
    policy = SitePolicy(privacy=SitePrivacy(clipping=("flat",)))
    app = _site(tmp_path, policy)
    for kind in ("train", "evaluate"):
        reply = _ask(app, start_state, sets=sets, kind=kind)
        assert reply.has_error() and reply.error.code == ERROR_POLICY
        reason = reply.error.reason
        assert f"asks for {setting} = " in reason, reason
        assert f"Fix: ask the coordinator to change {setting}" in reason
        assert "\n" not in reason  # one line
    # Nothing charged, nothing kept, nothing released: the ledger was never even opened.
    assert not (tmp_path / "state").exists()


def test_every_refused_setting_is_named_in_one_error() -> None:
    # A malicious run asks for several things at once: the one error names them all, so the
    # coordinator's operator (and the site's log) sees everything the run tried.
    cfg = load_config(
        None,
        [
            *RECIPE,
            "model.name='/elsewhere/model'",
            "model.trust_remote_code=true",
            "privacy.target_epsilon=none",
            "privacy.noise_multiplier=0.05",
            "privacy.budget_epsilon=1000000",
        ],
    )
    with pytest.raises(ModelError) as info:
        apply_policy(cfg, SitePolicy())
    message = str(info.value)
    assert message.startswith(
        "the coordinator's run asks for model.name = '/elsewhere/model', another model than "
        "this site loads (model.name = 'embedded:all-MiniLM-L6-v2' here); "
        "model.trust_remote_code = True, "
    )
    assert (
        "privacy.budget_epsilon = 1000000.0, a larger privacy budget than this site grants "
        in message
    )
    assert "(privacy.budget_epsilon = 8.0 here); privacy.noise_multiplier = 0.05, " in message
    assert info.value.fix == (
        "ask the coordinator to change model.name, model.trust_remote_code, "
        "privacy.budget_epsilon and privacy.noise_multiplier, or change this site's own settings "
        "(privet client --config SITE.toml, or the Participant's policy) if it agrees"
    )
    # Privacy alone is a PrivacyError; a site without DP still refuses another model.
    with pytest.raises(PrivacyError, match=r"privacy.budget_epsilon = 1000000.0.*; privacy.noise"):
        apply_policy(
            cfg, SitePolicy(model=SiteModel(name="/elsewhere/model", trust_remote_code=True))
        )
    with pytest.raises(ModelError, match=r"asks for model.name = '/elsewhere/model'"):
        apply_policy(cfg, SitePolicy(privacy=SitePrivacy(enabled=False)))


def test_remote_code_the_coordinator_points_at_never_runs(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    # The attack: model.name at a folder with its own model code, and remote code on.
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "code.EvilConfig"}})
    )
    (evil / "code.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    app = _site(tmp_path)
    sets = (f"model.name='{evil}'", "model.trust_remote_code=true")
    reply = _ask(app, start_state, sets=sets)
    assert reply.error.code == ERROR_POLICY and "model.name" in reply.error.reason
    assert not marker.exists()


def test_the_site_trains_with_its_own_privacy_and_budget(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    # The coordinator asks for less (epsilon 4, budget 4): followed, but the ledger's budget is the
    # site's own (8), never the coordinator's.
    app = _site(tmp_path)
    reply = _ask(app, start_state, sets=("privacy.target_epsilon=4", "privacy.budget_epsilon=4"))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    ledger = _ledger(tmp_path)
    assert ledger["budget_epsilon"] == 8.0 and ledger["delta"] == 1e-5
    assert [e["round"] for e in ledger["entries"]] == [1]
    assert 0 < ledger["entries"][0]["epsilon_after"] < 4.0  # 1 of 3 rounds planned at epsilon 4


def test_the_noise_floor_raises_a_calibrated_noise(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    app = _site(tmp_path, SitePolicy(privacy=SitePrivacy(min_noise_multiplier=7.5)))
    reply = _ask(app, start_state)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["noise-multiplier"] == 7.5
    assert _ledger(tmp_path)["entries"][0]["noise_multiplier"] == 7.5


def test_a_poisoned_round_order_does_not_lock_the_site_out(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    app = _site(tmp_path)
    far = _ask(app, start_state, round=1000)
    back = _ask(app, start_state, round=2)
    assert not far.has_error() and not back.has_error(), back.error.reason
    entries = _ledger(tmp_path)["entries"]
    assert [(e["round"], e["attempt"]) for e in entries] == [(1000, 1), (2, 1)]


def test_a_round_asked_again_is_answered_with_the_same_update_for_free(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    first = _ask(_site(tmp_path), start_state)
    ledger = _ledger(tmp_path)
    # A coordinator crash and resume: the same round, the same weights and configuration, to a
    # site whose process restarted too (a new app, the same state folder).
    again = _ask(_site(tmp_path), start_state)
    assert not again.has_error()
    a, b = _weights(first), _weights(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert _ledger(tmp_path) == ledger  # not charged
    m1, m2 = (r.content.metric_records["metrics"] for r in (first, again))
    assert m2["replayed"] == 1 and "replayed" not in m1
    assert m2["epsilon"] == m1["epsilon"] and m2["privacy-attempt"] == 1
    assert len(list((tmp_path / "state" / "releases" / "site-a").glob("*.safetensors"))) == 1


def test_a_round_asked_again_with_other_inputs_is_charged(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    app = _site(tmp_path)
    _ask(app, start_state)
    other = {k: v + 0.01 for k, v in start_state.items()}
    again = _ask(app, other)
    assert "replayed" not in again.content.metric_records["metrics"]
    entries = _ledger(tmp_path)["entries"]
    assert [(e["round"], e["attempt"]) for e in entries] == [(1, 1), (1, 2)]
    assert entries[1]["epsilon_after"] > entries[0]["epsilon_after"]
    # Another recipe is another input too; and only the latest KEEP = 2 updates stay on disk.
    _ask(app, start_state, sets=("train.lr=0.05",))
    assert len(_ledger(tmp_path)["entries"]) == 3
    assert len(list((tmp_path / "state" / "releases" / "site-a").glob("*.json"))) == 2


def test_a_redo_past_the_budget_is_refused_when_the_update_was_not_kept(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    # A one-round plan spends the whole budget: the kept update is sent again for free; once it
    # is gone, the redo is a new release and the budget refuses it (fail-closed).
    policy = SitePolicy(privacy=SitePrivacy(target_epsilon=2.0))
    first = _ask(_site(tmp_path, policy), start_state, total=1, sets=("privacy.target_epsilon=2",))
    assert first.content.metric_records["metrics"]["epsilon"] == pytest.approx(2.0, rel=0.01)
    again = _ask(_site(tmp_path, policy), start_state, total=1, sets=("privacy.target_epsilon=2",))
    assert not again.has_error()
    for path in (tmp_path / "state" / "releases" / "site-a").iterdir():
        path.unlink()
    ledger = _ledger(tmp_path)
    refused = _ask(
        _site(tmp_path, policy), start_state, total=1, sets=("privacy.target_epsilon=2",)
    )
    assert refused.has_error() and refused.error.code == 1001  # ERROR_BUDGET
    assert _ledger(tmp_path) == ledger


def test_apply_policy_keeps_the_recipe_and_takes_the_sites_privacy() -> None:
    cfg = load_config(None, [*RECIPE, "privacy.max_grad_norm=5", "privacy.clipping='ghost'"])
    policy = SitePolicy(
        privacy=SitePrivacy(target_epsilon=6, budget_epsilon=7, max_grad_norm=0.5, accountant="prv")
    )
    with pytest.raises(PrivacyError, match="privacy.target_epsilon = 8.0"):
        apply_policy(cfg, policy)
    cfg = load_config(None, [*RECIPE, "privacy.target_epsilon=5", "privacy.clipping='ghost'"])
    site_cfg, floor = apply_policy(cfg, policy)
    p = site_cfg.privacy
    assert (p.target_epsilon, p.budget_epsilon, p.max_grad_norm, p.accountant) == (5, 7, 0.5, "prv")
    assert p.clipping == "ghost" and floor == 0.5
    assert site_cfg.train == cfg.train and site_cfg.adapter == cfg.adapter


def test_a_site_policy_file_holds_only_privacy_and_model(tmp_path: Path) -> None:
    good = tmp_path / "site.toml"
    good.write_text(
        '[privacy]\ntarget_epsilon = 3\nbudget_epsilon = 5\nclipping = ["flat"]\n'
        '[model]\nname = "embedded:all-MiniLM-L6-v2"\n'
    )
    policy = SitePolicy.load(good)
    assert policy.privacy.budget == 5 and policy.privacy.clipping == ("flat",)
    assert policy.model == SiteModel()
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy]\ntarget_epsilon = 3\n[train]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: train") as info:
        SitePolicy.load(bad)
    assert info.value.fix is not None and "[privacy] and [model]" in info.value.fix


def test_the_cli_options_override_the_policy_file(tmp_path: Path) -> None:
    from privet.client.cli import _site_policy

    path = tmp_path / "site.toml"
    path.write_text("[privacy]\ntarget_epsilon = 3\nmin_noise_multiplier = 0.8\n")
    policy = _site_policy(path, epsilon=20.0, budget=25.0, model=None)
    assert (policy.privacy.target_epsilon, policy.privacy.budget) == (20.0, 25.0)
    assert policy.privacy.min_noise_multiplier == 0.8
    with pytest.raises(ConfigError, match="target_epsilon"):
        _site_policy(None, epsilon=20.0, budget=10.0, model=None)


def test_privacy_json_takes_each_sites_own_example_count() -> None:
    from privet.server.recording import RoundRecord
    from privet.server.rundir.privacy_report import privacy_report

    cfg = load_config(None, ["train.batch_size=64"])
    rec = RoundRecord(
        round=1,
        clients_trained=["client-0", "site-x"],
        epsilon_per_client={"client-0": 1.0, "site-x": 2.0},
        examples_per_client={"client-0": 405, "site-x": 320},
    )
    report = privacy_report(
        cfg,
        history=[RoundRecord(round=0), rec],
        client_names=["client-0"],
        examples_per_client={"client-0": 427},  # the coordinator's own view of the data
        client_level=None,
        stopped=None,
    )
    clients = report["sample_level"]["clients"]
    assert clients["client-0"]["examples"] == 405
    assert clients["client-0"]["sample_rate"] == pytest.approx(64 / 405)
    assert clients["site-x"]["examples"] == 320 and clients["site-x"]["final_epsilon"] == 2.0


def test_a_participant_takes_its_own_privacy_or_the_safe_defaults(tmp_path: Path) -> None:
    from privet.client import Participant
    from privet.common.config import PrivacyConfig

    rows = [{"text": f"review {i}", "label": i % 2} for i in range(10)]
    common: dict[str, Any] = {"server": "127.0.0.1:9092", "data": rows, "insecure": True}
    p = Participant(state_dir=tmp_path / "a", privacy=PrivacyConfig(target_epsilon=20), **common)
    assert p._settings.policy.privacy.budget == 20.0
    assert p._settings.policy.model == SiteModel()  # no remote code, the embedded model
    assert Participant(state_dir=tmp_path / "b", **common)._settings.policy == SitePolicy()
    with pytest.raises(ConfigError, match="not both"):
        Participant(
            state_dir=tmp_path / "c", privacy=PrivacyConfig(), policy=SitePolicy(), **common
        )


def test_a_pinned_model_with_other_files_is_refused_before_it_loads(
    tmp_path: Path, start_state: dict[str, torch.Tensor]
) -> None:
    from privet.client.policy import model_sha256

    actual = model_sha256("embedded:all-MiniLM-L6-v2")
    pinned = SitePolicy(model=SiteModel(sha256="0" * 64))
    reply = _ask(_site(tmp_path, pinned), start_state)
    assert reply.error.code == ERROR_POLICY
    assert f"holds files with sha256 {actual}, not this site's model.sha256" in reply.error.reason
    assert not (tmp_path / "state").exists()
    good = _ask(_site(tmp_path, SitePolicy(model=SiteModel(sha256=actual))), start_state)
    assert not good.has_error()


def test_a_coordinator_cannot_lower_the_readout_directions_noise() -> None:
    # The centered readout's one release (adapter.readout_center) is the site's: its privacy
    # section is rebuilt from the policy, so the coordinator's noise for it never reaches the
    # site, which releases at its own default (10, raised to its floor by client/privacy.py).
    cfg = load_config(None, [*RECIPE, "privacy.readout_center_noise=1.0"])
    site_cfg, floor = apply_policy(cfg, SitePolicy())
    assert site_cfg.privacy.readout_center_noise == 10.0 and floor == 0.5
