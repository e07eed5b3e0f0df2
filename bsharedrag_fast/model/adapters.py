"""PEFT LoRA adapters on the Backbone: load, save, unload, hot-swap.

Format: a PEFT directory with adapter_config.json + adapter_model.safetensors, keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (older PEFT versions put
the adapter name in the middle: `...q_proj.lora_A.default.weight`; both are read).

Supported config: r, lora_alpha, use_rslora (scaling alpha / sqrt(r), else alpha / r),
target_modules (a list of names / full keys, a regex string or "all-linear"),
exclude_modules, rank_pattern, alpha_pattern, layers_to_transform, layers_pattern, all
matched exactly as PEFT matches them. Training / init-only fields (lora_dropout,
init_lora_weights, loftq/eva/corda configs, ...) are ignored. Everything that changes the
forward pass and is not implemented (use_dora, bias != "none", lora_bias,
modules_to_save, fan_in_fan_out, target_parameters, trainable tokens, layer_replication,
LoRA on embed_tokens / lm_head / norms, ...) is a ValueError naming it.

Slots. Adapter a lives in slot `model.adapter_slots[a]` of every per-module LoRAStack
(lora_a [L, r_max, in], lora_b [L, out, r_max], scaling [L]); r_max is per (layer, module)
the largest rank among the resident adapters, lower ranks are zero-padded, and an adapter
that lacks a module holds zeros (and scaling 0) in that stack. Slots are dense: loading
appends slot L (other adapters keep their slots and their values bit for bit);
unloading compacts the stacks (later adapters move down by one, r_max may shrink) so
memory is always exactly the resident adapters. Slot numbers are therefore only valid
until the next unload: pass adapter *names* to forward (or re-read adapter_slots), and do
not keep a LoRAMeta built before an unload.

Atomicity. Every operation reads and validates everything, builds the complete new stacks
aside, and swaps them in with one `Backbone.set_lora_stacks(..., adapter_slots=...,
infos=...)` call, which replaces the model's one ResidentAdapters object (stacks, merged
projections, slot table, records); any error before that leaves the model untouched.

Per-adapter bookkeeping is kept in `AdapterInfo` (true rank and alpha of every (layer,
module) it has), so save_adapter slices the padding off and writes each module at its
true rank, and `adapter_nbytes` reports resident bytes per adapter.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..util.jsonfile import write_json
from .targets import MODULE_PARENT, TARGET_MODULES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# trained LoRA factors stay far below this; a larger value means a corrupt or tampered file
# (its products would overflow bf16 / fp16 activations into NaN)
MAX_LORA_ABS = 1e4

# Config fields that do not change the inference forward pass (training / init only).
_IGNORED = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "megatron_core", "runtime_config", "ensure_weight_tying",
}  # fmt: skip
# Fields we implement.
_HANDLED = {
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern",
}  # fmt: skip
# Fields that change the forward pass and are not implemented: must be absent or hold this value.
_UNSUPPORTED_DEFAULTS = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False}

_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_MODULE_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<name>\w+)$")


@dataclass
class LoRAStack:
    """L adapters stacked for one target module of one layer (slot a = adapter a).
    lora_a [L, r, in], lora_b [L, out, r] (x dtype), scaling float32 [L]. Ranks below r
    are zero-padded; a slot whose adapter lacks this module holds zeros. The lora_a of a
    merged projection's modules (q/k/v, gate/up) are views of one tensor (see _build_stacks)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's share of the resident adapters: the stacks (target module -> LoRAStack)
    and the merged projections over them (group -> ops.MergedLoRA: one shrink over the
    stacked A of q/k/v or gate/up, one expand writing each module's output slice)."""

    stacks: dict
    merged: dict


@dataclass(frozen=True)
class ResidentAdapters:
    """Every adapter the engine holds, as one object that is replaced whole
    (Backbone.set_lora_stacks), never edited: per layer the stacked A / B and scalings
    (LayerLoRA), the slot table (name -> slot, a bijection onto 0..num_slots - 1, or empty
    for stacks set by slot alone) and each named adapter's record (AdapterInfo). A forward
    reads it once, so an adapter swapped in between two forwards never mixes into one."""

    num_slots: int
    layers: tuple  # LayerLoRA per layer
    slots: dict  # name -> slot
    infos: dict  # name -> AdapterInfo

    @classmethod
    def empty(cls, num_layers: int) -> "ResidentAdapters":
        return cls(0, tuple(LayerLoRA({}, {}) for _ in range(num_layers)), {}, {})


@dataclass
class AdapterInfo:
    """What one resident adapter holds. modules[(layer, name)] = (rank, alpha)."""

    name: str
    modules: dict
    use_rslora: bool = False
    config: dict = field(default_factory=dict)  # the adapter_config.json it came from
    source: Optional[str] = None

    def scaling(self, key) -> float:
        r, alpha = self.modules[key]
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def module_key(layer: int, name: str) -> str:
    """The HF module key (as PEFT names it, without the base_model.model. prefix)."""
    return f"model.layers.{layer}.{MODULE_PARENT[name]}.{name}"


# ----------------------------------------------------------------------------- config


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


def _check_regex(pattern: str, what: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {what} {pattern!r} is not a valid regular expression ({e})") from None


def _check_modules_option(value, opt: str, where: str) -> None:
    """target_modules / exclude_modules: a regex string or a list of module-name strings (PEFT)."""
    if value is None:
        return
    if isinstance(value, str):
        _check_regex(value, opt, where)
    elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {opt} must be a regex string or a list of module names, got {value!r}")


def _candidate_keys(num_layers: int) -> list[str]:
    """Module keys of a Llama/Qwen2/Mistral CausalLM that target_modules could name."""
    keys = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    for l in range(num_layers):
        p = f"model.layers.{l}."
        keys += [p + "self_attn", p + "mlp", p + "input_layernorm", p + "post_attention_layernorm", p + "mlp.act_fn"]
        keys += [module_key(l, n) for n in TARGET_MODULES]
    return keys


def _targeted(cfg: dict, key: str) -> bool:
    """PEFT's check_target_module_exists for one key (exclude_modules, regex / list
    target_modules, layers_to_transform + layers_pattern for list target_modules)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    if not any(key.endswith(f".{t}") for t in tm):
        return False
    idx = cfg.get("layers_to_transform")
    if idx is None or (isinstance(idx, list) and len(idx) == 0):
        return True
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    layer = int(match.group("idx"))
    return layer == idx if isinstance(idx, int) else layer in idx


def parse_config(cfg: dict, num_layers: int, where: str) -> tuple[dict, bool]:
    """Validate an adapter_config.json dict. Returns ({(layer, name): (rank, alpha)} of the
    modules it targets, use_rslora). Unsupported options are a ValueError naming them."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: adapter_config.json must hold a JSON object")
    pt = str(cfg.get("peft_type", "LORA")).upper()
    if pt != "LORA":
        raise ValueError(f"{where}: unsupported peft_type {cfg.get('peft_type')!r} (only LORA)")
    for opt, default in _UNSUPPORTED_DEFAULTS.items():
        if opt in cfg and cfg[opt] != default:
            raise ValueError(f"{where}: unsupported option {opt}={cfg[opt]!r} (only {default!r} is supported)")
    for opt, v in cfg.items():
        if opt in _IGNORED or opt in _HANDLED or opt in _UNSUPPORTED_DEFAULTS:
            continue
        if v not in (None, False, 0, "", [], {}):
            raise ValueError(f"{where}: unsupported option {opt}={v!r}")
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise ValueError(f"{where}: rank_pattern / alpha_pattern must be objects")
    tm = cfg.get("target_modules")
    if tm is None or (isinstance(tm, (list, str)) and len(tm) == 0):
        raise ValueError(f"{where}: target_modules is missing or empty")
    for opt in ("target_modules", "exclude_modules"):
        _check_modules_option(cfg.get(opt), opt, where)
    for opt in ("rank_pattern", "alpha_pattern"):
        for p in cfg.get(opt) or {}:
            _check_regex(p, f"{opt} key", where)
    if isinstance(tm, str) and tm.lower() == "all-linear":
        tm = list(TARGET_MODULES)  # every linear layer but the output embedding, as PEFT expands it
    elif not isinstance(tm, str):
        tm = list(tm)
    cfg = dict(cfg, target_modules=tm)
    if cfg.get("layers_to_transform") is not None and not isinstance(cfg["layers_to_transform"], (int, list)):
        raise ValueError(f"{where}: layers_to_transform must be an int or a list of ints")
    modules = {}
    for key in _candidate_keys(num_layers):
        if not _targeted(cfg, key):
            continue
        m = _MODULE_RE.match(key)
        if m is None or m.group("name") not in TARGET_MODULES:
            raise ValueError(
                f"{where}: target_modules selects {key!r}; LoRA is supported only on {list(TARGET_MODULES)} "
                f"of the decoder layers (not on embed_tokens, lm_head or norms)"
            )
        mr = _pattern_value(rank_pattern, key, r)
        ma = _pattern_value(alpha_pattern, key, alpha)
        if not isinstance(mr, int) or isinstance(mr, bool) or mr < 1:
            raise ValueError(f"{where}: rank of {key} must be an int >= 1, got {mr!r}")
        if not isinstance(ma, (int, float)) or isinstance(ma, bool) or not math.isfinite(ma):
            raise ValueError(f"{where}: lora_alpha of {key} must be a finite number, got {ma!r}")
        modules[(int(m.group("layer")), m.group("name"))] = (mr, ma)
    if not modules:
        raise ValueError(f"{where}: target_modules {cfg['target_modules']!r} match no module of this model")
    return modules, bool(cfg.get("use_rslora", False))


# ----------------------------------------------------------------------------- load


def read_adapter(model, peft_dir, name: str) -> tuple[AdapterInfo, dict]:
    """Read and validate a PEFT directory against `model`. Returns the AdapterInfo and
    {(layer, name): (A [r, in], B [out, r])} in the model's dtype and device."""
    from safetensors import safe_open

    peft_dir = os.fspath(peft_dir)
    cfg_path = os.path.join(peft_dir, CONFIG_NAME)
    w_path = os.path.join(peft_dir, WEIGHTS_NAME)
    if not os.path.isdir(peft_dir):
        raise ValueError(f"adapter directory {peft_dir!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"no {CONFIG_NAME} in {peft_dir!r}: not a PEFT adapter directory")
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(peft_dir, "adapter_model.bin")):
            raise ValueError(f"{peft_dir!r} holds only pickle weights (adapter_model.bin); convert them to safetensors")
        raise ValueError(f"no {WEIGHTS_NAME} in {peft_dir!r}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot read adapter config: {e}") from e
    modules, rslora = parse_config(cfg, len(model.layers), peft_dir)

    raw: dict = {}
    unexpected = []
    try:
        with safe_open(w_path, framework="pt", device="cpu") as f:
            for k in f.keys():
                key = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
                m = _KEY_RE.match(key)
                if m is None:
                    unexpected.append(k)
                    continue
                mm = _MODULE_RE.match(m.group("module"))
                if mm is None or mm.group("name") not in TARGET_MODULES or MODULE_PARENT[mm.group("name")] != mm.group("parent"):
                    raise ValueError(
                        f"{w_path}: LoRA weights on unsupported module {m.group('module')!r}; "
                        f"supported: {list(TARGET_MODULES)} of the decoder layers"
                    )
                mk = (int(mm.group("layer")), mm.group("name"))
                if mk in raw and m.group("kind") in raw[mk]:
                    raise ValueError(f"{w_path}: two tensors for {k} (several adapter names in one file?)")
                raw.setdefault(mk, {})[m.group("kind")] = f.get_tensor(k)
    except ValueError:
        raise
    except Exception as e:  # corrupt file: safetensors raises its own error types
        raise ValueError(f"{w_path}: cannot read safetensors file: {e}") from e
    if unexpected:
        raise ValueError(
            f"{w_path}: unexpected tensors {sorted(unexpected)[:5]} (only lora_A / lora_B weights are supported; "
            f"no modules_to_save, DoRA magnitudes, LoRA biases or embedding LoRA)"
        )
    extra = sorted(set(raw) - set(modules))
    if extra:
        l, n = extra[0]
        raise ValueError(
            f"{w_path}: holds LoRA weights for {module_key(l, n)!r}, which is outside this model or not "
            f"selected by adapter_config.json (target_modules / layers_to_transform / exclude_modules)"
        )
    missing = sorted(k for k in modules if set(raw.get(k, {})) != {"lora_A", "lora_B"})
    if missing:
        l, n = missing[0]
        raise ValueError(f"{w_path}: missing lora_A / lora_B weights for targeted module {module_key(l, n)!r}")
    weights = {}
    for (l, n), (r, _) in sorted(modules.items()):
        fin, fout = model.module_shapes[n]
        A, B = raw[(l, n)]["lora_A"], raw[(l, n)]["lora_B"]
        if tuple(A.shape) != (r, fin) or tuple(B.shape) != (fout, r):
            raise ValueError(
                f"{w_path}: {module_key(l, n)} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                f"expected ({r}, {fin}) and ({fout}, {r}) for rank {r} on this model"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise ValueError(f"{w_path}: {module_key(l, n)} weights must be floating point")
        for kind, t in (("lora_A", A), ("lora_B", B)):
            t32 = t.float()
            if not torch.isfinite(t32).all():
                raise ValueError(f"{w_path}: {module_key(l, n)}.{kind} holds NaN or infinite values")
            peak = float(t32.abs().max()) if t32.numel() else 0.0
            if peak > MAX_LORA_ABS:
                raise ValueError(f"{w_path}: {module_key(l, n)}.{kind} holds a value of magnitude {peak:.3g}, "
                                 f"beyond {MAX_LORA_ABS:g}: not a trained LoRA (corrupt or tampered?)")
        weights[(l, n)] = (A.to(model.device, model.dtype), B.to(model.device, model.dtype))
    info = AdapterInfo(name=name, modules=modules, use_rslora=rslora, config=cfg, source=peft_dir)
    return info, weights


# ----------------------------------------------------------------------------- stacks


def _resident_weights(model, info: AdapterInfo) -> dict:
    """{(layer, name): (A [r, in], B [out, r])} views of a resident adapter's slot, unpadded."""
    slot = model.adapter_slots[info.name]
    out = {}
    for (l, n), (r, _) in info.modules.items():
        st = model.resident_adapters.layers[l].stacks[n]
        out[(l, n)] = (st.lora_a[slot, :r], st.lora_b[slot, :, :r])
    return out


def _build_stacks(model, entries: list) -> list[dict]:
    """entries: [(AdapterInfo, weights)] in slot order -> per-layer {name: LoRAStack}."""

    L = len(entries)
    stacks = [dict() for _ in model.layers]
    for l in range(len(model.layers)):
        for _, _, mods in model.groups.values():
            # the A's of a merged projection's modules share one tensor [L, sum of r_max, in]
            # (each module's stack a view of its rows), so the engine shrinks them in one call
            r_max = {}
            for n, _, _ in mods:
                ranks = [info.modules[(l, n)][0] for info, _ in entries if (l, n) in info.modules]
                if ranks:
                    r_max[n] = max(ranks)
            if not r_max:
                continue
            fin = model.module_shapes[next(iter(r_max))][0]
            a_all = torch.zeros(L, sum(r_max.values()), fin, dtype=model.dtype, device=model.device)
            off = 0
            for n, r_n in r_max.items():
                a = a_all[:, off : off + r_n]
                off += r_n
                b = torch.zeros(L, model.module_shapes[n][1], r_n, dtype=model.dtype, device=model.device)
                s = torch.zeros(L, dtype=torch.float32, device=model.device)
                for slot, (info, w) in enumerate(entries):
                    if (l, n) not in info.modules:
                        continue
                    A, B = w[(l, n)]
                    r = A.shape[0]
                    a[slot, :r].copy_(A)
                    b[slot, :, :r].copy_(B)
                    s[slot] = info.scaling((l, n))
                stacks[l][n] = LoRAStack(a, b, s)
    return stacks


def _check_model(model) -> None:
    reg = model.adapter_infos
    if model.num_lora_slots != len(model.adapter_slots) or set(reg) != set(model.adapter_slots):
        raise ValueError(
            "the LoRA stacks were set with set_lora_stacks directly (slots without named adapters); "
            "clear them with set_lora_stacks([{}] * num_layers, 0) before loading adapters by name"
        )


def _swap(model, entries: list, stacks: Optional[list] = None) -> None:
    stacks = _build_stacks(model, entries) if stacks is None else stacks
    slots = {info.name: i for i, (info, _) in enumerate(entries)}
    model.set_lora_stacks(stacks, len(entries), adapter_slots=slots, infos={info.name: info for info, _ in entries})


def _ordered(model) -> list:
    reg = model.adapter_infos
    return [reg[n] for n in sorted(model.adapter_slots, key=model.adapter_slots.get)]


@dataclass
class PreparedAdapter:
    """A read and checked adapter with the stacks that hold it beside the resident ones
    (`basis`: their AdapterInfos in slot order): what prepare_adapter builds and
    commit_adapter swaps in."""

    info: AdapterInfo
    weights: dict
    basis: tuple
    entries: list
    stacks: list


def _check_new_name(model, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    _check_model(model)
    if name in model.adapter_slots:
        raise ValueError(f"adapter {name!r} is already loaded; unload it first (loaded: {model.adapters})")


def prepare_adapter(model, peft_dir, name: str) -> PreparedAdapter:
    """The slow part of load_adapter (read the files, check them, build the new stacks)
    without changing the model, so a server can run it beside forward passes and swap
    the result in between two of them with commit_adapter."""
    _check_new_name(model, name)
    info, weights = read_adapter(model, peft_dir, name)
    resident = _ordered(model)
    entries = [(i, _resident_weights(model, i)) for i in resident] + [(info, weights)]
    return PreparedAdapter(info, weights, tuple(resident), entries, _build_stacks(model, entries))


def commit_adapter(model, prepared: PreparedAdapter) -> None:
    """Swap a prepared adapter in (fast: the stacks are built). If the resident adapters
    changed since prepare_adapter, the stacks are rebuilt from the current ones."""
    _check_new_name(model, prepared.info.name)
    resident = _ordered(model)
    # the same AdapterInfo objects: a name unloaded and loaded again meanwhile is a new one
    if len(resident) == len(prepared.basis) and all(a is b for a, b in zip(resident, prepared.basis)):
        _swap(model, prepared.entries, prepared.stacks)
    else:
        _swap(model, [(i, _resident_weights(model, i)) for i in resident] + [(prepared.info, prepared.weights)])


def load_adapter(model, peft_dir, name: str) -> None:
    commit_adapter(model, prepare_adapter(model, peft_dir, name))


def unload_adapter(model, name: str) -> None:
    _check_model(model)
    if name not in model.adapter_slots:
        raise ValueError(f"unknown adapter {name!r}; loaded: {model.adapters}")
    entries = [(i, _resident_weights(model, i)) for i in _ordered(model) if i.name != name]
    _swap(model, entries)


# ----------------------------------------------------------------------------- save


def _common(values: list):
    """The most frequent value (ties: the first seen)."""
    return Counter(values).most_common(1)[0][0]


def _patterns(values: dict, default) -> dict:
    """{(layer, name): v} -> PEFT pattern dict for the entries != default: the short module
    name when every layer of that module shares the value, else full module keys."""
    out = {}
    for n in TARGET_MODULES:
        per = {k: v for k, v in values.items() if k[1] == n}
        if not per:
            continue
        vals = set(per.values())
        if vals == {default}:
            continue
        if len(vals) == 1:
            out[n] = next(iter(vals))
        else:
            out.update({module_key(l, nn): v for (l, nn), v in sorted(per.items()) if v != default})
    return out


def save_adapter(model, name: str, out_dir) -> None:
    reg = model.adapter_infos
    if name not in model.adapter_slots or name not in reg:
        raise ValueError(f"unknown adapter {name!r}; loaded: {model.adapters}")
    info = reg[name]
    write_adapter(out_dir, _resident_weights(model, info), info.modules, len(model.layers), info.use_rslora,
                  info.config)


def write_adapter(out_dir, weights: dict, modules: dict, num_layers: int, use_rslora: bool = False,
                  config: Optional[dict] = None) -> None:
    """Write a PEFT LoRA directory. weights {(layer, name): (A [r, in], B [out, r])}, modules
    {(layer, name): (rank, alpha)}; config: extra adapter_config.json fields to keep (e.g.
    base_model_name_or_path, lora_dropout). Every module is written at its own rank."""
    from safetensors.torch import save_file

    tensors = {}
    for (l, n), (A, B) in sorted(weights.items()):
        p = f"base_model.model.{module_key(l, n)}."
        tensors[p + "lora_A.weight"] = A.detach().to("cpu").contiguous().clone()
        tensors[p + "lora_B.weight"] = B.detach().to("cpu").contiguous().clone()
    keys = set(modules)
    layers = sorted({l for l, _ in keys})
    names = [n for n in TARGET_MODULES if any(k[1] == n for k in keys)]
    if keys == {(l, n) for l in layers for n in names}:
        target_modules = names
        layers_to_transform = None if len(layers) == num_layers else layers
    else:  # an irregular subset: name every module by its full key
        target_modules = [module_key(l, n) for l, n in sorted(keys)]
        layers_to_transform = None
    ranks = {k: v[0] for k, v in modules.items()}
    alphas = {k: v[1] for k, v in modules.items()}
    r, alpha = _common(list(ranks.values())), _common(list(alphas.values()))
    cfg = {k: v for k, v in (config or {}).items() if k not in _HANDLED}
    cfg.setdefault("peft_type", "LORA")
    cfg.setdefault("task_type", "CAUSAL_LM")
    cfg.update(
        r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=target_modules,
        exclude_modules=None, layers_to_transform=layers_to_transform, layers_pattern=None,
        rank_pattern=_patterns(ranks, r), alpha_pattern=_patterns(alphas, alpha),
        bias="none", use_dora=False, fan_in_fan_out=False, modules_to_save=None, inference_mode=True,
    )  # fmt: skip
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # each file is written beside and renamed into place: a crash or a full disk never
    # leaves a truncated one (the weights first: a config never names weights not yet there)
    weights_path = os.path.join(out_dir, WEIGHTS_NAME)
    save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
    os.replace(weights_path + ".tmp", weights_path)
    write_json(os.path.join(out_dir, CONFIG_NAME), cfg, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- memory


def adapter_nbytes(model, name: str, padded: bool = False) -> int:
    """Bytes of one resident adapter. padded=False: its own weights at their true ranks
    (r * (in + out) elements per module, what save_adapter writes). padded=True: its whole
    slot in every stack, zero padding and zero modules included, plus its fp32 scalings;
    summed over all adapters this equals lora_nbytes(model)."""
    reg = model.adapter_infos
    if name not in model.adapter_slots or name not in reg:
        raise ValueError(f"unknown adapter {name!r}; loaded: {model.adapters}")
    el = torch.tensor([], dtype=model.dtype).element_size()
    if not padded:
        return sum(r * sum(model.module_shapes[n]) * el for (l, n), (r, _) in reg[name].modules.items())
    total = 0
    for layer in model.resident_adapters.layers:
        for st in layer.stacks.values():
            total += (st.lora_a[0].numel() + st.lora_b[0].numel()) * el + 4
    return total


def lora_nbytes(model) -> int:
    """Bytes held by all LoRA stacks of the model (every slot, padding included)."""
    return sum(
        t.numel() * t.element_size()
        for layer in model.resident_adapters.layers
        for st in layer.stacks.values()
        for t in (st.lora_a, st.lora_b, st.scaling)
    )
