"""Studies that run many small federations and summarise them as a table and a plot."""

from privet.simulations.studies.privacy_utility import (
    privacy_utility_cmd,
    run_privacy_utility_study,
)
from privet.simulations.studies.robustness import run_robustness_study, study_app

study_app.command("privacy-utility")(privacy_utility_cmd)

__all__ = ["run_privacy_utility_study", "run_robustness_study", "study_app"]
