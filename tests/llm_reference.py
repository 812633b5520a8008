"""Our ModelConfig as a config of the reference implementation llm_model 0.6.0 (PyPI project-llm-model), for the
parity tests and bench/bench_model.py. Only importable where llm_model is installed."""
import dataclasses

import llm_model

from model import ModelConfig


def _same_fields(reference_cls, ours):
    """An instance of the reference's config dataclass from the fields of ours with the same names (ours are named as
    the reference's; ours has a few more, which it lacks)."""
    return reference_cls(**{f.name: getattr(ours, f.name) for f in dataclasses.fields(reference_cls)})


def reference_config(config: ModelConfig) -> "llm_model.ModelConfig":
    return dataclasses.replace(
        _same_fields(llm_model.ModelConfig, config),
        rope_config=_same_fields(llm_model.RoPEConfig, config.rope_config),
        moe_config=_same_fields(llm_model.MoEConfig, config.moe_config) if config.moe_config else None,
    )
