"""Ray Tune sweeps: :mod:`.train` (member hyper-parameters, one Ray Train run per trial, ASHA), :mod:`.prior`
(the Laplace prior precision post hoc), :mod:`.space` (search-space YAML) and :mod:`.results` (tables, trial
states, resumable experiments)."""

from rayblora.workflows.sweeps.prior import sweep_prior
from rayblora.workflows.sweeps.results import SweepInterrupted, SweepOutcome
from rayblora.workflows.sweeps.train import sweep_train, trial_config, with_report_cadence

__all__ = ["SweepInterrupted", "SweepOutcome", "sweep_prior", "sweep_train", "trial_config", "with_report_cadence"]
