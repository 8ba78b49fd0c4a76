"""What a pretrained checkpoint's ``config.json`` means in longseq's terms: the Llama-family configs that
the native :class:`~longseq.models.TransformerLM` can represent, mapped onto a
:class:`~longseq.models.TransformerConfig`, and one clear error for anything it cannot represent, raised
before any weight is read.

Supported ``model_type`` s: ``llama`` (incl. Llama 3's RoPE scaling), ``mistral``, ``qwen2``, ``qwen3``.
Both ways transformers writes RoPE settings are read: ``rope_theta`` + ``rope_scaling`` (4.x) and
``rope_parameters`` (5.x).
"""

from __future__ import annotations

from typing import Any

from ..models.config import TransformerConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The checkpoint uses something the native Transformer cannot represent (the message names the field)."""


def _field(hf: dict[str, Any], name: str, default: Any = None) -> Any:
    value = hf.get(name, default)
    return default if value is None else value


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields of the native config from either layout of the HF config."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = {**scaling, **params}
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind == "llama3":
        return {
            "rope_theta": float(theta), "rope_scaling": "llama3", "rope_factor": float(merged["factor"]),
            "rope_low_freq_factor": float(merged["low_freq_factor"]),
            "rope_high_freq_factor": float(merged["high_freq_factor"]),
            "rope_original_max_len": int(merged["original_max_position_embeddings"]),
        }
    where = "rope_parameters.rope_type" if params else "rope_scaling.rope_type"
    raise UnsupportedModelError(f"{where}={kind!r} is not supported (longseq implements 'default' and 'llama3' RoPE)")


def _check_unsupported(hf: dict[str, Any], family: str) -> None:
    act = _field(hf, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (longseq's MLP is SwiGLU: 'silu')")
    # A Mistral config without the key gets HF's MistralConfig default (a 4,096-token window).
    window = hf.get("sliding_window", 4096 if family == "mistral" else None)
    uses_window = hf.get("use_sliding_window", family == "mistral")  # Qwen configs carry a flag; Mistral does not
    max_len = hf.get("max_position_embeddings")
    if window is not None and uses_window and (max_len is None or window < max_len):
        raise UnsupportedModelError(
            f"sliding_window={window} is not supported: longseq's attention layers see every earlier token "
            f"(bound the cache with a policy such as Window({window}) instead)"
        )
    types = set(hf.get("layer_types") or [])
    if types - {"full_attention"}:
        raise UnsupportedModelError(f"layer_types={sorted(types)} is not supported (only 'full_attention' layers)")
    if hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping"):
        raise UnsupportedModelError(
            "logit soft-capping (attn_logit_softcapping / final_logit_softcapping) is not supported"
        )


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """The native config of a Llama / Mistral / Qwen2 / Qwen3 ``config.json`` (as a dict).

    Raises :class:`UnsupportedModelError` naming the field for anything the native Transformer cannot
    represent (another architecture, sliding-window attention, an unknown RoPE scaling, another
    activation)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedModelError(f"model_type={family!r} is not supported; longseq converts {list(FAMILIES)}")
    _check_unsupported(hf, family)
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    default_head_dim = 128 if family == "qwen3" else d // heads  # HF's Qwen3Config default is 128
    attention_bias = bool(_field(hf, "attention_bias", False))
    fields: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(_field(hf, "num_key_value_heads", heads)), mlp_hidden=int(hf["intermediate_size"]),
        norm_eps=float(_field(hf, "rms_norm_eps", 1e-6)), head_dim=int(_field(hf, "head_dim", default_head_dim)),
        tie_embeddings=bool(_field(hf, "tie_word_embeddings", False)),
        init_std=float(_field(hf, "initializer_range", 0.02)),
        qkv_bias=attention_bias or family == "qwen2", out_bias=attention_bias,
        mlp_bias=bool(_field(hf, "mlp_bias", False)), qk_norm=family == "qwen3",
        **_rope(hf),
    )
    return TransformerConfig(**fields)
