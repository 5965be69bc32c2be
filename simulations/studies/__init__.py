"""Studies that run many small federations and summarise them as a table and a plot."""

from privet.simulations.studies.robustness import run_robustness_study, study_app

__all__ = ["run_robustness_study", "study_app"]
