"""Real model families offline: their tokenizers, special tokens and chat templates, without the model hub.

    caictl families prepare            # once (`make setup` runs it): download, convert, cache
    caictl families prepare --sdist llama_cpp_python-0.3.36.tar.gz   # from a source package here
    caictl families status             # what is cached, and where
    caictl init-model --family qwen2.5 --out models/qwen-tiny    # then: a random-weight model in that family

Tokenizers come from the vocabulary-only GGUF files that llama.cpp keeps for its own tests, shipped in
llama-cpp-python's source package (`vendor/llama.cpp/models/`; the installed wheel drops them). `prepare`
fetches that package with pip, extracts four files, converts each with transformers (5-90 s apiece, which
is why it runs once, outside the test run) and caches the result under $CAICTL_CACHE (default
~/.cache/caictl) as tokenizers/<family>/. The cache holds transformers' conversion as it came out;
`load_tokenizer` then applies the family's settings below, so changing a setting needs no new conversion.

Chat templates come from TRL (`trl/chat_templates/`), the originals rather than the `_training` versions
(`caictl sft` swaps in a training version itself), never from the vocabulary files: those carry older templates.

Special tokens follow caictl's one rule for every family: the tokenizer's eos is the end-of-turn token (the
token a turn ends with and the engines cut generations at), and the model's `generation_config.eos_token_id`
lists every token the family stops on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from caictl.errors import CaictlError, UsageError

# The llama-cpp-python release whose source package the vocabulary files come from; the test extra installs
# the same release (built from that package) for the test suite's OpenAI-compatible server.
LLAMA_CPP_PYTHON = "0.3.36"
VOCAB_FOLDER = "vendor/llama.cpp/models"
PREPARE_COMMAND = "caictl families prepare"


@dataclass(frozen=True)
class Family:
    name: str
    gguf: str  # vocabulary file in llama-cpp-python's source package, under VOCAB_FOLDER
    template: str | None  # file in trl/chat_templates; None: no chat model (tokenizer-level tests only)
    bos: str | None  # the tokenizer's bos_token; None: the family has none
    add_bos: bool  # whether encoding plain text puts bos first (a template may still write it itself)
    eos: str  # the end-of-turn token
    stop: tuple[str, ...]  # every token generation stops on, in the family's own order
    pad: str | None  # None: the family has no pad token
    unk: str | None
    max_length: int  # tokenizer model_max_length, tokens
    edits: tuple[str, ...] = ()  # names of functions in VOCABULARY_EDITS, applied in order on loading
    # The architecture `caictl init-model --family` builds, scaled down by caictl.models.builders: the config
    # fields that make the family what it is. Empty: tokenizer-level only.
    model_type: str | None = None
    vocab_size: int = 0  # the real model's embedding rows (>= the tokenizer's length)
    grouped_query: bool = True  # fewer key/value heads than query heads
    config: dict = field(default_factory=dict)
    shape_of: str = ""  # which real model the config follows
    notes: tuple[str, ...] = ()  # where these settings depart from the vocabulary file or the real model


FAMILIES = {
    family.name: family
    for family in (
        Family(
            name="qwen2.5",
            gguf="ggml-vocab-qwen2.gguf",
            template="qwen2_5.jinja",
            bos=None,
            add_bos=False,
            eos="<|im_end|>",
            stop=("<|im_end|>", "<|endoftext|>"),
            pad="<|endoftext|>",
            unk=None,
            max_length=131072,
            model_type="qwen2",
            vocab_size=151936,
            # Qwen2 attention always has q/k/v biases (and none on o_proj): the class has no switch for them.
            config={"tie_word_embeddings": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                    "use_sliding_window": False},
            shape_of="Qwen2.5-0.5B-Instruct",
            notes=("Qwen2's vocabulary: ids 151646-151935 are unused [PADn] placeholders, where Qwen2.5 names "
                   "19 of them (<tool_call>, <|fim_prefix|>, vision markers); chat text never uses them.",
                   "No bos token, as Qwen2.5-Instruct ships (the vocabulary file names <|endoftext|>)."),
        ),
        Family(
            name="llama3",
            gguf="ggml-vocab-llama-bpe.gguf",
            template="llama3_1.jinja",
            bos="<|begin_of_text|>",
            add_bos=True,
            eos="<|eot_id|>",
            stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            # Llama 3 has no pad token. <|finetune_right_pad_id|> is the reserved token Meta names for padding
            # in 3.1; padding with eos instead would mask eos out of training labels.
            pad="<|finetune_right_pad_id|>",
            unk=None,
            max_length=131072,
            edits=("drop_llama3_extra_token", "llama31_special_names"),
            model_type="llama",
            vocab_size=128256,
            config={"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192},
                    "attention_bias": False, "mlp_bias": False},
            shape_of="Llama-3.1-8B-Instruct",
            notes=("The vocabulary file is Llama 3.0's: its reserved specials are renamed as Llama 3.1 names "
                   "them (ids unchanged), so the 3.1 template's <|eom_id|> and <|python_tag|> exist.",
                   "The file's extra token 128256 (<|endoftext|>), which Meta's tokenizer does not have, is "
                   "dropped: 128,256 tokens, as the embedding.",
                   "The vocabulary file does not add bos to plain text; Llama 3 does, so add_bos is set."),
        ),
        Family(
            name="phi3",
            gguf="ggml-vocab-phi-3.gguf",
            template="phi3_5.jinja",
            bos="<s>",
            add_bos=False,
            eos="<|end|>",
            stop=("<|end|>", "<|assistant|>", "<|endoftext|>"),
            pad="<|endoftext|>",
            unk="<unk>",
            max_length=4096,
            edits=("phi3_rstrip_chat_markers",),
            model_type="phi3",
            vocab_size=32064,
            grouped_query=False,
            # Phi3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj in the class itself.
            config={"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                    "original_max_position_embeddings": 4096,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            shape_of="Phi-3-mini-4k-instruct (no LongRoPE), with Phi-3.5's template",
            notes=("eos is <|end|> by caictl's rule; Phi-3.5-mini-instruct's tokenizer names <|endoftext|> "
                   "(its generation config stops on both), so the template's closing eos_token after a "
                   "finished conversation renders as a second <|end|>.",
                   "Encoding plain text adds no <s>, as Phi-3.5-mini-instruct ships (add_bos_token false); the "
                   "vocabulary file would add it.",
                   "The chat markers strip the whitespace after them (rstrip), as Phi-3.5 ships them."),
        ),
        Family(
            name="llama2-spm",
            gguf="ggml-vocab-llama-spm.gguf",
            template=None,
            bos="<s>",
            add_bos=True,
            eos="</s>",
            stop=("</s>",),
            pad=None,
            unk="<unk>",
            max_length=4096,
            notes=("Tokenizer-level tests only (Llama 2 / Mistral v0.1 SentencePiece): no template, no model.",),
        ),
    )
}
MODEL_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.model_type)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise UsageError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def cache_root() -> Path:
    """$CAICTL_CACHE, else $XDG_CACHE_HOME/caictl, else ~/.cache/caictl."""
    if os.environ.get("CAICTL_CACHE"):
        return Path(os.environ["CAICTL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "caictl"


def tokenizer_folder(name: str, cache: Path | None = None) -> Path:
    return Path(cache or cache_root()) / "tokenizers" / name


def is_prepared(name: str, cache: Path | None = None) -> bool:
    # source.json is written last: a folder without it is an interrupted conversion.
    folder = tokenizer_folder(name, cache)
    return (folder / "source.json").exists() and (folder / "tokenizer.json").exists()


def require_prepared(name: str, cache: Path | None = None) -> None:
    if not is_prepared(name, cache):
        raise CaictlError(
            f"the {name} tokenizer is not prepared (looked in {tokenizer_folder(name, cache)}): run `make setup` "
            f"or `{PREPARE_COMMAND}` once (set CAICTL_CACHE to use another cache folder)")


# Preparation -------------------------------------------------------------------------------------------------


def prepare(names: list[str] | None = None, cache: Path | None = None, sdist: Path | None = None,
            force: bool = False, log=None) -> dict[str, Path]:
    """Convert each family's vocabulary file once and cache the tokenizer folder; work already done is skipped.

    sdist: llama-cpp-python's source package (.tar.gz) already on disk; otherwise pip downloads it.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = Path(cache or cache_root())
    families = [get(name) for name in (names or list(FAMILIES))]
    todo = [f for f in families if force or not is_prepared(f.name, cache)]
    for family in families:
        if family not in todo:
            log(f"{family.name}: ready in {tokenizer_folder(family.name, cache)}")
    if not todo:
        return {f.name: tokenizer_folder(f.name, cache) for f in families}
    _require_gguf_package()
    vocab = cache / "gguf" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    missing = [f.gguf for f in todo if force or not (vocab / f.gguf).exists()]
    if missing:
        with tempfile.TemporaryDirectory(prefix="caictl-sdist-") as tmp:
            archive = Path(sdist) if sdist else _download_sdist(Path(tmp), log)
            _extract(archive, missing, vocab, log)
    for family in todo:
        _convert(family, vocab, tokenizer_folder(family.name, cache), log)
    return {f.name: tokenizer_folder(f.name, cache) for f in families}


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise CaictlError("transformers needs the `gguf` package to read vocabulary files: "
                          "pip install -e '.[families]' (or run `make setup`)")


def _download_sdist(folder: Path, log) -> Path:
    log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source package with pip (76 MB) ...")
    start = time.perf_counter()
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CaictlError(f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON} ({tail}); if the source "
                          f"package is on disk, pass it: {PREPARE_COMMAND} --sdist FILE")
    log(f"  downloaded {archives[0].name} in {time.perf_counter() - start:.0f} s")
    return archives[0]


def _extract(archive: Path, names: list[str], folder: Path, log) -> None:
    """Only the named vocabulary files, streamed out of the archive."""
    if not archive.is_file():
        raise UsageError(f"{archive}: no such file (expected llama-cpp-python's .tar.gz source package)")
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(names)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parent, _, base = member.name.rpartition("/")
            if base in wanted and member.isfile() and parent.endswith(VOCAB_FOLDER):
                partial = folder / (base + ".partial")
                with tar.extractfile(member) as source, open(partial, "wb") as target:
                    shutil.copyfileobj(source, target)
                partial.replace(folder / base)
                wanted.discard(base)
    if wanted:
        raise CaictlError(f"{archive}: no {', '.join(sorted(wanted))} under {VOCAB_FOLDER}/ (is it "
                          f"llama-cpp-python {LLAMA_CPP_PYTHON}'s source package?)")
    log(f"  extracted {', '.join(names)} into {folder}")


def _convert(family: Family, vocab: Path, folder: Path, log) -> None:
    from transformers import AutoTokenizer

    from caictl.ui import quiet_transformers

    quiet_transformers()
    log(f"{family.name}: converting {family.gguf} with transformers ...")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(vocab, gguf_file=family.gguf)
    seconds = time.perf_counter() - start
    # Written beside the final folder and renamed at the end, so an interrupted run leaves no half cache.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    # Templates come from TRL; the one carried in the vocabulary file must not leak into a model folder.
    (partial / "chat_template.jinja").unlink(missing_ok=True)
    source = {
        "family": family.name,
        "gguf_file": family.gguf,
        "gguf_sha256": _sha256(vocab / family.gguf),
        "from": f"llama-cpp-python {LLAMA_CPP_PYTHON} source package, {VOCAB_FOLDER}/{family.gguf}",
        "llama_cpp_python_version": LLAMA_CPP_PYTHON,
        "converted_with": f"transformers {importlib.metadata.version('transformers')}",
        "conversion_seconds": round(seconds, 1),
        "tokens": len(tokenizer),
    }
    (partial / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    log(f"  {len(tokenizer):,} tokens in {seconds:.0f} s -> {folder}")


# Loading -----------------------------------------------------------------------------------------------------


def load_tokenizer(name: str, cache: Path | None = None):
    """The family's tokenizer as caictl ships it in a model folder: cached conversion + the family's settings."""
    from transformers import PreTrainedTokenizerFast

    family = get(name)
    require_prepared(name, cache)
    path = tokenizer_folder(name, cache) / "tokenizer.json"
    with tempfile.TemporaryDirectory(prefix="caictl-tokenizer-") as tmp:
        if family.edits:
            spec = json.loads(path.read_text(encoding="utf-8"))
            for edit in family.edits:
                VOCABULARY_EDITS[edit](spec)
            path = Path(tmp) / "tokenizer.json"
            path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        # From a file, not `tokenizer_object=`: that one deep-copies the backend, seconds for a 150k vocabulary.
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(path),
            bos_token=family.bos,
            eos_token=family.eos,
            pad_token=family.pad,
            unk_token=family.unk,
            chat_template=template_text(name) if family.template else None,
            model_max_length=family.max_length,
            clean_up_tokenization_spaces=False,
        )
    tokenizer.add_bos_token = family.add_bos  # rewrites the post-processor, which is saved in tokenizer.json
    tokenizer.add_eos_token = False
    return tokenizer


def stop_ids(tokenizer, name: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in get(name).stop]


def template_path(name: str) -> Path:
    family = get(name)
    if not family.template:
        raise UsageError(f"{name} has no chat template (tokenizer-level tests only)")
    spec = importlib.util.find_spec("trl")  # finds the package without importing it (and torch with it)
    if spec is None or not spec.submodule_search_locations:
        raise CaictlError("TRL is not installed: the families' chat templates come from trl/chat_templates/")
    path = Path(list(spec.submodule_search_locations)[0]) / "chat_templates" / family.template
    if not path.exists():
        raise CaictlError(f"{path}: not found; caictl expects TRL >= 1.16, which ships the families' templates")
    return path


def template_text(name: str) -> str:
    return template_path(name).read_text(encoding="utf-8")


def provenance(name: str, cache: Path | None = None) -> dict:
    """Where the tokenizer and the template came from, for a model folder's caictl.json."""
    family = get(name)
    source = json.loads((tokenizer_folder(name, cache) / "source.json").read_text(encoding="utf-8"))
    record = {"tokenizer": {**{k: v for k, v in source.items() if k != "family"},
                            "changes": list(family.edits),
                            "special_tokens": {"bos": family.bos, "add_bos": family.add_bos, "eos": family.eos,
                                               "pad": family.pad, "stop": list(family.stop)}},
              "notes": list(family.notes)}
    if family.template:
        path = template_path(name)
        record["chat_template"] = {"from": f"trl {importlib.metadata.version('trl')}, trl/chat_templates/"
                                           f"{family.template}",
                                   "trl_version": importlib.metadata.version("trl"),
                                   "file": family.template,
                                   "sha256": _sha256(path)}
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Vocabulary edits: each takes transformers' tokenizer.json (a dict) and changes it in place. -------------------


def drop_llama3_extra_token(spec: dict) -> None:
    """llama.cpp's Llama 3 file appends <|endoftext|> at id 128256; Meta's tokenizer ends at 128255."""
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 128256]
    spec["model"]["vocab"] = {token: i for token, i in spec["model"]["vocab"].items() if i < 128256}


# Ids 128000-128255 as Llama 3.1 names them; the reserved ones are numbered in order over the remaining ids.
LLAMA31_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                 128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
                 128009: "<|eot_id|>", 128010: "<|python_tag|>"}


def llama31_special_names(spec: dict) -> None:
    names, reserved = {}, 0
    for i in range(128000, 128256):
        if i in LLAMA31_NAMED:
            names[i] = LLAMA31_NAMED[i]
        else:
            names[i] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    for token in spec["added_tokens"]:
        token["content"] = names.get(token["id"], token["content"])
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {names.get(i, token): i for token, i in vocab.items()}


def phi3_rstrip_chat_markers(spec: dict) -> None:
    """Phi-3's <|user|>, <|assistant|>, <|system|>, <|end|> and placeholders swallow the whitespace after them."""
    for token in spec["added_tokens"]:
        if 32001 <= token["id"] <= 32010:
            token["rstrip"] = True


VOCABULARY_EDITS = {edit.__name__: edit for edit in (drop_llama3_extra_token, llama31_special_names,
                                                     phi3_rstrip_chat_markers)}

