"""Stage configurations of Cortex 2.5, as data. Every train_*.py script is `run(stage_config("<stage>"))`.

Two presets, chosen with the environment variable CORTEX_PRESET:
  full (default)  the Cortex 2.5 recipe (training.md section 5): the 0.6B-A0.2B MoE, the ModelScope data set
                  qibin0506/Cortex-2.5-train-data, DeepSpeed ZeRO-3 bf16 when launched with smart_train on GPUs.
  tiny            the same structure at toy size with the bundled sample_data/ and its own BPE tokenizer: every stage
                  runs on a laptop CPU in about a minute.
CORTEX_RUN_DIR sets where runs/<stage>/ go (default ./runs), CORTEX_DATA_DIR where the full preset's data files are
downloaded to (default ./data), CORTEX_DATASET_ID the ModelScope dataset they come from (flags --run-dir, --data-dir,
--dataset-id and --delete-consumed-files override them for one run). The learning rates of the full preset are the
effective ones of the original 4-GPU run (global batch = micro batch x 4 GPUs x 3 accumulation steps, GRPO 4 x 1
prompt), recorded as recipe_global_batch: on another number of GPUs the run keeps that global batch through
accumulation steps where it can, else scales the learning rates linearly, and says so at start
(trainer.config.fit_global_batch).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from file_dataset import MODELSCOPE_DATASET, STAGE_FILES, FileDataset
from model import cortex_2_5_config, tiny_config
from trainer.cli import run
from trainer.config import STAGE_ORDER, global_batch, DataConfig, DeepSpeedConfig, DPOConfig, GRPOConfig, OptimConfig, TrainConfig
from trainer.tokenizer import TINY_VOCAB_SIZE

REPO_ROOT = Path(__file__).resolve().parent
SAMPLE_DATA = REPO_ROOT / "sample_data"

# --- the full Cortex 2.5 recipe ------------------------------------------------------------------------------------
RECIPE_WORLD_SIZE = 4  # the original run's GPUs: its learning rates are for 4 x micro batch x accumulation steps
PRETRAIN_PROMPTS = ["床前明月光，", "今天天气很好，", "人工智能的发展", "中国的首都是"]
CHAT_PROMPTS = ["请问一加一等于几？", "用一句话介绍你自己。", "小明有5个苹果，吃了2个，还剩几个？", "写一首关于秋天的短诗。"]
GRPO_PROMPTS = ["小明有15个苹果，他给了小红6个，又买了8个。小明现在有多少个苹果？", "一本书有120页，小华每天读15页，几天能读完？",
                "一支笔3元，一个本子5元。买4支笔和2个本子一共要多少元？", "一辆汽车每小时行驶60千米，3.5小时一共行驶多少千米？"]
MIX_PROMPTS = ["请问一加一等于几？ /think", "用一句话介绍你自己。 /no think", "小明有5个苹果，吃了2个，还剩几个？ /think",
               "写一首关于秋天的短诗。 /no think"]


def _data(stage: str, **kwargs) -> DataConfig:
    return DataConfig(files=STAGE_FILES[stage], data_dir=os.environ.get("CORTEX_DATA_DIR", "./data"),
                      dataset_id=os.environ.get("CORTEX_DATASET_ID", MODELSCOPE_DATASET), **kwargs)


def _full_settings(stage: str) -> TrainConfig:
    long_context = stage != "pretrain_stage0"
    common = dict(stage=stage, model=cortex_2_5_config(long_context=long_context), grad_accum_steps=3,
                  deepspeed=DeepSpeedConfig(zero_stage=3), save_every_steps=100, eval_every_steps=100,
                  run_root=os.environ.get("CORTEX_RUN_DIR", "./runs"), tokenizer="cortex")
    if stage == "pretrain_stage0":
        return TrainConfig(task="pretrain", epochs=1, micro_batch_size=20,
                           data=_data(stage, max_seq_len=512,
                                           eval_fraction=0.001),
                           optim=OptimConfig(initial_lr=4e-4, max_lr=2e-3, min_lr=4e-5), eval_prompts=PRETRAIN_PROMPTS,
                           **common)
    if stage == "pretrain_stage1":
        return TrainConfig(task="pretrain", epochs=1, micro_batch_size=4,
                           data=_data(stage, max_seq_len=2048,
                                           eval_fraction=0.001),
                           optim=OptimConfig(initial_lr=4e-4, max_lr=1.2e-3, min_lr=4e-5), eval_prompts=PRETRAIN_PROMPTS,
                           **common)
    if stage == "cot":
        return TrainConfig(task="sft", epochs=2, micro_batch_size=4,
                           data=_data(stage, max_seq_len=2048),
                           optim=OptimConfig(initial_lr=4e-5, max_lr=2e-4, min_lr=4e-6), eval_prompts=CHAT_PROMPTS,
                           eval_max_new_tokens=256, **common)
    if stage == "mix":
        return TrainConfig(task="sft", epochs=2, micro_batch_size=6,
                           data=_data(stage, max_seq_len=2048),
                           optim=OptimConfig(initial_lr=4e-5, max_lr=2e-4, min_lr=4e-6), eval_prompts=MIX_PROMPTS,
                           eval_max_new_tokens=256, **common)
    # RL and preference stages: dropout off (the rollout's old log-probs and the reference must score exactly what the
    # training forward computes); their lr had no world-size multiplier in the original.
    rl_common = {**common, "model": replace(common["model"], attention_dropout=0.0)}
    if stage == "grpo":
        # One prompt x 8 completions per GPU and update, 4 updates per rollout; ZeRO-3 offloads parameters and
        # optimizer to the CPU as in the original (generation gathers the full model).
        rl_common |= {"grad_accum_steps": 1, "save_every_steps": 200, "eval_every_steps": 200,
                      "deepspeed": DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True)}
        return TrainConfig(task="grpo", epochs=1, micro_batch_size=1,
                           data=_data(stage, max_seq_len=2048),
                           optim=OptimConfig(initial_lr=1e-6, max_lr=5e-6, min_lr=1e-7),
                           grpo=GRPOConfig(group_size=8, grpo_steps=4, max_new_tokens=1024, temperature=1.0, top_p=0.95,
                                           importance_sampling_level="seq", clip_eps_low=3e-4, clip_eps_high=4e-4,
                                           beta=0.0, loss_type="grpo", reward="cortex"),
                           eval_prompts=GRPO_PROMPTS, eval_max_new_tokens=256, **rl_common)
    if stage == "dpo":
        return TrainConfig(task="dpo", epochs=2, micro_batch_size=2,
                           data=_data(stage, max_seq_len=2048),
                           optim=OptimConfig(initial_lr=1e-6, max_lr=5e-6, min_lr=1e-7),
                           dpo=DPOConfig(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", nll_coef=0.2),
                           eval_prompts=MIX_PROMPTS, eval_max_new_tokens=256, **rl_common)
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")


def _full(stage: str) -> TrainConfig:
    config = _full_settings(stage)
    return replace(config, recipe_global_batch=global_batch(config, RECIPE_WORLD_SIZE))


# --- the tiny preset ------------------------------------------------------------------------------------------------
TINY_PRETRAIN_PROMPTS = ["3 + 4 =", "The cat", "今天是星期"]
TINY_CHAT_PROMPTS = ["What is 12 + 7?", "小明有5个苹果，吃了2个，还剩几个？"]


def _tiny(stage: str) -> TrainConfig:
    full = _full(stage)
    long_context = stage != "pretrain_stage0"
    files = {"pretrain_stage0": "pretrain.jsonl", "pretrain_stage1": "pretrain.jsonl", "cot": "cot.jsonl",
             "mix": "mix.jsonl", "grpo": "grpo.jsonl", "dpo": "dpo.jsonl"}
    seq_len = {"pretrain_stage0": 128, "pretrain_stage1": 256}.get(stage, 256)
    lr = {"pretrain_stage0": (1e-3, 3e-3), "pretrain_stage1": (1e-3, 2e-3)}.get(stage, (5e-4, 1e-3))
    # COT trains six epochs: at three the tiny model answered about half as many table questions right, too few for
    # GSPO to reinforce. Mix too: at five, a second no-think turn still opened a new </think><answer> inside its answer
    # (63 of 64 well-formed after DPO; README, learning checks).
    epochs = {"pretrain_stage0": 4, "pretrain_stage1": 1, "cot": 6, "mix": 6}.get(stage, 3)
    config = replace(
        full, model=tiny_config(TINY_VOCAB_SIZE, long_context=long_context), tokenizer="tiny",
        data=DataConfig(jsonl_files=[str(SAMPLE_DATA / files[stage])], max_seq_len=seq_len, max_eval_batches=8),
        optim=OptimConfig(initial_lr=lr[0], max_lr=lr[1], min_lr=lr[0] / 10, weight_decay=0.01),
        micro_batch_size=8, grad_accum_steps=2, epochs=epochs, deepspeed=DeepSpeedConfig(zero_stage=2),
        recipe_global_batch=None,  # tuned as it runs: no adjustment for the world size
        precision="fp32", save_every_steps=50, eval_every_steps=50, eval_max_new_tokens=24,
        eval_prompts=TINY_PRETRAIN_PROMPTS if full.task == "pretrain" else TINY_CHAT_PROMPTS)
    if stage == "grpo":
        # One epoch: 83 rollouts of 16 prompts x 4 completions, one update each (a second one on the same rollout
        # changed no held-out figure and cost 40% of the pipeline's time); the eval scores greedy completions of 160
        # of the 161 held-out prompts. The prompts are questions on the tables up to 10, which the COT model answers
        # about one in seven times: enough right answers for GSPO to reinforce (README, learning checks). The budget
        # of 64 new tokens holds every COT reply, so the reward pays for the answer, not for finishing early. At
        # temperature 0.7 GSPO gained more (five seeds: +2 to +10 of 161, against -3 to +8 at 1.0), but the pipeline
        # run with it missed the no-think format target after DPO (62 of 64); README, learning checks.
        return replace(config, micro_batch_size=16, grad_accum_steps=1, epochs=1,
                       data=replace(config.data, max_eval_batches=10),
                       optim=OptimConfig(initial_lr=1e-5, max_lr=1e-4, min_lr=1e-5, weight_decay=0.0),
                       grpo=replace(full.grpo, group_size=4, max_new_tokens=64, grpo_steps=1), eval_every_steps=100)
    if stage == "mix":
        # Twice the SFT lr: at three epochs at 1e-3 the tiny model closed 11% of its held-out thoughts with </answer>
        # (its thought drifts into a memorised answer), most of them in second turns (README).
        return replace(config, optim=replace(config.optim, initial_lr=1e-3, max_lr=2e-3, min_lr=1e-4))
    if stage == "dpo":
        # One epoch of 8 pairs per step; the eval covers 128 of the 131 held-out pairs. The pairs are all no-think: a
        # gentle lr and a strong NLL term on the chosen replies keep the think format (at lr 1e-3 and NLL 0.2, 2 epochs
        # left 5% of think replies well-formed) and </s> after </answer> (the cut-off rejected replies push on it), at
        # some cost in preference accuracy (README, learning checks).
        return replace(config, micro_batch_size=8, grad_accum_steps=1, epochs=1,
                       data=replace(config.data, max_eval_batches=16),
                       optim=OptimConfig(initial_lr=1e-5, max_lr=1e-4, min_lr=1e-5, weight_decay=0.0),
                       dpo=replace(full.dpo, nll_coef=4.0))
    return config


PRESETS = {"full": _full, "tiny": _tiny}


def stage_config(stage: str, preset: str | None = None) -> TrainConfig:
    preset = preset or os.environ.get("CORTEX_PRESET", "full")
    if preset not in PRESETS:
        raise ValueError(f"CORTEX_PRESET={preset!r} is not a preset; use one of {', '.join(PRESETS)}")
    return PRESETS[preset](stage)


def data_files(config: TrainConfig) -> list[Path] | FileDataset:
    """The stage's data: bundled JSONL files, or token files fetched from ModelScope into data_dir as training reaches
    them (the original's .pkl files converted once into memory-mapped .npy files)."""
    if config.data.jsonl_files:
        return [Path(p) for p in config.data.jsonl_files]
    return FileDataset(config.data.files, config.data.data_dir, config.data.dataset_id,
                       delete_consumed=config.data.delete_consumed_files, task=config.task,
                       vocab_size=config.model.vocab_size)


def train(stage: str) -> Path:
    """What every train_*.py does: the stage's config, its data, the training loop (flags may override a few settings)."""
    return run(stage_config(stage), data_files)
