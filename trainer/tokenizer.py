"""
Tokenizers for Cortex and the chat template they share.

Two kinds, one interface (`Tokenizer`):
- the Cortex 2.5 tokenizer: a sentencepiece model (46957 ids incl. added tokens, </s>=2) loaded with
  transformers' LlamaTokenizerFast from TOKEN_DIR (default ./tokens/). Missing files are downloaded from the
  public Cortex repository at the 2.5 release and checked against their sha256 before anything loads them.
- our own byte-level BPE tokenizers (`train_bpe_tokenizer`, `tiny_tokenizer`), trained with the `tokenizers`
  library on any text, with the same special tokens and template, so nothing has to be downloaded.

Chat template (training.md section 2), one turn per message, `</s>` ends every turn:
    <system> </s><user>Q /think</s><assistant><think>T</think><answer>A</answer></s>

Command line:
    python3 -m trainer.tokenizer train --files a.txt b.jsonl --out DIR --vocab-size N
    python3 -m trainer.tokenizer fetch [--dir tokens]
"""

import argparse
import functools
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from trainer.errors import InputError

SPECIAL_TOKENS = ["</s>", "<pad>", "<unk>", "<user>", "<assistant>", "<think>", "</think>", "<system>", "<answer>", "</answer>"]
THINK_SUFFIX, NO_THINK_SUFFIX = " /think", " /no think"
ROLE_TAGS = {"system": "<system>", "user": "<user>", "assistant": "<assistant>"}

DEFAULT_TOKEN_DIR = "./tokens"

# The Cortex 2.5 release: the four files under tokens/ at this commit, and their sha256.
CORTEX_REPO = "qibin0506/Cortex"
CORTEX_COMMIT = "9995af671194307b18c26e31d90a09dab92cc74e"
CORTEX_FILE_SHA256 = {
    "tokenizer.model": "07db6346399b90a9ba4a8bc6c4db913976a236369264cc187dcdfd41f24a792d",
    "tokenizer_config.json": "5ed7e9e237220b127ea26544f501c438989fecf3fbde8bd522e8bb53051b9754",
    "special_tokens_map.json": "ca5b8564400d9fcb679ad90b24b185514b2bb39abf431534cc79779d68d1d558",
    "added_tokens.json": "96953c26ab2bc225e3ddcc0692418845256855f99ab1cf199ef6eaa93ac0ab7e",
}
# Tried in order. raw.githubusercontent serves a git LFS pointer for LFS-tracked files; media.githubusercontent the content.
CORTEX_URL_TEMPLATES = (
    "https://raw.githubusercontent.com/{repo}/{commit}/tokens/{file}",
    "https://media.githubusercontent.com/media/{repo}/{commit}/tokens/{file}",
)
CORTEX_FILES_PAGE = f"https://github.com/{CORTEX_REPO}/tree/{CORTEX_COMMIT}/tokens"
CORTEX_VOCAB_SIZE = 46957
CORTEX_EOS_ID = 2

# Own BPE tokenizers
JSONL_TEXT_FIELDS = ("text", "content", "think")  # at any depth, so messages/prompt/chosen/rejected lists count too
SAMPLE_DATA_DIR = Path(__file__).resolve().parents[1] / "sample_data"
TINY_VOCAB_SIZE = 2048
TINY_RECIPE_VERSION = 1  # bump when the BPE recipe changes, so cached tiny tokenizers are rebuilt


class TokenizerFilesError(InputError, RuntimeError):
    """Tokenizer files are missing, corrupted or could not be downloaded. The message says which and how to fix it."""


# -----------------------------------------------------------------------------
# The tokenizer and its chat template


class Tokenizer:
    """A transformers fast tokenizer (Cortex sentencepiece or our own BPE) plus the Cortex chat template."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast, token_dir: Path, kind: str):
        self.hf = hf_tokenizer
        self.token_dir = token_dir
        self.kind = kind  # "cortex" (the four sentencepiece files) or "bpe" (our own tokenizer.json)
        self.special_ids = ids = dict(zip(SPECIAL_TOKENS, hf_tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
        absent = [t for t, i in ids.items() if i is None or (i == hf_tokenizer.unk_token_id and t != "<unk>")]
        if absent:
            raise TokenizerFilesError(f"the tokenizer in {token_dir} lacks the special tokens {absent}; "
                                      f"it is not a Cortex tokenizer (train one with python3 -m trainer.tokenizer train)")
        self.eos_id, self.pad_id, self.unk_id = ids["</s>"], ids["<pad>"], ids["<unk>"]
        self.user_id, self.assistant_id, self.system_id = ids["<user>"], ids["<assistant>"], ids["<system>"]
        self.think_id, self.think_end_id = ids["<think>"], ids["</think>"]
        self.answer_id, self.answer_end_id = ids["<answer>"], ids["</answer>"]
        self.vocab_size = len(hf_tokenizer)

    def __repr__(self):
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, token_dir='{self.token_dir}')"

    def encode(self, text: str) -> list[int]:
        """Ids of text; special tokens written in it ("</s>", "<think>") become their ids, as the training data expects.
        Text from users goes through encode_text instead."""
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def control_ids(self) -> frozenset[int]:
        """Ids that only the template (or the model) may produce: the special tokens, never text."""
        added = {i for i, token in self.hf.added_tokens_decoder.items() if token.special}
        return frozenset(added | set(self.hf.all_special_ids) | set(self.special_ids.values()))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token covers more characters than this, so text of n characters takes at least n / max_token_chars
        tokens (lets a too-long message be refused without tokenising it)."""
        return max(map(len, self.hf.get_vocab()))

    @functools.cached_property
    def _text_encoder(self) -> tokenizers.Tokenizer:
        # a private copy that never matches special tokens in text (transformers' split_special_tokens flips the
        # shared tokenizer's flag on every call, which threads serving requests at once would race on)
        encoder = tokenizers.Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
        encoder.encode_special_tokens = True
        return encoder

    def encode_text(self, text: str) -> list[int]:
        """Ids of text as text: "</s>" or "<user>" in it are spelled out, never control ids, so text in a message cannot
        forge turns of the template. Ordinary text gets the same ids as encode()."""
        ids = self._text_encoder.encode(text, add_special_tokens=False).ids
        if self.control_ids.isdisjoint(ids):
            return ids
        # sentencepiece's converted model scores "</s>" and "<s>" like ordinary pieces: spell those out
        return [i for token_id in ids for i in (self._spelled_out(token_id) if token_id in self.control_ids else [token_id])]

    def _spelled_out(self, token_id: int) -> list[int]:
        ids = []
        for char in self.hf.convert_ids_to_tokens(token_id):
            char_id = self._text_encoder.token_to_id(char)
            pieces = [char_id] if char_id is not None and char_id not in self.control_ids else [
                self._text_encoder.token_to_id(f"<0x{b:02X}>") for b in char.encode("utf-8")]  # byte fallback
            if None in pieces:
                raise ValueError(f"the tokenizer in {self.token_dir} cannot spell out {char!r} as text")
            ids += pieces
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True,
                            add_answer_tag_for_assistant: bool = True) -> list[int] | str:
        """<role>[<think>T</think>]C</s> per message, C wrapped in <answer></answer> for the assistant. No generation
        prompt. Ids (tokenize=True): the tags are control ids, the message text is encoded as text (encode_text); the
        string form encoded with encode() matches special tokens in the text too (what the training data does)."""
        parts = self._template_parts(messages, add_answer_tag_for_assistant)
        return self._encode_parts(parts) if tokenize else "".join(text for _, text in parts)

    def _template_parts(self, messages: list[dict], add_answer_tag_for_assistant: bool) -> list[tuple[bool, str]]:
        """The template as (is a tag, text) pieces."""
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLE_TAGS:
                raise ValueError(f"message {i}: role must be one of {list(ROLE_TAGS)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}): 'content' must be a string, got {type(content).__name__}")
            parts.append((True, ROLE_TAGS[role]))
            if "think" in message:
                if not isinstance(message["think"], str):
                    raise ValueError(f"message {i} ({role}): 'think' must be a string, got {type(message['think']).__name__}")
                parts += [(True, "<think>"), (False, message["think"]), (True, "</think>")]
            if add_answer_tag_for_assistant and role == "assistant":
                parts += [(True, "<answer>"), (False, content), (True, "</answer>")]
            else:
                parts.append((False, content))
            parts.append((True, "</s>"))
        return parts

    def _encode_parts(self, parts: list[tuple[bool, str]]) -> list[int]:
        return [i for is_tag, text in parts for i in ([self.special_ids[text]] if is_tag else self.encode_text(text))]

    def generation_prompt(self, thinking: bool) -> str:
        return "".join(text for _, text in self._generation_parts(thinking))

    @staticmethod
    def _generation_parts(thinking: bool | None) -> list[tuple[bool, str]]:
        # no-think answers carry an empty (single space) think block, as in Cortex's training data
        parts = [(True, "<assistant>")]
        if thinking is not None:
            parts += [(True, "<think>")] + ([] if thinking else [(False, " "), (True, "</think>")])
        return parts

    def encode_prompt(self, messages: list[dict], thinking: bool | None = None) -> list[int]:
        """Template ids of messages (their text as text), then "<assistant>" (thinking None: the model decides) or
        generation_prompt(thinking)."""
        return self._encode_parts(self._template_parts(messages, True) + self._generation_parts(thinking))

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def save(self, out_dir: str | Path):
        """Writes files that load_tokenizer(out_dir) loads back to the same tokenizer."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "cortex":  # the verified original files, byte for byte (their sha256 is checked on load)
            for name in CORTEX_FILE_SHA256:
                _write_atomic(out_dir / name, (self.token_dir / name).read_bytes())
        else:
            self.hf.save_pretrained(out_dir)


def add_think_switch(text: str, thinking: bool) -> str:
    """User text with Cortex's soft switch " /think" or " /no think" at the end (replacing one already there)."""
    return split_think_switch(text)[0] + (THINK_SUFFIX if thinking else NO_THINK_SUFFIX)


def split_think_switch(text: str) -> tuple[str, bool | None]:
    """(text without the soft switch, True for /think, False for /no think, None when there is none)."""
    if text.endswith(THINK_SUFFIX):
        return text[: -len(THINK_SUFFIX)], True
    if text.endswith(NO_THINK_SUFFIX):
        return text[: -len(NO_THINK_SUFFIX)], False
    return text, None


class StreamDecoder:
    """Token ids in, text out, never ending inside a UTF-8 character.

    A character can span several tokens (sentencepiece byte fallback, byte-level BPE), so text is held back while the
    decoded tail is U+FFFD. Each step decodes only a small window: the tokens of the last emitted piece (context,
    so that pieces join exactly as decode(all) would) plus the pending ones. The pieces concatenate to decode(all ids).
    """

    # A character is at most 4 bytes: more pending tokens than this are invalid bytes (e.g. from an untrained model)
    # that no later token can complete, so they are let out as U+FFFD instead of being held (and re-decoded) forever.
    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._context: list[int] = []  # tokens of the last emitted piece
        self._pending: list[int] = []  # tokens not emitted yet

    def _new_text(self) -> str:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        context_text, text = decode(self._context), decode(self._context + self._pending)
        return text[len(context_text):]

    def push(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        new_text = self._new_text()
        incomplete = new_text.endswith("\ufffd") and len(self._pending) < self.MAX_PENDING
        if not new_text or incomplete:  # nothing yet, or a character still incomplete
            return ""
        self._context, self._pending = self._pending, []
        return new_text

    def flush(self) -> str:
        """The rest (an incomplete character comes out as U+FFFD); the decoder is then ready for a new stream."""
        new_text = self._new_text()
        self._context, self._pending = [], []
        return new_text


# -----------------------------------------------------------------------------
# Loading: the Cortex 2.5 files (fetched and verified) or our own BPE tokenizer.json


def load_tokenizer(token_dir: str | Path | None = None, *, base_urls: Iterable[str] = CORTEX_URL_TEMPLATES) -> Tokenizer:
    """Cortex 2.5 sentencepiece files in token_dir (default env TOKEN_DIR or ./tokens/), fetched and sha256-verified
    when missing; or a directory with our own BPE tokenizer.json made by train_bpe_tokenizer."""
    token_dir = Path(token_dir if token_dir is not None else os.environ.get("TOKEN_DIR") or DEFAULT_TOKEN_DIR)
    token_dir = token_dir.expanduser().resolve()
    if token_dir.exists() and not token_dir.is_dir():
        raise TokenizerFilesError(f"TOKEN_DIR {token_dir} is a file; it must be a directory holding the tokenizer files")
    if (token_dir / "tokenizer.json").is_file() and not (token_dir / "tokenizer.model").exists():
        kind = "bpe"
    else:
        fetch_cortex_files(token_dir, base_urls)
        verify_cortex_files(token_dir)
        kind = "cortex"
    return _load_verified(str(token_dir), kind, _dir_signature(token_dir))


def _dir_signature(token_dir: Path) -> tuple:
    # part of the cache key, so a directory whose files changed (e.g. a re-trained tokenizer) is loaded again
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(token_dir.iterdir()) if p.is_file())


@functools.lru_cache(maxsize=16)
def _load_verified(token_dir: str, kind: str, signature: tuple) -> Tokenizer:
    if kind == "cortex":
        hf = LlamaTokenizerFast.from_pretrained(token_dir, local_files_only=True)  # sentencepiece -> fast, in memory
        eos_id = hf.convert_tokens_to_ids("</s>")
        if eos_id != CORTEX_EOS_ID or len(hf) != CORTEX_VOCAB_SIZE:
            raise RuntimeError(f"transformers {transformers.__version__} loads the Cortex 2.5 tokenizer with wrong ids "
                               f"(</s>={eos_id}, {len(hf)} ids; the reference is </s>={CORTEX_EOS_ID}, {CORTEX_VOCAB_SIZE} ids). "
                               f"Install the pinned versions: pip3 install -r requirements.txt (transformers>=4.57,<5)")
    else:
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(token_dir, local_files_only=True)
        except Exception as err:  # the tokenizers library raises bare Exception for a bad tokenizer.json
            raise TokenizerFilesError(f"cannot load the BPE tokenizer in {token_dir} (tokenizer.json, tokenizer_config.json): "
                                      f"{err}. Train it again: python3 -m trainer.tokenizer train --files ... --out {token_dir}") from err
    return Tokenizer(hf, Path(token_dir), kind)


def fetch_cortex_files(token_dir: str | Path, base_urls: Iterable[str] = CORTEX_URL_TEMPLATES,
                       timeout_s: float = 30.0) -> list[str]:
    """Downloads the Cortex 2.5 files missing from token_dir, each checked against its sha256 and written atomically.
    base_urls are templates with {repo}, {commit} and {file}, tried in order. Returns the names downloaded."""
    token_dir = Path(token_dir)
    missing = [name for name in CORTEX_FILE_SHA256 if not (token_dir / name).exists()]
    if not missing:
        return []
    token_dir.mkdir(parents=True, exist_ok=True)
    failures, offline = {}, False
    for name in missing:
        if offline:  # no server answered for an earlier file: don't wait for more timeouts
            failures[name] = ["not tried: no server was reachable"]
            continue
        reasons, unreachable = [], True
        for template in base_urls:
            url = template.format(repo=CORTEX_REPO, commit=CORTEX_COMMIT, file=name)
            print(f"downloading {name} from {url}", file=sys.stderr)
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    data = response.read()
            except urllib.error.HTTPError as err:  # the server answered (e.g. 404)
                reasons.append(f"{url}: {err}")
                unreachable = False
                continue
            except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets are all OSError
                reasons.append(f"{url}: {err}")
                continue
            unreachable = False
            problem = _content_problem(name, data)
            if problem:
                reasons.append(f"{url}: {problem}")
                continue
            _write_atomic(token_dir / name, data)
            break
        else:
            failures[name] = reasons
            offline = unreachable
    if failures:
        details = "\n".join(f"  {name}:\n" + "\n".join(f"    {r}" for r in reasons) for name, reasons in failures.items())
        raise TokenizerFilesError(
            f"Cortex 2.5 tokenizer files missing from {token_dir} and the download failed: {', '.join(failures)}\n{details}\n"
            f"Put the files {', '.join(CORTEX_FILE_SHA256)} into {token_dir} (or point TOKEN_DIR at a directory holding them).\n"
            f"Get them from the tokens/ folder of Cortex 2.5: {CORTEX_FILES_PAGE}\n"
            f"Or use a tokenizer of your own: python3 -m trainer.tokenizer train --files DATA.jsonl --out DIR --vocab-size 8192, "
            f"then TOKEN_DIR=DIR")
    return missing


def verify_cortex_files(token_dir: str | Path):
    """Checks the sha256 of the four Cortex files, so that a truncated or edited file is named instead of crashing the loader."""
    token_dir = Path(token_dir)
    problems = []
    for name in CORTEX_FILE_SHA256:
        path = token_dir / name
        problem = _content_problem(name, path.read_bytes()) if path.is_file() else "missing"
        if problem:
            problems.append(f"  {path}: {problem}")
    if problems:
        raise TokenizerFilesError("Cortex 2.5 tokenizer file(s) corrupted or of another version:\n" + "\n".join(problems) +
                                  f"\nDelete them to have them downloaded again on the next load, or replace them with "
                                  f"the files from {CORTEX_FILES_PAGE}")


def _content_problem(name: str, data: bytes) -> str | None:
    digest = hashlib.sha256(data).hexdigest()
    if digest == CORTEX_FILE_SHA256[name]:
        return None
    lfs_note = ", a git LFS pointer instead of the file" if data.startswith(b"version https://git-lfs") else ""
    return f"sha256 {digest} ({len(data)} bytes{lfs_note}), expected {CORTEX_FILE_SHA256[name]}"


def _write_atomic(path: Path, data: bytes):
    # temp file in the same directory, then rename: readers never see a half-written file
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


# -----------------------------------------------------------------------------
# Our own byte-level BPE tokenizers


def iter_training_texts(text_files: Iterable[str | Path]) -> Iterator[str]:
    """Lines of text files; for .jsonl, every string under a "text", "content" or "think" key (messages included)."""
    for path in map(Path, text_files):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {path}")
        try:
            with path.open(encoding="utf-8") as f:
                if path.suffix != ".jsonl":
                    yield from f
                    continue
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg}); each line must be one JSON object") from err
                    yield from _json_text_fields(record)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err})") from err


def _json_text_fields(value) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in JSONL_TEXT_FIELDS and isinstance(item, str):
                yield item
            else:
                yield from _json_text_fields(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_text_fields(item)


def _write_bpe_tokenizer(text_files: list[Path], out_dir: Path, vocab_size: int):
    min_vocab_size = 256 + len(SPECIAL_TOKENS) + 1  # all bytes, the special tokens, at least one merge
    if vocab_size < min_vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer; use at least {min_vocab_size}")
    if (out_dir / "tokenizer.model").exists():
        raise ValueError(f"{out_dir} holds a sentencepiece tokenizer (tokenizer.model); write the BPE tokenizer to another directory")
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no added space: decode(encode(x)) == x
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: no unknown text
    n_texts = 0

    def counted_texts():
        nonlocal n_texts
        for text in iter_training_texts(text_files):
            n_texts += 1
            yield text

    bpe.train_from_iterator(counted_texts(), trainer)
    if n_texts == 0:
        raise ValueError(f"no text in {[str(p) for p in text_files]}: .jsonl lines need \"text\", \"content\" or \"think\" strings")
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                 additional_special_tokens=SPECIAL_TOKENS[3:], padding_side="left",
                                 clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)


def train_bpe_tokenizer(text_files: list[Path], out_dir: Path, vocab_size: int = 4096) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (deterministic) on .txt/.jsonl files and saves it to out_dir (tokenizer.json)."""
    out_dir = Path(out_dir)
    _write_bpe_tokenizer([Path(p) for p in text_files], out_dir, vocab_size)
    return load_tokenizer(out_dir)


def cache_dir() -> Path:
    return Path(os.environ.get("CORTEX_CACHE_DIR") or Path.home() / ".cache" / "cortex")


def sample_data_files(sample_dir: str | Path = SAMPLE_DATA_DIR) -> list[Path]:
    files = sorted(Path(sample_dir).glob("*.jsonl"))
    if not files:
        raise TokenizerFilesError(f"no sample data (*.jsonl) in {sample_dir}; "
                                  f"regenerate it with: python3 sample_data/make_sample_data.py")
    return files


def tiny_tokenizer(data_files: list[Path] | None = None, vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Our own BPE tokenizer for the tiny preset, trained on sample_data/*.jsonl (or data_files) and cached under
    CORTEX_CACHE_DIR (default ~/.cache/cortex) by a hash of its inputs: the same data always gives the same ids."""
    data_files = sample_data_files() if data_files is None else [Path(p) for p in data_files]
    h = hashlib.sha256(f"recipe={TINY_RECIPE_VERSION} vocab={vocab_size} tokenizers={tokenizers.__version__}".encode())
    for path in data_files:
        data = path.read_bytes()
        h.update(f"\n{path.name} {len(data)}\n".encode())
        h.update(data)
    out_dir = cache_dir() / f"tiny_tokenizer-{h.hexdigest()[:16]}"
    if not (out_dir / "tokenizer.json").is_file():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        try:
            _write_bpe_tokenizer(data_files, build_dir, vocab_size)
            try:
                build_dir.rename(out_dir)  # atomic: other processes see all files or none
            except OSError:
                if not (out_dir / "tokenizer.json").is_file():
                    raise
                # another process finished the same (identical, deterministic) tokenizer first
        finally:
            if build_dir.exists():
                shutil.rmtree(build_dir)
    return load_tokenizer(out_dir)




@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by the name a TrainConfig uses: 'cortex' (the Cortex 2.5 tokenizer from TOKEN_DIR or ./tokens,
    fetched when missing), 'tiny' (our BPE of the sample data), or a tokenizer directory."""
    if name == "cortex":
        return load_tokenizer()
    if name == "tiny":
        return tiny_tokenizer()
    return load_tokenizer(name)

# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python3 -m trainer.tokenizer", description="Cortex tokenizers")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE tokenizer on .txt / .jsonl files")
    train.add_argument("--files", nargs="+", required=True, type=Path, help=".txt (lines) or .jsonl (text/content/think fields)")
    train.add_argument("--out", required=True, type=Path, help="output directory; use it as TOKEN_DIR")
    train.add_argument("--vocab-size", type=int, default=4096)
    fetch = commands.add_parser("fetch", help="download and verify the Cortex 2.5 tokenizer files")
    fetch.add_argument("--dir", type=Path, default=None, help=f"default: env TOKEN_DIR or {DEFAULT_TOKEN_DIR}")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            tokenizer = train_bpe_tokenizer(args.files, args.out, args.vocab_size)
            print(f"trained {tokenizer}; use it with TOKEN_DIR={args.out}")
        else:
            print(f"ready: {load_tokenizer(args.dir)}")
    except (TokenizerFilesError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
