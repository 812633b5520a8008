"""Export a Cortex checkpoint for the tools people already use.

    python3 export.py --checkpoint runs/mix --format hf --out cortex-hf [--dtype bfloat16]
    python3 export.py --checkpoint dpo.bin --format gguf --out cortex.gguf [--gguf-type f16|bf16|q8_0|f32]

--checkpoint takes what app.py takes (serving/checkpoint.py): a stage run dir, a `.bin` such as the published dpo.bin
(downloaded when missing), or a `.safetensors` file. `hf` writes a directory that transformers loads as
Qwen3MoeForCausalLM without remote code; `gguf` one file for llama.cpp / Ollama. The output appears only when complete:
it is written next to its final path under a temporary name and renamed at the end.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from exporters.qwen3moe import UnsupportedModelError, check_exportable
from serving.checkpoint import DTYPES, CheckpointError, load_for_serving, resolve_checkpoint
from trainer.errors import InputError
from trainer.tokenizer import TokenizerFilesError

FORMATS = ("hf", "gguf")
HF_DTYPES = ("float32", "bfloat16")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
BUILTIN_TOKENIZERS = ("cortex", "tiny")


class ExportError(InputError):
    """The output path or the tokenizer cannot be used; the message says what to do."""


def export(checkpoint: str | Path, fmt: str, out: str | Path, tokenizer: str | None = None, dtype: str = "float32",
           gguf_type: str = "f16", overwrite: bool = False) -> Path:
    """Export checkpoint to out (a directory for hf, a file for gguf); returns out."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hf" and dtype not in HF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(HF_DTYPES)}")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; remove it, choose another --out or pass --overwrite")
    staging = make_staging_dir(out)  # fails fast, before the model loads, when out cannot be written
    try:
        _, config, default_tokenizer = resolve_checkpoint(checkpoint)
        check_exportable(config)
        served = load_for_serving(checkpoint, check_tokenizer(tokenizer or default_tokenizer), device="cpu",
                                  dtype="float32")
        if fmt == "hf":
            from exporters.hf_dir import write_hf_dir

            write_hf_dir(served.model, served.tokenizer, staging, DTYPES[dtype], source=str(checkpoint))
            publish(staging, out)
        else:
            from exporters.gguf_file import write_gguf  # the gguf package is only needed here

            written = staging / out.name
            write_gguf(served.model, served.tokenizer, written, gguf_type, name=served.name)
            publish(written, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def make_staging_dir(out: Path) -> Path:
    """An empty directory next to out (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as err:
        raise ExportError(f"cannot write the export to {out}: {err.strerror or err} ({err.filename or out.parent}); "
                          f"choose an --out in a writable directory") from err


def check_tokenizer(name: str) -> str:
    """A tokenizer name load_for_serving accepts; a directory must exist and hold tokenizer files (nothing is fetched
    into an arbitrary path)."""
    if name in BUILTIN_TOKENIZERS:
        return name
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ExportError(f"tokenizer directory {path} does not exist; pass --tokenizer with the tokenizer the model "
                          f"was trained with: {', '.join(BUILTIN_TOKENIZERS)} or a directory holding its files")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise ExportError(f"tokenizer directory {path} holds neither tokenizer.json nor tokenizer.model; pass "
                          f"--tokenizer with the tokenizer the model was trained with")
    return str(path)


def publish(written: Path, out: Path) -> None:
    """Move the finished export to out, replacing what is there only once the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        written.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        written.rename(out)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Export a Cortex checkpoint: Hugging Face (Qwen3-MoE) or GGUF")
    parser.add_argument("--checkpoint", required=True,
                        help="a stage run dir, a .bin (e.g. the published dpo.bin) or a .safetensors weights file")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    parser.add_argument("--tokenizer", help="'cortex', 'tiny' or a tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=HF_DTYPES, default="float32", help="hf: weight dtype (default float32)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                        help="gguf: type of the large matrices (norms and routers stay f32; default f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is done)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, args.tokenizer, args.dtype, args.gguf_type, args.overwrite)
    except (CheckpointError, TokenizerFilesError, InputError, UnsupportedModelError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # e.g. the disk filled up while writing: the partial export is already removed
        sys.exit(f"error: writing {args.out} failed: {err}")
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
