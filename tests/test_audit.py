"""The empirical audit: flags a mechanism without noise that claims DP, passes a correct one."""

import math

import pytest
from scipy.stats import binom

from privet.common.config import load_config
from privet.common.errors import ConfigError
from privet.simulations.audit import epsilon_lower_bound, run_audit

# A small audit: 5,000 canaries (1,000 guesses) can certify up to eps ~ 5.8, well above the claim.
CLAIM = ["privacy.target_epsilon=2", "federation.rounds=3"]


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")
@pytest.mark.parametrize("broken", [False, True])
def test_audit_flags_only_the_broken_mechanism(broken: bool) -> None:
    result = run_audit(load_config(None, CLAIM), canaries=5_000, broken=broken, seed=1)
    assert result.accounted_epsilon == pytest.approx(2.0, abs=0.02)
    assert result.guesses == 1_000
    if broken:
        assert result.flagged and "FLAGGED" in result.verdict
        assert result.correct == result.guesses  # no noise: every sampled member stands out
        assert result.empirical_epsilon_lower_bound > 5
    else:
        assert not result.flagged
        assert result.empirical_epsilon_lower_bound < result.accounted_epsilon


def test_lower_bound_is_the_binomial_tail_inversion() -> None:
    eps = epsilon_lower_bound(guesses=1000, correct=1000, beta=0.05)
    # all right: p^r = beta, so eps = logit(beta^(1/r))
    p = 0.05 ** (1 / 1000)
    assert eps == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    eps = epsilon_lower_bound(guesses=1000, correct=700, beta=0.05)
    p = 1 / (1 + math.exp(-eps))
    assert binom.sf(699, 1000, p) == pytest.approx(0.05, rel=1e-6)
    assert epsilon_lower_bound(guesses=1000, correct=510, beta=0.05) == 0.0  # chance level


def test_audit_needs_a_claim() -> None:
    with pytest.raises(ConfigError, match="no epsilon claim"):
        run_audit(load_config(None, ["privacy.enabled=false"]))
