"""The job config, validated before Ray starts: every role reads it, so it sits low, beside protocol.py.

sections.py  model, engine, request defaults, input, output
sweep.py     the sweep section and the variants it makes
scoring.py   the scoring section: the reference column and the scorers, as data
job.py       the whole config (JobConfig), what a rerun must match (`identity`), and `load_config`
"""

from pipeline.config.job import JobConfig, in_ray_job, load_config
from pipeline.config.scoring import ScoringConfig
from pipeline.config.sections import (AnswerStoreConfig, ConfigError, EngineConfig, InputConfig, ModelConfig, OutputConfig,
                                      RequestDefaults, check_adapter_name)
from pipeline.config.sweep import SweepConfig, Variant

__all__ = ["AnswerStoreConfig", "ConfigError", "EngineConfig", "InputConfig", "JobConfig", "ModelConfig", "OutputConfig",
           "RequestDefaults", "ScoringConfig", "SweepConfig", "Variant", "check_adapter_name", "in_ray_job",
           "load_config"]
