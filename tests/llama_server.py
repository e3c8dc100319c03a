"""Real OpenAI-compatible servers for tests: caictl's tiny random model (or a family's) served by llama-cpp-python,
or by llama.cpp's own C++ `llama-server`.

    from llama_server import llama_server_url  # in a conftest or test module: a session fixture

`write_gguf` converts a caictl model folder to GGUF by hand (no llama.cpp checkout needed); `serve` runs
`python -m llama_cpp.server` on it (tests skip when llama-cpp-python[server] is not installed), and
`serve_llama_cpp` runs `llama-server` (tests fail when it is not built: `make llama-server` builds it).
llama-cpp-python's server reads prompts as text only; llama-server also takes token ids, as vLLM does.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SKIP_REASON = "llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'"
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

# The output bias baked into the GGUF for tokens that would print control bytes, broken UTF-8 or special
# markers. Random weights give every token about the same logit (std ~0.2), so this rules them out. It
# scales with the residual stream's RMS at the last layer: -45 to -100 on the tiny model.
UNPRINTABLE_BIAS = -100.0
# Value of the extra hidden unit that carries that bias: small next to the residual stream (RMS ~0.02), so
# the RMS norms barely notice it.
BIAS_UNIT = 1e-5


def llama_cpp_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in SERVER_MODULES)


def printable_token_ids(model_dir: Path) -> set[int]:
    """Ids whose text is non-empty printable text (newlines and tabs allowed), plus the end-of-sequence token."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # End of sequence stays, so generations can end: at random weights about one step in 170 picks it.
    ok = {json.loads((model_dir / "config.json").read_text())["eos_token_id"]}
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i])  # a lone byte of a multi-byte character decodes to U+FFFD
        if text and "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text):
            ok.add(i)
    return ok


def write_gguf(model_dir: Path, out: Path, vocab_gguf: Path | None = None, unprintable_bias: bool = True) -> Path:
    """Write a caictl model folder as an F32 GGUF that llama.cpp loads, with its tokenizer and template: caictl's
    own Llama model (architecture "llama", vocabulary from its tokenizer.json), or a qwen2.5 family model
    (architecture "qwen2" with its q/k/v biases; tokens, merges and token types copied from `vocab_gguf`, the
    real Qwen vocabulary file the family's tokenizer was converted from).

    llama-cpp-python's server has no default logit bias, so the bias against unprintable tokens is baked into
    the file. qwen2 has an output bias: it goes there. llama has none, so one extra hidden unit holds BIAS_UNIT
    in every token embedding, no layer reads or writes it, and only the (now untied) output matrix reads it.
    Every other logit equals the Hugging Face model's. unprintable_bias=False: no bias at all, every logit the
    Hugging Face model's (for llama-server, whose log-probs are then the hf engine's).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2"}[config["model_type"]]
    hf = load_file(model_dir / "model.safetensors")
    embed = hf["model.embed_tokens.weight"]
    n_vocab, n_embd = embed.shape
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or n_embd // n_head
    rope_theta = (config.get("rope_parameters") or config).get("rope_theta", 10000.0)

    tokens, types, merges, pre = _vocabulary(model_dir, n_vocab, vocab_gguf)
    # llama.cpp's Jinja renderer may not know {% generation %}, which only marks assistant tokens for training.
    template_file = model_dir / "chat_template.jinja"  # transformers 5; older ones kept it in tokenizer_config
    if template_file.exists():
        template = template_file.read_text()
    else:
        template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)

    if unprintable_bias:
        printable = printable_token_ids(model_dir)
        unprintable = np.array([i not in printable for i in range(n_vocab)])
    extra_unit = unprintable_bias and arch == "llama"  # else the output bias carries it, or there is none
    # The extra unit joins every RMS norm: scale the weights and eps so the other units normalise as before.
    scale = np.sqrt(n_embd / (n_embd + 1)) if extra_unit else 1.0
    width = n_embd + 1 if extra_unit else n_embd
    rms = float(np.sqrt(np.mean(embed**2)))  # about the residual stream's RMS, which the final norm divides by

    def reads(w):  # a weight that takes the hidden state as input: it ignores the extra unit
        return np.hstack([w, np.zeros((w.shape[0], 1))]) if extra_unit else w

    def writes(w):  # a weight that adds to the residual stream: it leaves the extra unit alone
        return np.vstack([w, np.zeros((1, w.shape[1]))]) if extra_unit else w

    def norm(w, extra):  # an RMS norm's weight; the extra unit's entry passes it through (1) or drops it (0)
        return np.append(w * scale, extra) if extra_unit else w

    def permute(w, heads):  # as llama.cpp's convert_hf_to_gguf: HF rotates half-dims, ggml adjacent pairs
        if arch != "llama":  # qwen2 uses NeoX-style RoPE in llama.cpp: the HF layout as it is
            return w
        return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    head = hf.get("lm_head.weight", embed)
    if extra_unit:
        tensors = {
            "token_embd.weight": np.hstack([embed, np.full((n_vocab, 1), BIAS_UNIT)]),
            "output.weight": np.hstack([head, (unprintable * UNPRINTABLE_BIAS * rms / BIAS_UNIT)[:, None]]),
        }
    elif unprintable_bias:
        tensors = {"token_embd.weight": embed, "output.weight": head,
                   "output.bias": unprintable * UNPRINTABLE_BIAS}
    else:
        tensors = {"token_embd.weight": embed, "output.weight": head}
    tensors["output_norm.weight"] = norm(hf["model.norm.weight"], 1.0)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {
            f"blk.{n}.attn_norm.weight": norm(hf[p + "input_layernorm.weight"], 0.0),
            f"blk.{n}.attn_q.weight": reads(permute(hf[p + "self_attn.q_proj.weight"], n_head)),
            f"blk.{n}.attn_k.weight": reads(permute(hf[p + "self_attn.k_proj.weight"], n_head_kv)),
            f"blk.{n}.attn_v.weight": reads(hf[p + "self_attn.v_proj.weight"]),
            f"blk.{n}.attn_output.weight": writes(hf[p + "self_attn.o_proj.weight"]),
            f"blk.{n}.ffn_norm.weight": norm(hf[p + "post_attention_layernorm.weight"], 0.0),
            f"blk.{n}.ffn_gate.weight": reads(hf[p + "mlp.gate_proj.weight"]),
            f"blk.{n}.ffn_up.weight": reads(hf[p + "mlp.up_proj.weight"]),
            f"blk.{n}.ffn_down.weight": writes(hf[p + "mlp.down_proj.weight"]),
        }
        for projection in ("q", "k", "v"):  # Qwen2's attention biases (outputs: the extra unit is not involved)
            if p + f"self_attn.{projection}_proj.bias" in hf:
                tensors[f"blk.{n}.attn_{projection}.bias"] = hf[p + f"self_attn.{projection}_proj.bias"]

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(width)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)  # n_embd + 1 no longer divides by the head count
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"] * scale**2)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # The HF tokenizers add no BOS, but llama-cpp-python's echo=True log-probs are one token off unless the
    # prompt starts with BOS, so /v1/completions prompts get the pad token (<|endoftext|>) in front. Chat
    # prompts do not.
    writer.add_bos_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template(template)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _vocabulary(model_dir: Path, n_vocab: int, vocab_gguf: Path | None):
    """(tokens, token types, merges, pre-tokenizer name) for the GGUF."""
    import gguf

    if vocab_gguf is not None:  # the real vocabulary, as llama.cpp ships it
        reader = gguf.GGUFReader(str(vocab_gguf))

        def strings(key):
            field = reader.fields[key]
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

        token_types = reader.fields["tokenizer.ggml.token_type"]
        types = [int(token_types.parts[i][0]) for i in token_types.data]
        pre = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode()
        tokens = strings("tokenizer.ggml.tokens")
        assert len(tokens) == n_vocab, f"{vocab_gguf}: {len(tokens)} tokens for {n_vocab} embedding rows"
        return tokens, types, strings("tokenizer.ggml.merges"), pre
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    # The vocabulary is padded to the embedding rows with unused tokens, which llama.cpp prints as nothing.
    tokens = [f"<|pad_{i}|>" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in tokenizer["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    return tokens, types, merges, "gpt-2"  # GPT-2's split regex, as the ByteLevel pre-tokenizer uses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(gguf_path: Path, *, timeout: float = 60.0) -> Iterator[str]:
    """Run llama-cpp-python's OpenAI-compatible server on a GGUF; yield its base URL (".../v1")."""
    with serve_process(gguf_path, timeout=timeout) as server:
        yield server.url


@dataclass
class Served:
    """A running server: its base URL, its process, and the file that takes its output (uvicorn writes one
    access line per request it answers)."""

    url: str
    process: subprocess.Popen
    log: Path

    def requests(self) -> int:
        """Requests to /v1/... that the server has answered so far, read from its access log."""
        return self.log.read_text(errors="replace").count(' "POST /v1/')


@contextmanager
def serve_process(gguf_path: Path, *, log_path: Path | None = None, threads: int | None = None,
                  timeout: float = 60.0) -> Iterator[Served]:
    """serve(), yielding the Served. log_path: where its output goes (default beside the GGUF, which a second
    server on the same file would share); threads: CPU threads it computes with (default llama.cpp's)."""
    port = _free_port()
    log_path = Path(log_path or Path(gguf_path).with_suffix(".server.log"))
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
        "--logits_all", "true",  # log-probs need every position's logits
        "--seed", "0",
        "--type_k", "0", "--type_v", "0",  # an F32 KV cache (GGML_TYPE_F32): logits match Hugging Face to ~1e-6
        # By default a queued request cuts off a streaming one; make requests wait their turn instead.
        "--interrupt_requests", "false",
        "--verbose", "false",
    ]  # fmt: skip
    if threads:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=1):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"llama_cpp.server did not start (see {log_path}):\n{tail}")
            time.sleep(0.1)
        yield Served(base_url, process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def llama_server_binary() -> Path:
    """llama.cpp's llama-server ($LLAMA_SERVER, else the build `make llama-server` caches); fails the test
    without it."""
    from build_llama_server import binary_path

    binary = binary_path()
    if not binary.is_file():
        pytest.fail(f"llama-server not found at {binary}: run `make llama-server` (it builds llama.cpp's server once; "
                    "`make test` does too), or set LLAMA_SERVER to a llama-server binary", pytrace=False)
    return binary


@contextmanager
def serve_llama_cpp(gguf_path: Path, *, threads: int = 1, timeout: float = 60.0) -> Iterator[Served]:
    """Run llama.cpp's llama-server on a GGUF, on the CPU; yield the Served (its log: beside the GGUF)."""
    binary = llama_server_binary()
    port = _free_port()
    log_path = Path(gguf_path).with_suffix(".llama-server.log")
    command = [
        str(binary), "--model", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", "2048", "--parallel", "1",  # one slot: each request reuses the last one's prompt cache
        "--threads", str(threads), "--threads-batch", str(threads), "--n-gpu-layers", "0",
        # An F32 KV cache and no flash attention (its CPU kernel rounds through F16: log-probs 1e-4 off, not 1e-6).
        "--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off",
        "--seed", "0",
    ]  # fmt: skip
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30).stdout
    if "--no-webui" in help_text:
        command.append("--no-webui")
    root = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(root + "/health", timeout=1):  # 503 while the model loads
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"llama-server did not start (see {log_path}):\n{tail}")
            time.sleep(0.1)
        yield Served(root + "/v1", process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """caictl's tiny random model: (Hugging Face folder, GGUF file)."""
    if not llama_cpp_available():
        pytest.skip(SKIP_REASON)
    pytest.importorskip("gguf", reason="gguf is not installed: pip install gguf")
    try:
        from caictl.stages.init_model import InitModelConfig, run
    except ImportError:  # a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from caictl.stages.init_model import InitModelConfig, run
    root = tmp_path_factory.mktemp("llama-server")
    model_dir = run(InitModelConfig(out=root / "tiny", preset="tiny"))
    return model_dir, write_gguf(model_dir, root / "tiny.gguf")


@pytest.fixture(scope="session")
def qwen_gguf(tmp_path_factory, family_model) -> tuple[Path, Path]:
    """The qwen2.5 family's tiny random model (the real Qwen vocabulary and template): (folder, GGUF file)."""
    if not llama_cpp_available():
        pytest.skip(SKIP_REASON)
    from caictl.models import families

    model_dir = family_model("qwen2.5")
    vocab = families.cache_root() / "gguf" / f"llama-cpp-python-{families.LLAMA_CPP_PYTHON}" / "ggml-vocab-qwen2.gguf"
    return model_dir, write_gguf(model_dir, tmp_path_factory.mktemp("llama-server-qwen") / "qwen.gguf", vocab)


@pytest.fixture(scope="session")
def exact_tiny_gguf(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """caictl's tiny model (conftest's) as a GGUF without the unprintable-token bias: (folder, GGUF file)."""
    pytest.importorskip("gguf", reason="gguf is not installed: pip install gguf")
    return tiny_model, write_gguf(tiny_model, tmp_path_factory.mktemp("exact-tiny") / "tiny.gguf",
                                  unprintable_bias=False)


@pytest.fixture(scope="session")
def exact_qwen_gguf(tmp_path_factory, family_model) -> tuple[Path, Path]:
    """The qwen2.5 family's tiny model as a GGUF without the unprintable-token bias: (folder, GGUF file)."""
    pytest.importorskip("gguf", reason="gguf is not installed: pip install gguf")
    from caictl.models import families

    model_dir = family_model("qwen2.5")
    vocab = families.cache_root() / "gguf" / f"llama-cpp-python-{families.LLAMA_CPP_PYTHON}" / "ggml-vocab-qwen2.gguf"
    return model_dir, write_gguf(model_dir, tmp_path_factory.mktemp("exact-qwen") / "qwen.gguf", vocab,
                                 unprintable_bias=False)


@pytest.fixture(scope="session")
def tiny_llama_cpp(exact_tiny_gguf) -> Iterator[Served]:
    """llama.cpp's llama-server running caictl's tiny model, its logits the Hugging Face model's."""
    with serve_llama_cpp(exact_tiny_gguf[1]) as server:
        yield server


@pytest.fixture(scope="session")
def qwen_llama_cpp(exact_qwen_gguf) -> Iterator[Served]:
    """llama.cpp's llama-server running the qwen2.5 family's tiny model, its logits the Hugging Face model's."""
    with serve_llama_cpp(exact_qwen_gguf[1]) as server:
        yield server


@pytest.fixture(scope="session")
def llama_server_url(tiny_gguf) -> Iterator[str]:
    """Base URL ("http://127.0.0.1:PORT/v1") of a llama-cpp-python server running caictl's tiny model."""
    with serve(tiny_gguf[1]) as url:
        yield url


@pytest.fixture(scope="module")
def qwen_server_url(qwen_gguf) -> Iterator[str]:
    """Base URL of a llama-cpp-python server running the qwen2.5 family's tiny model (one module uses it: it
    stops after that module, freeing the memory its 152k-token logits take)."""
    with serve(qwen_gguf[1]) as url:
        yield url
