"""Metrics of a run: one JSON line per optimizer step in runs/<stage>/metrics.jsonl, a human line in log.txt and on
the console, throughput and model FLOPs utilisation (MFU)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model import ModelConfig, count_parameters
from trainer.activation_checkpointing import is_recomputing

# Dense bf16 peak FLOP/s per device, for MFU. Set TrainConfig.peak_flops for anything else.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "A10": 125e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 x active weights (lm_head included) + attention scores.

    Attention: QK^T and AV are 2 x 2 x T x d per layer forward for a causal average of T/2 keys -> 6 x 2 x L x d x T / 2
    over forward and backward; we use the common 12 x L x d x T (as nanoGPT/PaLM) for comparability.
    """
    active_matmul = count_parameters(config).active + config.vocab_size * config.hidden_size  # the lm_head is a matmul per token
    return 6.0 * active_matmul + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


class RouterStats:
    """Per MoE layer, during training forwards: the share of top-k assignments each expert received and the mean
    entropy of the router distribution. Collected with forward hooks on the routers, so model/ knows nothing of it.

    The hooks only add to per-layer tensors on the model's device (no host sync in the forward); summary() reads them
    all in one transfer, once per logged step."""

    def __init__(self, model: torch.nn.Module, training_only: bool = True):
        """training_only=False also counts eval-mode forwards (eval.py's held-out pass)."""
        from model.moe import MoE

        self.training_only = training_only

        self.layers: list[tuple[str, int, int]] = []  # (name, num_experts, top_k)
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                index = len(self.layers)
                self.layers.append((name, module.num_experts, module.top_k))
                self.handles.append(module.gate.register_forward_hook(self._hook(index, module)))
        self.sums: list[torch.Tensor | None] = []  # per layer: [assignments per expert..., entropy sum], float32
        self.tokens: list[int] = []
        self.reset()

    def _hook(self, index: int, moe):
        def hook(router, inputs, scores):
            # eval and generation (unless training_only is off) and checkpointing's recompute do not count
            if (self.training_only and not moe.training) or is_recomputing():
                return
            with torch.no_grad():
                top = scores.topk(moe.top_k, dim=-1).indices.reshape(-1)
                entropy = -(scores * scores.clamp_min(1e-20).log()).sum()
                step = torch.cat([torch.bincount(top, minlength=moe.num_experts).float(), entropy.float().view(1)])
                self.sums[index] = step if self.sums[index] is None else self.sums[index] + step
                self.tokens[index] += scores.shape[0]  # a shape: known on the host
        return hook

    def reset(self) -> None:
        self.sums = [None for _ in self.layers]
        self.tokens = [0 for _ in self.layers]

    def summary(self, all_reduce_sum) -> dict:
        """{'router/<layer>/load': [share per expert], 'router/<layer>/entropy': nats} since the last reset; summed over
        ranks with all_reduce_sum (a function on a 1-d float tensor, returning it on the CPU). Collective: every rank
        calls it, also one whose layers saw no tokens. Resets the counters."""
        if not self.layers:
            return {}
        parts = [torch.zeros(e + 1) if sums is None else sums for (_, e, _), sums in zip(self.layers, self.sums)]
        device = next((p.device for p in parts if p.device.type != "cpu"), torch.device("cpu"))
        flat = torch.cat([p.to(device) for p in parts]).cpu().double()  # the one device-to-host read
        flat = all_reduce_sum(torch.cat([flat, torch.tensor(self.tokens, dtype=torch.float64)]))
        out, offset, tokens = {}, 0, flat[-len(self.layers):]
        for (name, num_experts, _), layer_tokens in zip(self.layers, tokens):
            counts, entropy = flat[offset:offset + num_experts], flat[offset + num_experts]
            offset += num_experts + 1
            if layer_tokens > 0:
                layer = name.replace("layers.", "").replace(".mlp", "")
                out[f"router/{layer}/load"] = [round(float(x), 4) for x in counts / counts.sum()]
                out[f"router/{layer}/entropy"] = round(float(entropy / layer_tokens), 4)
        loads = [max(v) for k, v in out.items() if k.endswith("/load")]
        if loads:  # one-number summaries for the console: the busiest expert's share, the mean router entropy
            out["expert_load_max"] = max(loads)
            out["router_entropy"] = round(sum(v for k, v in out.items() if k.endswith("/entropy")) / len(loads), 4)
        self.reset()
        return out


class MetricsLogger:
    def __init__(self, run_path: Path, is_main: bool, total_steps: int, initial_step: int = 0):
        self.is_main = is_main
        self.metrics_file = run_path / "metrics.jsonl"
        self.log_file = run_path / "log.txt"
        self.generations_file = run_path / "generations.jsonl"
        self._files = {}
        self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                        disable=True if not is_main else None,  # None: a bar on a terminal, plain log lines otherwise
                        desc=run_path.name, unit="step")

    def drop_records_after(self, step: int) -> None:
        """Rewrite metrics.jsonl and generations.jsonl without the records of steps after `step`: a resumed run trains
        those steps again, and the resumed checkpoint holds everything logged up to its step (the eval at that step
        included). A last line cut short by a kill goes too. Atomic; main process only, before anything is logged."""
        if not self.is_main:
            return
        for path in (self.metrics_file, self.generations_file):
            if path.exists():
                _drop_records_after(path, step)

    def _append(self, path: Path, line: str) -> None:
        if path not in self._files:
            self._files[path] = open(path, "a", encoding="utf-8", buffering=1)
        self._files[path].write(line + "\n")

    def log(self, kind: str, record: dict) -> None:
        """kind: 'train' | 'eval'. The record goes to metrics.jsonl as is and to log.txt as `k: v` pairs."""
        if not self.is_main:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **record}
        self._append(self.metrics_file, json.dumps(record, ensure_ascii=False))
        shown = ", ".join(f"{k}: {_fmt(v)}" for k, v in record.items()
                          if k not in ("kind", "time", "step", "epoch", "file", "batch") and "/" not in k
                          and not isinstance(v, (list, dict)))
        line = (f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {kind} step: {record.get('step')}, epoch: {record.get('epoch')}, "
                f"file: {record.get('file')}, batch: {record.get('batch')} -> {shown}")
        self._append(self.log_file, line)
        self.bar.write(line)

    def text(self, message: str) -> None:
        if self.is_main:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            self._append(self.log_file, line)
            self.bar.write(line)

    def generation(self, record: dict) -> None:
        if self.is_main:
            self._append(self.generations_file, json.dumps(record, ensure_ascii=False))
            self.bar.write(f"[gen step {record.get('step')}] {record.get('prompt')!r} -> {record.get('completion')!r}")

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        for f in self._files.values():
            f.close()
        self._files.clear()


def _drop_records_after(path: Path, step: int) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):  # the write a kill interrupted
                continue
            kept.append(line)  # not ours to judge: read_metrics names the line
            continue
        if not (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step):
            kept.append(line)
    new_text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)  # the next record starts a line
    if new_text == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new_text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(path: Path, kind: str = "train") -> list[dict]:
    """Records of one kind, one per step; a resumed run's repeated steps replace the earlier ones."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e}); was the file cut short by a crash? "
                                 f"Delete that line and retry") from e
            if record.get("kind") == kind and "step" in record:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
