"""Import published MDLM checkpoints (MDLM-OWT, and the SDTT / Duo students on the same backbone) exactly.

Sources understood (see `shared/reference/mdlm-checkpoint-format.md` for the layout):

- an HF MDLM folder or Hub id (`kuleshov-group/mdlm-owt`): `config.json` with `model_type: "mdlm"` and
  `model.safetensors` (or a sharded `model.safetensors.index.json`), keys prefixed `backbone.`;
- a raw state dict file: `.safetensors`, or `.bin` / `.pt` / `.pth` / `.ckpt` read with
  `torch.load(weights_only=True)` only (no arbitrary pickles). Keys with or without the `backbone.` prefix; a
  Lightning checkpoint nests them under `state_dict`. The architecture values that the weights do not record
  (`num_attention_heads` when there is no `rotary_emb.inv_freq`, `time_conditioning`) must be passed explicitly.

Every parameter of the target model must come from the source with the same shape; a mismatch raises naming the key
and both shapes, and source keys that have no place are reported (an error unless `strict=False`).

EMA: MDLM's Lightning checkpoints keep the exponential moving average (the weights MDLM evaluates with) beside the
raw weights, as `ema.shadow_params`, a list in the backbone's parameter order. By default it is used when present
(`use_ema=None`); `use_ema=False` takes the raw weights and `use_ema=True` requires the EMA. HF folders hold one set.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..configuration_mcd import MaskedDiffusionLMConfig
from ..hub import hub_errors_as_unreachable
from ..modeling_mcd import MaskedDiffusionLM


logger = logging.getLogger(__name__)

# MDLM's config.json field -> MaskedDiffusionLMConfig field.
MDLM_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_dim": "hidden_size",
    "n_blocks": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "cond_dim": "cond_dim",
    "model_length": "max_position_embeddings",
    "dropout": "dropout",
    "time_conditioning": "time_conditioning",
}
REQUIRED_MDLM_FIELDS = ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim")
# The only key whose name differs: MDLM keeps the embedding as a bare parameter, mcd_hf as an nn.Embedding.
RENAMED_KEYS = {"vocab_embed.embedding": "vocab_embed.weight"}
ROTARY_KEY = "rotary_emb.inv_freq"
RAW_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def convert_mdlm_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    strict: bool = True,
    use_ema: bool | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> MaskedDiffusionLM:
    """Converts an MDLM checkpoint to a [`MaskedDiffusionLM`] with identical logits.

    Args:
        source (`str` or `os.PathLike`):
            A local HF MDLM folder, a Hub repo id (e.g. `"kuleshov-group/mdlm-owt"`), or a raw state dict file.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where to write the result: the model alone (`save_pretrained`), or, when `tokenizer` is given, a full
            `MCDPipeline` folder (model, log-linear `MaskedDualityScheduler`, tokenizer, model card).
        tokenizer (tokenizer, `str` or `os.PathLike`, *optional*):
            The source's tokenizer (GPT-2's for the OWT models), or a path / Hub id to load it from. A `[MASK]`
            token is added to a copy when missing; it must land on the model's mask id.
        strict (`bool`, defaults to `True`):
            Raise on source keys that have no place in the model; with `False` they are listed in a warning.
        use_ema (`bool`, *optional*):
            For Lightning checkpoints: `None` uses the EMA weights when present, `True` requires them, `False`
            ignores them.
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) for a Hub id.
        dtype (`torch.dtype`, *optional*):
            Dtype of the returned (and written) model; float32 by default, as the published weights.
        **config_overrides:
            `MaskedDiffusionLMConfig` fields. Needed for raw files (`time_conditioning`, and `num_attention_heads`
            when the file has no rotary buffer); for folders they replace the values from `config.json` (e.g.
            `max_position_embeddings`, `attn_implementation`). Shapes are still checked against the weights.

    Returns:
        [`MaskedDiffusionLM`] in eval mode.

    Raises:
        ValueError: a bad source, a missing or mismatched key, unknown keys with `strict=True`, an inconsistent
            mask id or vocabulary.
        HubUnreachableError: `source` is a Hub id and the Hub cannot be reached.
    """
    state_dict, mdlm_config, ema = _load_source(source, revision)
    state_dict = _strip_prefixes(state_dict)

    attn_implementation = config_overrides.pop("attn_implementation", None)
    if mdlm_config is not None:
        config_values = mdlm_config_to_config_values(mdlm_config)
    else:
        config_values = _infer_config_values(state_dict)
        missing = [name for name in ("time_conditioning", "num_attention_heads")
                   if name not in config_values and name not in config_overrides]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} must be given for a raw state dict (the weights do not record "
                f"{'them' if len(missing) > 1 else 'it'}), e.g. convert_mdlm_checkpoint(path, "
                "num_attention_heads=12, time_conditioning=False)"
            )
    config_values.update(config_overrides)
    config = MaskedDiffusionLMConfig(**config_values)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    model = MaskedDiffusionLM(config)
    state_dict = _select_ema(state_dict, ema, use_ema, model)
    model.load_state_dict(mdlm_state_dict_to_mcd(state_dict, model, strict=strict))
    model.eval()
    if dtype is not None:
        model.to(dtype)

    if output_dir is not None:
        if tokenizer is None:
            model.save_pretrained(output_dir)
        else:
            _save_pipeline(model, _prepare_tokenizer(tokenizer, config, revision), output_dir, source)
    return model


def mdlm_config_to_config_values(mdlm_config: dict[str, Any]) -> dict[str, Any]:
    """Maps an MDLM `config.json` dict to `MaskedDiffusionLMConfig` keyword arguments."""
    model_type = mdlm_config.get("model_type")
    if model_type not in (None, "mdlm"):
        raise ValueError(f"source config.json: expected model_type 'mdlm', got {model_type!r}")
    missing = [name for name in REQUIRED_MDLM_FIELDS if name not in mdlm_config]
    if missing:
        raise ValueError(f"source config.json lacks the MDLM fields {missing}")
    values = {ours: mdlm_config[theirs] for theirs, ours in MDLM_CONFIG_FIELDS.items() if theirs in mdlm_config}
    values["time_conditioning"] = bool(values.get("time_conditioning", False))
    # MDLM appends [MASK] as the last id; a config that names it explicitly is honoured (and checked).
    for name in ("mask_token_id", "mask_index"):
        if name in mdlm_config:
            values["mask_token_id"] = mdlm_config[name]
    return values


def mdlm_state_dict_to_mcd(
    state_dict: dict[str, torch.Tensor], model: MaskedDiffusionLM, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Maps an MDLM backbone state dict (no prefix) to `model`'s keys, checking every key and shape.

    Args:
        state_dict: MDLM keys (`vocab_embed.embedding`, `blocks.0.attn_qkv.weight`, ...) without `backbone.`.
        model: the target model; its config fixes the expected shapes.
        strict: raise on unknown source keys (else warn listing them).

    Returns:
        A state dict with `model`'s keys, ready for `model.load_state_dict`.
    """
    target_state = model.state_dict()
    # A noise-conditioned model (issue 10) may be built from a plain checkpoint: its zero-initialised shadow
    # embedding keeps its initial values, so the converted model still computes the source's function.
    kept = {name: tensor for name, tensor in target_state.items() if name.startswith("shadow_embed.")}
    target_shapes = {name: tuple(tensor.shape) for name, tensor in target_state.items() if name not in kept}
    source_names = {RENAMED_KEYS.get(name, name): name for name in state_dict}  # target name -> source name
    inverse = {target: source for source, target in RENAMED_KEYS.items()}

    missing = sorted(inverse.get(name, name) for name in target_shapes if name not in source_names)
    if missing:
        raise ValueError(f"the source lacks {len(missing)} weight(s) the model needs: {missing}")
    mismatched = [
        f"{source_names[name]}: source {tuple(state_dict[source_names[name]].shape)} vs expected {shape}"
        for name, shape in target_shapes.items()
        if tuple(state_dict[source_names[name]].shape) != shape
    ]
    if mismatched:
        raise ValueError("shape mismatch (check the config values): " + "; ".join(mismatched))

    extra = sorted(name for name in state_dict if RENAMED_KEYS.get(name, name) not in target_shapes)
    if ROTARY_KEY in extra:
        _check_rotary(state_dict[ROTARY_KEY], model.config)
        extra.remove(ROTARY_KEY)
    if extra:
        message = f"the source has {len(extra)} key(s) with no place in MaskedDiffusionLM: {extra}"
        if strict:
            raise ValueError(message + " (pass strict=False to convert anyway)")
        warnings.warn(message + "; they were ignored (strict=False)", UserWarning, stacklevel=3)

    return {**{name: state_dict[source_names[name]] for name in target_shapes}, **kept}


def _check_rotary(inv_freq: torch.Tensor, config: MaskedDiffusionLMConfig) -> None:
    """The rotary buffer is recomputed by the model; the source's must agree with the config."""
    head_dim = config.head_dim
    expected = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if tuple(inv_freq.shape) != tuple(expected.shape):
        raise ValueError(
            f"shape mismatch: {ROTARY_KEY}: source {tuple(inv_freq.shape)} vs expected {tuple(expected.shape)} "
            f"(head_dim {head_dim} = hidden_size / num_attention_heads; check num_attention_heads)"
        )
    if not torch.allclose(inv_freq.double(), expected, rtol=1e-4, atol=0):
        raise ValueError(f"{ROTARY_KEY} does not match rope_theta={config.rope_theta}; pass the source's rope_theta")


def _infer_config_values(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture values readable from the weights of a raw state dict."""
    for key in ("vocab_embed.embedding", "sigma_map.mlp.0.weight", "blocks.0.mlp.0.weight"):
        if key not in state_dict:
            raise ValueError(
                f"the source is not an MDLM backbone state dict: no {key!r} among {sorted(state_dict)[:8]}..."
            )
    vocab_size, hidden_size = state_dict["vocab_embed.embedding"].shape
    values = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "cond_dim": state_dict["sigma_map.mlp.0.weight"].shape[0],
        "intermediate_size": state_dict["blocks.0.mlp.0.weight"].shape[0],
        "num_hidden_layers": len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")}),
    }
    if ROTARY_KEY in state_dict:
        values["num_attention_heads"] = hidden_size // (2 * state_dict[ROTARY_KEY].numel())
    return values


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops `backbone.` (HF wrapper, Lightning) and `_orig_mod.` (torch.compile) when they prefix the backbone keys.

    Keys outside the backbone (e.g. a Lightning module's other children) keep their names and are reported later.
    """
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {key.removeprefix("backbone."): value for key, value in state_dict.items()}
    if any(key.startswith("_orig_mod.") for key in state_dict):
        state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
    return state_dict


def _select_ema(
    state_dict: dict[str, torch.Tensor], ema: dict | None, use_ema: bool | None, model: MaskedDiffusionLM
) -> dict[str, torch.Tensor]:
    """Returns `state_dict` with the EMA weights in place of the raw ones when they are present and wanted."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if use_ema is True and shadow is None:
        raise ValueError("use_ema=True but the source holds no EMA weights (no 'ema.shadow_params')")
    if use_ema is False or shadow is None:
        return state_dict
    # MDLM's EMA list follows `backbone.parameters()`, i.e. module registration order, which MaskedDiffusionLM
    # reproduces (see the reference's key table); any noise-schedule parameters come after and are ignored.
    inverse = {target: source for source, target in RENAMED_KEYS.items()}
    names = [inverse.get(name, name) for name, _ in model.named_parameters()]
    if len(shadow) < len(names):
        raise ValueError(f"ema.shadow_params holds {len(shadow)} tensors, fewer than the {len(names)} model weights")
    ema_state = dict(state_dict)
    for name, tensor in zip(names, shadow):
        raw_shape = tuple(state_dict[name].shape) if name in state_dict else None
        if raw_shape != tuple(tensor.shape):
            raise ValueError(
                f"ema.shadow_params does not follow the backbone's order: {name}: raw {raw_shape} vs EMA "
                f"{tuple(tensor.shape)} (pass use_ema=False to use the raw weights)"
            )
        ema_state[name] = tensor
    logger.info("Using the EMA weights of the checkpoint (pass use_ema=False for the raw weights).")
    return ema_state


def _load_source(source: str | os.PathLike, revision: str | None) -> tuple[dict, dict | None, dict | None]:
    """Returns (state dict, MDLM config dict or None for a raw file, EMA dict or None)."""
    path = Path(source)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        if not path.name.endswith(RAW_SUFFIXES):
            raise ValueError(f"source: {str(source)!r} is a file but not a state dict ({', '.join(RAW_SUFFIXES)})")
        return _load_raw_file(path)
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(RAW_SUFFIXES):
        from huggingface_hub import snapshot_download

        with hub_errors_as_unreachable(f"download {text!r} from the Hub"):
            folder = snapshot_download(text, revision=revision, allow_patterns=["*.json", "*.safetensors"])
        return _load_folder(Path(folder))
    raise ValueError(f"source: {text!r} is neither an existing folder or file nor a Hub repo id (org/name)")


def _load_folder(folder: Path) -> tuple[dict, dict, None]:
    from safetensors.torch import load_file

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"source: {str(folder)!r} has no config.json (an HF MDLM folder needs one)")
    mdlm_config = json.loads(config_file.read_text())
    index_file = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        state_dict = load_file(folder / "model.safetensors")
    elif index_file.is_file():
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(folder / shard))
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise ValueError(
            f"source: {str(folder)!r} has no model.safetensors (weights load from safetensors only); found {found}"
        )
    return state_dict, mdlm_config, None


def _load_raw_file(path: Path) -> tuple[dict, None, dict | None]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), None, None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError (or RuntimeError) for disallowed objects
        raise ValueError(
            f"source: {str(path)!r} cannot be read with torch.load(weights_only=True), which mcd_hf requires so "
            "that loading runs no code. Lightning checkpoints that store hyper-parameters as objects need their "
            "weights extracted first, on a machine that trusts the file: torch.save({'state_dict': torch.load(path, "
            f"weights_only=False)['state_dict']}}, 'weights.pt'). ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"source: {str(path)!r} holds a {type(checkpoint).__name__}, not a state dict")
    ema = checkpoint.get("ema") if isinstance(checkpoint.get("ema"), dict) else None
    state_dict = checkpoint.get("state_dict", checkpoint)
    tensors = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"source: {str(path)!r} holds no tensors (keys: {sorted(state_dict)[:8]})")
    return tensors, None, ema


def _prepare_tokenizer(tokenizer: Any, config: MaskedDiffusionLMConfig, revision: str | None):
    """Loads the tokenizer if given by name and makes sure its `[MASK]` is the model's mask id."""
    from transformers import AutoTokenizer

    from ..tokenization import ensure_mask_token

    if isinstance(tokenizer, (str, os.PathLike)):
        with hub_errors_as_unreachable(f"load the tokenizer {str(tokenizer)!r}"):
            local = os.path.isdir(tokenizer)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=None if local else revision)
    else:
        tokenizer = copy.deepcopy(tokenizer)  # ensure_mask_token edits in place; the caller's object stays as it was
    tokenizer = ensure_mask_token(tokenizer)
    if tokenizer.mask_token_id != config.mask_token_id:
        raise ValueError(
            f"tokenizer: its mask token has id {tokenizer.mask_token_id} but the model's mask_token_id is "
            f"{config.mask_token_id} (vocab_size {config.vocab_size}, tokenizer size {len(tokenizer)})"
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer: {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}")
    return tokenizer


def _save_pipeline(model: MaskedDiffusionLM, tokenizer: Any, output_dir: str | os.PathLike, source) -> None:
    from ..pipeline_mcd import MCDPipeline
    from ..scheduling_mcd import MaskedDualityScheduler

    scheduler = MaskedDualityScheduler(
        mask_token_id=model.config.mask_token_id, vocab_size=model.config.vocab_size, noise_schedule="loglinear"
    )
    pipeline = MCDPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    card_info = {"method": "mdlm", "converted_from": str(source)}
    if not Path(source).exists():
        card_info["base_model"] = str(source)  # a Hub id: the card links to it
    pipeline.save_pretrained(output_dir, card_info=card_info)
