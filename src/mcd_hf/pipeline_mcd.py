"""MCDPipeline: text generation with a masked diffusion LM, as a diffusers pipeline.

The pipeline owns nothing mathematical: the model gives logits, the scheduler (`MaskedDualityScheduler`) decides what
to reveal and how. The pipeline prepares the masked canvas (unconditional, prefix or infilling), runs the one sampling
loop, and skips forward passes that cannot change anything: a model without time conditioning sees only the tokens,
so while the tokens are unchanged its logits are too (at most min(num_inference_steps, seq_len) calls per batch).

Reference: DESIGN.md section 3; diffusers' LLaDA2Pipeline for the conventions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging

from .cards import CARD_MARKER
from .hub import HubUnreachableError, hub_errors_as_unreachable
from .modeling_mcd import MaskedDiffusionLM
from .scheduling_mcd import MaskedDualityScheduler


logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("text", "ids", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from mcd_hf import MCDPipeline

        >>> pipe = MCDPipeline.from_pretrained("path/to/mcd-student")  # a local folder or a Hub id
        >>> out = pipe(batch_size=4, seq_len=64, generator=torch.Generator().manual_seed(0))
        >>> print(out.texts[0], out.num_model_calls)
        ```
"""


@dataclass
class MCDPipelineOutput(BaseOutput):
    """Output of [`MCDPipeline`].

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            The generated token ids (prompt or given tokens included, no mask left).
        texts (`list[str]`, *optional*):
            The decoded sequences when `output_type="text"`, else `None`.
        num_model_calls (`int`):
            Forward passes of the model actually made for the whole batch.
    """

    sequences: torch.LongTensor
    texts: list[str] | None
    num_model_calls: int


class MCDPipeline(DiffusionPipeline):
    r"""Pipeline for masked diffusion text generation (MDLM, MCD and SDTT students).

    Args:
        model ([`MaskedDiffusionLM`]): the denoiser, logits over `vocab_size` ids for a partially masked sequence.
        scheduler ([`MaskedDualityScheduler`]): the masked sampler (ancestral or shadow).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): encodes prompts and decodes samples; its mask token, when
            it has one, must be the model's `mask_token_id`.
    """

    model_cpu_offload_seq = "model"
    # diffusers saves a component with a default value only when it is listed here.
    _optional_components = ["tokenizer"]
    _callback_tensor_inputs = ["sample", "pred_original_sample", "pred_logits"]

    def __init__(self, model: MaskedDiffusionLM, scheduler: MaskedDualityScheduler, tokenizer: Any = None):
        super().__init__()
        mask_ids = {"model.config.mask_token_id": model.config.mask_token_id,
                    "scheduler.config.mask_token_id": scheduler.config.mask_token_id}
        if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
            mask_ids["tokenizer.mask_token_id"] = tokenizer.mask_token_id
        if len(set(mask_ids.values())) != 1:
            raise ValueError(f"The mask token id must agree between the components, got {mask_ids}.")
        if scheduler.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"scheduler.config.vocab_size ({scheduler.config.vocab_size}) must equal model.config.vocab_size "
                f"({model.config.vocab_size})."
            )
        self.register_modules(model=model, scheduler=scheduler, tokenizer=tokenizer)
        # Free-form facts for the model card (base model, method, training figures); persisted in README.md.
        self.card_info: dict[str, Any] = {}

    @property
    def mask_token_id(self) -> int:
        return self.model.config.mask_token_id

    # ----------------------------------------------------------------------------------------------------------------
    # Inputs

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        input_ids: torch.LongTensor | None,
        batch_size: int,
        seq_len: int,
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        if prompt is not None and input_ids is not None:
            raise ValueError("Pass either `prompt` or `input_ids`, not both.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
        max_len = self.model.config.max_position_embeddings
        if seq_len > max_len:
            raise ValueError(f"`seq_len` ({seq_len}) exceeds the model's max_position_embeddings ({max_len}).")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type == "text" and self.tokenizer is None:
            raise ValueError("`output_type='text'` needs a tokenizer; use output_type='ids' or give a tokenizer.")
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError("`prompt` needs a tokenizer; pass `input_ids` instead.")
            if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
                raise ValueError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.ndim not in (1, 2):
                raise ValueError("`input_ids` must be a 1D or 2D torch.LongTensor.")
            vocab_size = self.model.config.vocab_size
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
                raise ValueError(
                    f"`input_ids` holds ids in [{int(input_ids.min())}, {int(input_ids.max())}], outside the "
                    f"vocabulary [0, {vocab_size})."
                )
            if input_ids.shape[-1] > max_len:
                raise ValueError(f"`input_ids` length {input_ids.shape[-1]} exceeds max_position_embeddings ({max_len}).")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators; expected one per sequence ({batch_size}).")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {unknown}."
                )

    def prepare_canvas(
        self,
        prompt: str | list[str] | None,
        input_ids: torch.LongTensor | None,
        batch_size: int,
        seq_len: int,
        device: torch.device,
    ) -> torch.LongTensor:
        """The starting sequence (B, L): masks everywhere except the prompt prefix or the given (infill) tokens."""
        mask = self.mask_token_id
        if input_ids is not None:
            if input_ids.ndim == 1:
                input_ids = input_ids.unsqueeze(0).expand(batch_size, -1)
            return input_ids.to(device).clone()
        canvas = torch.full((batch_size, seq_len), mask, dtype=torch.long, device=device)
        if prompt is None:
            return canvas
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            raise ValueError(f"`prompt` is a list of {len(prompts)}; expected `batch_size` ({batch_size}) prompts.")
        for row, text in enumerate(prompts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > seq_len:
                raise ValueError(f"`prompt` {row} is {len(ids)} tokens long, longer than `seq_len` ({seq_len}).")
            canvas[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        return canvas

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def _model_logits(self, sample: torch.LongTensor, timestep: torch.Tensor) -> torch.Tensor:
        noise_level = self.scheduler.noise_level(timestep, sample.shape[0]).to(sample.device)
        if not getattr(self.model.config, "noise_conditioning", False):
            return self.model(input_ids=sample, timesteps=noise_level).logits
        # A noise-conditioned student (issue 10) also reads the shadow sampler's noise at this time.
        grid_size = self.model.config.shadow_grid_size
        if grid_size is None:
            raise ValueError("a noise-conditioned model needs `model.config.shadow_grid_size` (its fine time grid).")
        features = self.scheduler.shadow_features(timestep, grid_size).to(sample.device)
        return self.model(input_ids=sample, timesteps=noise_level, shadow_features=features).logits

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        input_ids: torch.LongTensor | None = None,
        batch_size: int = 1,
        seq_len: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MCDPipelineOutput | tuple:
        r"""Generate sequences.

        Args:
            prompt (`str` or `list[str]`, *optional*): prefix conditioning; the prompt tokens are fixed and never masked.
                A list gives one prompt per sequence (its length sets `batch_size`).
            input_ids (`torch.LongTensor` of shape `(seq_len,)` or `(batch_size, seq_len)`, *optional*): a canvas for
                infilling: every mask id is generated, every other token is kept.
            batch_size (`int`): number of sequences (ignored when `prompt` is a list or `input_ids` is 2D).
            seq_len (`int`, *optional*): tokens per sequence; defaults to the model's `max_position_embeddings`.
            num_inference_steps (`int`, *optional*): sampler steps; defaults to the scheduler's recommended count
                (a distilled student stores its own), else the sequence length.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per sequence
                so that each sequence depends only on its own generator.
            temperature, top_k, top_p: applied by the scheduler to the SUBS distribution.
            output_type (`str`): `"text"` (decoded strings and ids), `"ids"` (ids only) or `"latent"` (the final
                token tensor, no decoding).
            return_dict (`bool`): return an [`MCDPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, step_index, timestep,
                callback_kwargs)` after each step; it may return a dict that replaces `sample`. Steps that the
                shadow sampler knows to reveal nothing are skipped whole, callback included.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): the tensors given in `callback_kwargs`,
                among `sample`, `pred_original_sample`, `pred_logits`.

        Returns:
            [`MCDPipelineOutput`] or `tuple` `(sequences, texts, num_model_calls)`.
        """
        if isinstance(prompt, list):
            batch_size = len(prompt)
        if input_ids is not None and isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2:
            batch_size = input_ids.shape[0]
        if input_ids is not None and isinstance(input_ids, torch.Tensor):
            seq_len = input_ids.shape[-1]
        if seq_len is None:
            seq_len = self.model.config.max_position_embeddings
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.config.num_inference_steps or seq_len
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["sample"]
        self.check_inputs(
            prompt, input_ids, batch_size, seq_len, num_inference_steps, generator, output_type,
            callback_on_step_end_tensor_inputs,
        )

        device = self._execution_device
        sample = self.prepare_canvas(prompt, input_ids, batch_size, seq_len, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.scheduler.init_noise(sample, generator=generator)

        # A model without time conditioning sees only the tokens: same tokens, same logits. Not so for a
        # noise-conditioned model: its shadow features count the steps until each reveal, which change with time.
        reuse_unchanged = not (self.model.config.time_conditioning
                               or getattr(self.model.config, "noise_conditioning", False))
        logits = None
        logits_input = None
        num_model_calls = 0
        self._num_timesteps = len(self.scheduler.timesteps)

        for step_index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if not (sample == self.mask_token_id).any():
                break
            reveals = self.scheduler.step_reveals_tokens(timestep, sample)
            if reveals is not None and not bool(reveals.any()):
                continue  # the shadow sampler knows this step changes nothing: no forward, no step, no callback
            unchanged = logits_input is not None and torch.equal(sample, logits_input)
            if logits is None or not (reuse_unchanged and unchanged):
                logits = self._model_logits(sample, timestep)
                logits_input = sample
                num_model_calls += 1
            output = self.scheduler.step(
                logits, timestep, sample, generator=generator, temperature=temperature, top_k=top_k, top_p=top_p
            )
            sample = output.prev_sample

            if callback_on_step_end is not None:
                available = {"sample": sample, "pred_original_sample": output.pred_original_sample,
                             "pred_logits": output.pred_logits}
                callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                if callback_outputs is not None:
                    sample = callback_outputs.get("sample", sample)

        texts = None
        if output_type == "text":
            texts = self.tokenizer.batch_decode(sample.tolist(), skip_special_tokens=False)
        self.maybe_free_model_hooks()

        if not return_dict:
            return sample, texts, num_model_calls
        return MCDPipelineOutput(sequences=sample, texts=texts, num_model_calls=num_model_calls)

    # ----------------------------------------------------------------------------------------------------------------
    # Saving, loading, the Hub

    def model_card(self, **card_info: Any):
        """The pipeline's model card (a `huggingface_hub.ModelCard`), from `self.card_info` updated by `card_info`."""
        from .cards import build_model_card

        info = {**self.card_info, **card_info}
        return build_model_card(self, info)

    def save_pretrained(self, save_directory: str | os.PathLike, *, card_info: dict | None = None, **kwargs: Any):
        """Save the components (`model_index.json`, `model/`, `scheduler/`, `tokenizer/`) and a `README.md` card.

        Args:
            save_directory: target folder.
            card_info (`dict`, *optional*): facts for the model card, merged into `self.card_info` (e.g.
                `base_model`, `method`, `datasets`, `metrics`).
            kwargs: passed to `DiffusionPipeline.save_pretrained` (`push_to_hub` is handled by `push_to_hub`).
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use `pipe.push_to_hub(repo_id)` to push; `save_pretrained` writes a local folder.")
        if card_info:
            self.card_info.update(card_info)
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        readme = os.path.join(save_directory, "README.md")
        if os.path.exists(readme):
            with open(readme, encoding="utf-8") as handle:
                if CARD_MARKER not in handle.read():
                    logger.warning(f"{readme} exists and was not written by mcd_hf; it is kept unchanged.")
                    return
        self.model_card().save(readme)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "MCDPipeline":
        """Load from a local folder or a Hub repo id; `dtype=torch.bfloat16` loads the model in bf16.

        A Hub id that cannot be reached raises [`HubUnreachableError`] (a `ConnectionError`) naming the repo.
        """
        with hub_errors_as_unreachable(f"download {pretrained_model_name_or_path!r}"):
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        readme = os.path.join(str(pretrained_model_name_or_path), "README.md")
        if os.path.isfile(readme):
            from huggingface_hub import ModelCard

            pipe.card_info = dict(ModelCard.load(readme).data.to_dict().get("mcd_hf", {}) or {})
        return pipe

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload MCDPipeline", card_info: dict | None = None) -> str:
        """Save to a temporary folder (with the model card) and upload it to `repo_id`; returns the commit URL.

        Raises [`HubUnreachableError`] at once when the Hub cannot be reached (or `HF_HUB_OFFLINE=1`).
        """
        import tempfile

        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, card_info=card_info)
            with hub_errors_as_unreachable(f"push to {repo_id!r}"):
                api = HfApi(token=token)
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        return str(info)


__all__ = ["MCDPipeline", "MCDPipelineOutput", "HubUnreachableError"]
