"""Frozen, validated run configuration (foundations layer, docs/ARCHITECTURE.md): dataclass sections loaded from
YAML with dotted overrides. Every name users import lives here; the sections are defined in
:mod:`~rayblora.config.sections` (what a member trains) and :mod:`~rayblora.config.deploy` (where it runs and
is served), the loading in :mod:`~rayblora.config.loader`.

    cfg = load_config("jobs/configs/tiny.yaml", ["train.steps=5", "posterior.members=2"])
"""

from rayblora.config.deploy import ClusterConfig, OutputConfig, ServeConfig
from rayblora.config.loader import Config, apply_overrides, config_from_dict, dump_config, load_config
from rayblora.config.sections import (CHOICE_SCORINGS, MAX_OPTIONS, ROUND_PRECISIONS, AdapterConfig, BlobConfig,
                                      DataConfig, HybridConfig, LaplaceConfig, ModelConfig, PosteriorConfig,
                                      SamplingConfig, SwagConfig, TfbConfig, TrainConfig)
from rayblora.config.validation import ConfigError

__all__ = ["AdapterConfig", "BlobConfig", "CHOICE_SCORINGS", "ClusterConfig", "Config", "ConfigError", "DataConfig",
           "HybridConfig", "LaplaceConfig", "MAX_OPTIONS", "ModelConfig", "OutputConfig", "PosteriorConfig",
           "ROUND_PRECISIONS", "SamplingConfig", "ServeConfig", "SwagConfig", "TfbConfig", "TrainConfig",
           "apply_overrides", "config_from_dict", "dump_config", "load_config"]
