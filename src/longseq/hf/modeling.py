"""longseq models as transformers ``PreTrainedModel`` s (``AutoModelForCausalLM`` loading, ``generate``).

:class:`LongseqForCausalLM` wraps any longseq :class:`~longseq.models.LanguageModel` (Transformer, GLA,
MEGABYTE) built from a :class:`LongseqHFConfig`. Its ``forward(input_ids)`` returns a
``CausalLMOutputWithPast`` with ``logits [B, T, vocab]``.

Generation passes the longseq recurrent state through ``past_key_values``: a :class:`LongseqStateCache` holds
the ``ModelState`` of ``init_state`` / ``step``, so each ``generate`` step feeds only the new token (the
model's own O(1)-per-token recurrent decode, with GLA's fixed-size state or a bounded KV cache). Without a
cache argument the first forward creates one (policy ``Full()``); pass
``past_key_values=LongseqStateCache(TOVA(512))`` to bound a Transformer's cache. Limits: no padding (longseq
states have one position per batch), no beam search or assisted decoding (the state cannot be reordered or
rolled back).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache.policies import CachePolicy, parse_policy
from ..models import MODELS, ModelConfig, config_class, model_from_config
from ..tokenizer import BYTES, TOKENIZER_DIR, load_tokenizer
from ._deps import require_transformers
from .io import ARCHITECTURE, AUTO_MAP, MODEL_TYPE, PREFIX, REMOTE_CODE, tied_aliases, write_folder

require_transformers()

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402


class LongseqHFConfig(PretrainedConfig):
    """HF config of a longseq model: the model kind and longseq's own config dict, verbatim.

    ``longseq_kind``: ``"transformer"``, ``"gla"`` or ``"megabyte"``; ``longseq_config``: the kind's config
    fields (``ModelConfig.to_dict()``). ``vocab_size`` and ``tie_word_embeddings`` mirror them for HF.
    """

    model_type = MODEL_TYPE

    def __init__(
        self, longseq_kind: str = "transformer", longseq_config: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if longseq_kind not in MODELS:
            raise ValueError(f"unknown longseq_kind {longseq_kind!r}; choose one of {sorted(MODELS)}")
        self.longseq_kind = longseq_kind
        self.longseq_config = dict(longseq_config or {})
        cfg = self.to_longseq()  # validates now, not at model construction
        self.longseq_config = cfg.to_dict()
        kwargs["vocab_size"] = cfg.vocab_size
        kwargs["tie_word_embeddings"] = bool(cfg.tie_embeddings)
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoConfig") -> None:
        """Not recorded: transformers calls this when a folder is loaded with ``trust_remote_code``, and a
        recorded class makes every later ``save_pretrained`` copy its source file, which lives in longseq, not
        in the folder (its relative imports cannot be copied). ``LongseqForCausalLM.save_pretrained`` writes the
        folder's own two re-export modules instead."""

    def to_longseq(self) -> ModelConfig:
        """The longseq config dataclass this HF config describes."""
        return config_class(self.longseq_kind).from_dict(self.longseq_config)

    @classmethod
    def from_longseq(cls, cfg: ModelConfig, **kwargs: Any) -> LongseqHFConfig:
        return cls(longseq_kind=cfg.kind, longseq_config=cfg.to_dict(), **kwargs)


class LongseqStateCache(Cache):
    """``past_key_values`` of :class:`LongseqForCausalLM`: the longseq ``ModelState`` plus the token count.

    ``policy`` bounds the attention layers' KV caches (a CachePolicy or a spec like ``"tova:512"``); None
    keeps the model's default (``Full()`` for attention, nothing for GLA).
    """

    def __init__(self, policy: CachePolicy | str | None = None) -> None:
        super().__init__(layers=[])
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        self.state: Any = None
        self.seen = 0

    def __repr__(self) -> str:
        return f"LongseqStateCache({self.policy}, seen={self.seen})"

    def step(self, lm: torch.nn.Module, input_ids: Tensor) -> Tensor:
        """Feed ``input_ids [B, T]`` through ``lm.step``; returns ``[B, T, vocab]`` logits."""
        if self.state is None:
            kwargs = {} if self.policy is None else {"cache": self.policy}
            self.state = lm.init_state(input_ids.shape[0], **kwargs)  # type: ignore[operator]
        logits, self.state = lm.step(input_ids, self.state)  # type: ignore[operator]
        self.seen += input_ids.shape[1]
        return logits

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back (generate must not defer its stop check)

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def _unsupported(self, what: str) -> None:
        raise NotImplementedError(
            f"a longseq recurrent state cannot be {what} (no beam search / assisted decoding)"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("reordered")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._unsupported("repeated")

    def batch_select_indices(self, indices: Tensor) -> None:
        self._unsupported("row-selected")


class LongseqForCausalLM(PreTrainedModel, GenerationMixin):
    """A longseq language model behind the transformers ``PreTrainedModel`` API.

    ``self.lm`` is the longseq model; weights are named ``lm.<longseq name>``.
    """

    config_class = LongseqHFConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: LongseqHFConfig) -> None:
        super().__init__(config)
        self.lm = model_from_config(config.to_longseq())
        # Which weights are tied depends on the kind (MEGABYTE ties its head to the *local* embedding);
        # tell HF, so loading re-ties instead of reporting a missing weight.
        self._tied_weights_keys = {PREFIX + a: PREFIX + s for a, s in tied_aliases(self.lm).items()}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """longseq's constructors initialise their own weights; HF must not re-initialise them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: forward makes a LongseqStateCache itself

    @classmethod
    def from_longseq(cls, model: torch.nn.Module) -> LongseqForCausalLM:
        """Wrap an existing longseq model (shares its parameters and its tokenizer)."""
        wrapped = cls(LongseqHFConfig.from_longseq(model.config))  # type: ignore[arg-type]
        wrapped.lm = model  # type: ignore[assignment]
        return wrapped.to(next(model.parameters()).device).eval()

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModelForCausalLM") -> None:
        """Not recorded (see :meth:`LongseqHFConfig.register_for_auto_class`)."""

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """HF's ``save_pretrained``, plus what :func:`~longseq.hf.save_hf` also writes: the tokenizer (its kind in
        ``config.json`` as ``longseq_tokenizer``, its files in ``tokenizer/`` unless it is bytes), so ``load_hf``
        / ``open_model`` / ``from_pretrained`` give the model back with its tokenizer, and the two modules
        ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` imports."""
        tokenizer = self.lm.tokenizer
        main = kwargs.get("is_main_process", True)
        if tokenizer.kind != BYTES.kind and main:
            # First, so a tokenizer that cannot be saved fails before any file is written.
            write_folder(Path(save_directory) / TOKENIZER_DIR, tokenizer.save)
        self.config.longseq_tokenizer = tokenizer.kind
        self.config.auto_map = AUTO_MAP
        super().save_pretrained(save_directory, *args, **kwargs)
        if main:
            for name, text in REMOTE_CODE.items():
                (Path(save_directory) / name).write_text(text)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """HF's ``from_pretrained``; a local folder's longseq tokenizer (``tokenizer/``, see
        :meth:`save_pretrained`) becomes ``model.lm.tokenizer``."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        kind = getattr(model.config, "longseq_tokenizer", BYTES.kind)
        folder = Path(str(pretrained_model_name_or_path)) / TOKENIZER_DIR
        if kind != BYTES.kind and folder.is_dir():
            model.lm.tokenizer = load_tokenizer(kind, folder)
        return model

    def get_input_embeddings(self) -> torch.nn.Module:
        # MEGABYTE embeds bytes twice (global and local); the global embedding is its input embedding.
        return self.lm.embed if hasattr(self.lm, "embed") else self.lm.global_embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: LongseqStateCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab]`` (``logits[:, i]`` predicts token ``i + 1``).

        With ``past_key_values`` (or ``use_cache``), the tokens continue the state it holds.
        ``labels [B, T]`` gives the mean next-token loss (``-100`` ignored), as in HF causal LMs.
        """
        if inputs_embeds is not None or input_ids is None:
            raise NotImplementedError(
                "LongseqForCausalLM takes input_ids (longseq models embed their own tokens)"
            )
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("LongseqForCausalLM does not support padding: run rows separately")
        if past_key_values is not None and not isinstance(past_key_values, LongseqStateCache):
            raise TypeError(
                f"past_key_values must be a LongseqStateCache; got {type(past_key_values).__name__}"
            )
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        if past_key_values is None and use_cache:
            past_key_values = LongseqStateCache()
        if past_key_values is not None:
            logits = past_key_values.step(self.lm, input_ids)
        else:
            logits = self.lm(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


def register() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load longseq folders without ``trust_remote_code``."""
    AutoConfig.register(MODEL_TYPE, LongseqHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(LongseqHFConfig, LongseqForCausalLM, exist_ok=True)
