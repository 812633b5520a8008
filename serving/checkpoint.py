"""What the server serves: a model checkpoint, its config and its tokenizer.

--checkpoint accepts
  * a stage run dir (runs/<stage>/ with model.safetensors + model_config.json; the tokenizer named in its stage.json),
  * a weights file (.bin or .safetensors): its config is model_config.json next to it, else the published Cortex 2.5
    serving config (cortex_2_5_config(long_context=True)),
  * a missing `dpo.bin` (the default ./dpo.bin): the published Cortex 2.5.1 DPO checkpoint is downloaded from ModelScope.
--tokenizer accepts 'cortex' (the Cortex 2.5 tokenizer, TOKEN_DIR or ./tokens), 'tiny' (our BPE of sample_data/) or a
directory with tokenizer files.
"""

import ctypes
import ctypes.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model import (CortexModel, ModelConfig, WeightsMismatchError, check_state_dict, cortex_2_5_config,
                   load_state_dict_file)
from serving.quantize import WEIGHT_FORMATS, load_kernel, stored_form
from trainer.backend import pick_device as default_device
from trainer.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

MODELSCOPE_REPO = "qibin0506/Cortex-2.5.1"
PUBLISHED_FILE = "dpo.bin"
RUN_WEIGHTS, RUN_CONFIG, RUN_SUMMARY = "model.safetensors", "model_config.json", "stage.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("none", *WEIGHT_FORMATS)  # --quantize: the weights' storage format (serving/quantize.py)

HOW_TO_GET_ONE = (
    "To serve a model, either\n"
    f"  * download {PUBLISHED_FILE} by hand from https://modelscope.cn/models/{MODELSCOPE_REPO}/files and put it at "
    f"./{PUBLISHED_FILE} (or pass --checkpoint PATH),\n"
    "  * or train one: CORTEX_PRESET=tiny python3 train_pretrain_stage0.py (then stage1, cot, mix) and serve it with "
    "python3 app.py --checkpoint runs/mix"
)


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or does not match its config or tokenizer; the message says what to do."""


@dataclass
class Served:
    model: CortexModel
    tokenizer: Tokenizer
    name: str  # shown by /v1/models and the page


def resolve_checkpoint(path: str | Path) -> tuple[Path, ModelConfig, str]:
    """(weights file, model config, default tokenizer name) for a --checkpoint argument; downloads a missing dpo.bin."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights, config_file = path / RUN_WEIGHTS, path / RUN_CONFIG
        for needed in (weights, config_file):
            if not needed.is_file():
                raise CheckpointError(f"{path} is a directory but has no {needed.name}: a stage run dir holds "
                                      f"{RUN_WEIGHTS} and {RUN_CONFIG} once its stage has completed")
        return weights, _read_config(config_file), _run_tokenizer(path / RUN_SUMMARY)
    if not path.exists():
        if path.name != PUBLISHED_FILE:
            raise CheckpointError(f"checkpoint {path} not found. {HOW_TO_GET_ONE}")
        download_published_checkpoint(path)
    config_file = path.with_name(RUN_CONFIG)
    config = _read_config(config_file) if config_file.is_file() else cortex_2_5_config(long_context=True)
    return path, config, "cortex"


def download_published_checkpoint(dest: Path) -> Path:
    """The Cortex 2.5.1 DPO weights from ModelScope (MODELSCOPE_ENDPOINT selects another hub) to dest."""
    import modelscope  # a 3 s import, only needed here

    log.info("%s not found: downloading %s from ModelScope %s", dest, PUBLISHED_FILE, MODELSCOPE_REPO)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        modelscope.snapshot_download(MODELSCOPE_REPO, allow_file_pattern=[PUBLISHED_FILE], local_dir=str(dest.parent))
    except OSError as err:  # modelscope's NetworkError is a ConnectionError; HTTP errors are requests' IOError
        raise CheckpointError(f"{dest} does not exist and downloading {PUBLISHED_FILE} from ModelScope "
                              f"({MODELSCOPE_REPO}) failed: {_first_line(err)}\n{HOW_TO_GET_ONE}") from err
    downloaded = dest.parent / PUBLISHED_FILE
    if not downloaded.is_file():
        raise CheckpointError(f"ModelScope {MODELSCOPE_REPO} returned no {PUBLISHED_FILE}.\n{HOW_TO_GET_ONE}")
    if downloaded != dest:
        downloaded.replace(dest)
    return dest


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _read_config(config_file: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:  # unreadable, bad JSON, unknown or invalid fields
        raise CheckpointError(f"{config_file} is not a valid model config ({_first_line(err)}); it must be the JSON of "
                              f"a ModelConfig as written at the end of a training stage") from err


def _run_tokenizer(summary_file: Path) -> str:
    """The tokenizer a stage trained with (its stage.json train_config.tokenizer), 'cortex' when unrecorded."""
    if not summary_file.is_file():
        return "cortex"
    try:
        return json.loads(summary_file.read_text(encoding="utf-8"))["train_config"]["tokenizer"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{summary_file} is unreadable ({_first_line(err)}); pass --tokenizer explicitly") from err


def pick_device(device: str | None) -> torch.device:
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise CheckpointError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps): {err}") from err
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"--device {device}: this torch build or machine has no CUDA device; use --device cpu")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise CheckpointError(f"--device {device}: MPS is not available here; use --device cpu")
        return chosen
    return default_device()  # cuda, then mps, then cpu: as the trainer picks


def cpu_features() -> tuple[str, bool]:
    """(torch's CPU kernel level: DEFAULT, AVX2, AVX512, ...; whether oneDNN has native bf16: AVX512-BF16 or AMX)."""
    return torch.backends.cpu.get_cpu_capability(), torch.ops.mkldnn._is_mkldnn_bf16_supported()


def default_format(device: torch.device, capability: str) -> tuple[str, str]:
    """(--dtype, --quantize) when neither is given. GPUs that support bf16: bf16. x86 CPUs (AVX2, AVX512): fp32 compute
    with the weights stored in bf16, half the weight bytes: one decoding row multiplies them in serving/cpu_gemv.c.
    On a Zen 4 with native bf16 that decoded 3.5x fp32 at batch 1, where bf16 compute decoded 1.65x (torch's bf16
    GEMV) with lower held-out agreement with fp32 (0.91 against 0.95), and prefills as fast as bf16 compute (its
    prompts multiply in bf16 there: prefill_dtype); on an AVX2 CPU it decoded 2.1x fp32 (bf16 compute 1.7x, which,
    emulated there, prefilled a 512-token prompt in 4.9x fp32's time). Figures: README, "The full model on a CPU".
    Other CPUs (unmeasured) and MPS: fp32.
    int8 stays opt-in: its quality was only measured on random weights."""
    if device.type == "cuda":
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float32"), "none"
    if device.type == "cpu" and capability.startswith(("AVX2", "AVX512")):
        return "float32", "bf16"
    return "float32", "none"


def pick_format(dtype: str | None, quantize: str | None, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and weight format for --dtype / --quantize; what is not given follows default_format, except
    that a --dtype given alone keeps the weights in that dtype."""
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise CheckpointError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE)} (the storage of the linear "
                              f"layers, experts and head: bf16, or int8 with per-channel scales)")
    default_dtype, default_quantize = default_format(device, torch.backends.cpu.get_cpu_capability())
    return DTYPES[dtype or default_dtype], quantize or (default_quantize if dtype is None else "none")


def prefill_dtype(device: torch.device, compute_dtype: torch.dtype, native_bf16: bool) -> torch.dtype | None:
    """What a prompt's products with stored weights multiply in (serving/quantize.py; None: compute_dtype). bf16 on
    CPUs whose bf16 matmuls are native (AVX512-BF16, AMX) when computing in fp32: the default format prefilled 512
    tokens of the full model in half fp32's time on a Zen 4 (README, "The full model on a CPU"), while decoding keeps
    fp32 activations. Elsewhere bf16 GEMMs are emulated (5-9x fp32's time on AVX2)."""
    return torch.bfloat16 if device.type == "cpu" and compute_dtype == torch.float32 and native_bf16 else None


def return_freed_memory():
    """Hands the heap's free pages back to the OS (glibc's malloc_trim), where there is glibc. The fp32 weights freed
    after a conversion or cast otherwise stay resident: serving the full model with int8 weights held 2714 MB, 1057 MB
    after the trim (bf16 weights 1950 -> 1592 MB, fp32 2890 -> 2673 MB)."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # not on macOS or musl: nothing to do there
        libc.malloc_trim(0)


def _parts(module: nn.Module, prefix: str = ""):
    """(parent, attribute name, state-dict prefix) of each child of module, and of each entry of a ModuleList in it
    (the decoder layers) in its place."""
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            yield from _parts(child, f"{prefix}{name}.")
        else:
            yield module, name, f"{prefix}{name}."


def _take(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of state_dict under prefix, removed from it, with the prefix stripped."""
    return {key[len(prefix):]: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}


def load_for_serving(checkpoint: str | Path, tokenizer: str | None = None, device: str | None = None,
                     dtype: str | None = None, quantize: str | None = "none") -> Served:
    """The model on its device in the chosen format (pick_format), its tokenizer and name. Unquantized unless asked
    (export and eval want the weights as they are); quantize=None: the machine's default, as app.py serves."""
    weights, config, default_tokenizer = resolve_checkpoint(checkpoint)
    tok = get_tokenizer(tokenizer or default_tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer ({tok}) has {tok.vocab_size} ids but the model {weights} only "
                              f"{config.vocab_size}: they do not belong together; pass the tokenizer the model was "
                              f"trained with (--tokenizer cortex, tiny or a directory)")
    with torch.device("meta"):  # no storage yet, no random init of weights that are overwritten anyway
        model = CortexModel(config)
    try:
        state_dict = load_state_dict_file(weights)  # memory-mapped: file pages until copied
        check_state_dict(model, state_dict, str(weights))
    except (WeightsMismatchError, ValueError) as err:
        config_note = "" if weights.with_name(RUN_CONFIG).is_file() or weights.name == RUN_WEIGHTS else (
            f"\nWithout {RUN_CONFIG} next to it, a weights file is read as the published Cortex 2.5 model; for other "
            f"sizes put the model_config.json of its training stage next to it or pass the stage run dir")
        raise CheckpointError(f"cannot load {weights}: {err}{config_note}") from err
    resolved_device = pick_device(device)
    compute_dtype, quantization = pick_format(dtype, quantize, resolved_device)
    prefill = prefill_dtype(resolved_device, compute_dtype, cpu_features()[1])
    if quantization != "none":
        load_kernel(quantization)
    # One part at a time (a decoder layer, the embedding, the head): its fp32 weights copied from the file, converted
    # (from fp32, before the cast) and cast before the next part's, so the whole model is never held in fp32: loading
    # the full model for the default format peaked at 1.8 GB of process memory (1.5 served) instead of 2.8 (README)
    for parent, name, prefix in _parts(model):
        part = getattr(parent, name).to_empty(device="cpu")  # non-persistent buffers (RoPE) are recomputed
        part.load_state_dict(_take(state_dict, prefix), strict=True)
        if quantization != "none":
            part = stored_form(part, quantization, prefill)
        setattr(parent, name, part.to(device=resolved_device, dtype=compute_dtype))
        return_freed_memory()  # the part's fp32 weights (freed pages otherwise stay with the process)
    model.eval()
    log.info("serving %s in %s with %s weights%s (CPU: %s, native bf16 %s)", weights, compute_dtype,
             quantization if quantization != "none" else "unconverted",
             f", prompts multiplied in {prefill}" if quantization != "none" and prefill else "", *cpu_features())
    name = weights.parent.name if weights.name == RUN_WEIGHTS else weights.stem
    return Served(model, tok, f"cortex-{name}")
