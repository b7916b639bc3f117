"""FirstHittingBlockScheduler: a drop-in scheduler for diffusers' discrete LM pipelines (LLaDA2Pipeline,
DiffusionGemmaPipeline) with exact first-hitting and float64-safe confidence strategies inside a block.

A ``SchedulerMixin, ConfigMixin`` shell over ``gensample.samplers.block_unmasking``: ``step`` calls
``unmask_step`` (the same function ``sample_blocks`` calls), ``commit_counts`` and ``next_block_time``
(docs/masked_lms.md). It speaks diffusers' ``BlockRefinementScheduler`` protocol: ``set_timesteps(n, device,
block_length)``, ``step(model_output, timestep, sample, *, mask_token_id, temperature, top_p, top_k,
sampling_method, threshold, editing_threshold, minimal_topk, prompt_mask, generator, return_dict)``,
``check_eos_finished``, ``check_block_should_continue``, ``add_noise``, and both of its modes: mask mode
(LLaDA2: ``mask_token_id`` given) and uniform-corruption mode (DiffusionGemma: ``mask_token_id=None``; the
uncommitted positions hold uniformly random tokens, committed ones are tracked and the rest renoised).

Config ``remasking``: ``fhs`` (uniformly chosen positions, tokens drawn in float64; one commit per call is exact
first hitting, arXiv 2409.02908 sec. 4.1; block time ``t`` tracked), ``low-confidence`` (the stock rule: Fast-dLLM
threshold commits and editing included; at temperature 0 token for token the stock scheduler's output),
``margin``, ``entropy``, ``random``. All token draws are float64 inverse-CDF draws after temperature, top-k and
top-p; the stock scheduler draws with ``torch.multinomial`` on a float32 softmax.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..core import categorical as cat
from ..samplers.block_unmasking import CONFIDENCE_KINDS, REMASKING, commit_counts, next_block_time, unmask_step
from ..samplers.first_hitting import SCHEDULES

SAMPLING_METHODS = ("auto", "greedy", "multinomial")


@dataclass
class FirstHittingBlockSchedulerOutput(BaseOutput):
    """prev_sample: (B, W) tokens after the step; transfer_index: (B, W) bool, positions committed;
    editing_transfer_index: (B, W) bool, committed tokens replaced (editing); sampled_tokens: (B, W) proposals (the
    current token where none was drawn); sampled_probs: (B, W) float64 p(proposal) (0 where none was drawn);
    pred_logits: the model output, passed through; t: (B,) float64 first-hitting time of the block after this step
    (fhs; None for the other strategies)."""

    prev_sample: torch.LongTensor
    transfer_index: torch.BoolTensor
    editing_transfer_index: torch.BoolTensor
    sampled_tokens: torch.LongTensor
    sampled_probs: torch.Tensor
    pred_logits: torch.Tensor
    t: torch.Tensor | None = None


def _default_generator(device: torch.device) -> torch.Generator:
    """The global generator of ``device`` (what ``torch.multinomial(generator=None)`` would use)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class FirstHittingBlockScheduler(SchedulerMixin, ConfigMixin):
    """Block scheduler for LLaDA2Pipeline / DiffusionGemmaPipeline (docs/masked_lms.md).

    ``pipe.scheduler = FirstHittingBlockScheduler.from_config(pipe.scheduler.config, remasking="fhs")``.
    The first five config keys are diffusers' ``BlockRefinementScheduler`` keys with its defaults and meaning.
    ``temperature`` / ``top_k`` / ``top_p`` set on the config win over what a pipeline passes to ``step`` (both
    pipelines pass ``temperature=0.0`` by default, i.e. greedy; exact first hitting needs temperature 1: set it
    here or pass ``temperature=1.0`` to the pipeline). ``threshold`` / ``editing_threshold`` follow the stock
    rule (the pipeline's value, else the config's) and apply to the confidence strategies only: ``fhs`` and
    ``random`` never commit by threshold and never edit. ``exclude_ids``: token ids never drawn (the mask always).
    There is no predictor-corrector (no ``corrector_steps``): committed tokens are final except for editing.
    """

    order = 1
    _compatibles = ["BlockRefinementScheduler", "DiscreteDDIMScheduler", "EntropyBoundScheduler"]

    @register_to_config
    def __init__(self, block_length: int = 32, num_inference_steps: int = 32, threshold: float = 0.95,
                 editing_threshold: float | None = None, minimal_topk: int = 1, remasking: str = "fhs",
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 masking_schedule: str = "linear", exclude_ids: list | None = None):
        if remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
        if masking_schedule not in SCHEDULES:
            raise ValueError(f"masking_schedule must be one of {SCHEDULES}, got {masking_schedule!r}")
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 or None, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise ValueError(f"top_k must be an int or None, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long)
        self._transfer_schedule: torch.Tensor | None = None
        self._committed: torch.Tensor | None = None  # uniform-corruption mode: committed positions of the block
        self.t: torch.Tensor | None = None  # fhs: (B,) float64 block time

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, keeping only our own keys of a foreign config: a DiscreteDDIM config's
        ``corrector_steps`` would otherwise stay in ours and make DiffusionGemmaPipeline call a corrector."""
        if config is not None and not isinstance(config, str):
            known = set(inspect.signature(cls.__init__).parameters) - {"self"}
            config = {k: v for k, v in dict(config).items() if k in known or k.startswith("_")}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- grid ----------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      block_length: int | None = None) -> None:
        """Steps per block and the even commit schedule of a ``block_length`` block over them (``commit_counts``)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be an int > 0, got {num_inference_steps!r}")
        if block_length is None:
            block_length = self.config.block_length
        elif block_length <= 0:
            raise ValueError(f"block_length must be > 0, got {block_length!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, device=device, dtype=torch.long)
        self._transfer_schedule = self.get_num_transfer_tokens(block_length, num_inference_steps).to(
            device=device if device is not None else "cpu")
        self._committed = None
        self.t = None

    def get_num_transfer_tokens(self, block_length: int, num_inference_steps: int) -> torch.LongTensor:
        """Commits per step: ``block_length`` split evenly over the steps, the remainder first."""
        return commit_counts(int(block_length), int(num_inference_steps))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # -- the step ------------------------------------------------------------------------------------------------
    def _law(self, temperature, top_k, top_p, sampling_method):
        c = self.config
        if sampling_method not in SAMPLING_METHODS:
            raise ValueError(f"sampling_method must be one of {SAMPLING_METHODS}, got {sampling_method!r}")
        default = 1.0 if c.remasking in ("fhs", "random") else 0.0  # used when neither config nor caller sets one
        T = c.temperature if c.temperature is not None else (default if temperature is None else temperature)
        if not (isinstance(T, (int, float)) and T >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {T!r}")
        if sampling_method == "greedy":
            T = 0.0
        top_k = c.top_k if c.top_k is not None else top_k
        top_p = c.top_p if c.top_p is not None else top_p
        if top_k is not None and top_k <= 0:
            top_k = None
        return float(T), top_k, top_p

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.LongTensor, *,
             mask_token_id: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, sampling_method: str = "auto", threshold: float | None = None,
             editing_threshold: float | None = None, minimal_topk: int | None = None,
             prompt_mask: torch.BoolTensor | None = None, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """One refinement step of the current block (the stock ``BlockRefinementScheduler.step`` protocol).

        model_output: (B, W, K) logits of the block; sample: (B, W) its tokens; timestep: the step index inside
        the block (0 starts a block: the fhs time and the uniform-mode committed set reset).
        Mask mode: k = the schedule's count of this step; ``unmask_step`` rule "topk" on the masked positions,
        editing of the non-mask, non-prompt positions (confidence strategies, editing_threshold > 0).
        Uniform mode: the cumulative quota ceil((i + 1) W / steps) minus what is committed, rule "union", editing
        of committed positions (editing_threshold not None), then the uncommitted positions are renoised with
        uniform random tokens drawn from ``generator`` (on its device).
        """
        if self._transfer_schedule is None:
            raise ValueError("call set_timesteps(num_inference_steps, block_length=...) before step()")
        if model_output.ndim != 3 or model_output.shape[:2] != sample.shape:
            raise ValueError(f"model_output must be (B, W, K) with (B, W) = sample.shape {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
        c = self.config
        T, top_k, top_p = self._law(temperature, top_k, top_p, sampling_method)
        if threshold is None:
            threshold = float(c.threshold) if c.threshold is not None else None
        if editing_threshold is None:
            editing_threshold = c.editing_threshold
        step_index = int(timestep.item()) if isinstance(timestep, torch.Tensor) else int(timestep)
        gen = generator if generator is not None else _default_generator(sample.device)
        remasking = c.remasking
        confident = remasking in CONFIDENCE_KINDS
        B, W = sample.shape
        exclude = tuple(int(i) for i in (c.exclude_ids or ()))
        if mask_token_id is not None:
            exclude = (int(mask_token_id), *exclude)
            active = sample == mask_token_id  # (B, W)
            k = self._transfer_schedule[min(step_index, len(self._transfer_schedule) - 1)].to(sample.device)
            edit_on = confident and editing_threshold is not None and editing_threshold > 0.0
            edit_cand = None
            if edit_on:
                pm = torch.zeros(W, dtype=torch.bool, device=sample.device) if prompt_mask is None else prompt_mask
                edit_cand = ~active & ~pm.to(sample.device).unsqueeze(0)
            res = unmask_step(model_output, sample, active, k, gen, remasking=remasking, temperature=T, top_k=top_k,
                              top_p=top_p, threshold=threshold if confident else None, exclude=exclude, rule="topk",
                              edit_candidates=edit_cand, editing_threshold=editing_threshold if edit_on else None)
            prev = res.x
            n_open = active.sum(1)
        else:
            if step_index == 0 or self._committed is None or self._committed.shape != sample.shape:
                self._committed = torch.zeros_like(sample, dtype=torch.bool)
            committed = self._committed.to(sample.device)
            target = ((step_index + 1) * W + self.num_inference_steps - 1) // self.num_inference_steps
            k = (target - committed.sum(1)).clamp_min(0)  # (B,)
            edit_on = confident and editing_threshold is not None
            res = unmask_step(model_output, sample, ~committed, k, gen, remasking=remasking, temperature=T,
                              top_k=top_k, top_p=top_p, threshold=threshold if confident else None, exclude=exclude,
                              rule="union", edit_candidates=committed if edit_on else None,
                              editing_threshold=editing_threshold if edit_on else None)
            self._committed = committed | res.commit
            noise = self._random_tokens(model_output.shape[-1], sample, generator)
            prev = torch.where(self._committed, res.x, noise)
            n_open = (~committed).sum(1)
        t = None
        if remasking == "fhs":
            if step_index == 0 or self.t is None or self.t.shape[0] != B:
                self.t = torch.ones(B, dtype=torch.float64)
            got = res.commit.sum(1).cpu()
            self.t = torch.where(got > 0, next_block_time(self.t, n_open, got, gen, c.masking_schedule), self.t)
            t = self.t.clone()
        if not return_dict:
            return prev, res.commit, res.edit, res.x0, res.prob, model_output
        return FirstHittingBlockSchedulerOutput(prev_sample=prev, transfer_index=res.commit,
                                                editing_transfer_index=res.edit, sampled_tokens=res.x0,
                                                sampled_probs=res.prob, pred_logits=model_output, t=t)

    @staticmethod
    def _random_tokens(vocab_size: int, sample: torch.Tensor, generator) -> torch.Tensor:
        """Uniform renoising tokens, drawn on the generator's device (the global RNG of sample's device if None)."""
        if generator is None:
            return torch.randint(0, vocab_size, sample.shape, device=sample.device)
        return torch.randint(0, vocab_size, sample.shape, generator=generator, device=generator.device).to(sample.device)

    # -- pipeline control (the stock protocol) -------------------------------------------------------------------
    @staticmethod
    def check_eos_finished(cur_x: torch.LongTensor, sampled_tokens: torch.LongTensor, final_transfer: torch.BoolTensor,
                           finished: torch.BoolTensor, eos_token_id: int, mask_token_id: int,
                           prompt_length: int) -> torch.BoolTensor:
        """Mark a row finished when this step committed an EOS and every generated position before the first EOS
        of ``cur_x`` (at or after ``prompt_length``) is unmasked. Updates and returns ``finished`` (B,) bool."""
        committed_eos = ((sampled_tokens == eos_token_id) & final_transfer).any(1)  # (B,)
        is_eos = cur_x == eos_token_id
        L = cur_x.shape[1]
        first = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(committed_eos, L, dtype=torch.long))
        pos = torch.arange(L, device=cur_x.device).unsqueeze(0)
        gap = (pos >= prompt_length) & (pos < first.unsqueeze(1)) & (cur_x == mask_token_id)
        done = committed_eos & is_eos.any(1) & (first >= prompt_length) & ~gap.any(1)
        finished |= done.to(finished.device)
        return finished

    def check_block_should_continue(self, step_idx: int, masks_remaining: bool, editing_enabled: bool,
                                    editing_transfer_index: torch.BoolTensor, post_steps: int, max_post_steps: int,
                                    finished: torch.BoolTensor) -> bool:
        """Whether the pipeline's inner loop goes on: not when every row finished, when masks are gone and no edit
        happened (fhs / random never edit), when the step budget is spent, or past ``max_post_steps`` edits."""
        if bool(finished.all()):
            return False
        if not masks_remaining and (not editing_enabled or not bool(editing_transfer_index.any())):
            return False
        if masks_remaining and step_idx >= self.num_inference_steps:
            return False
        if not masks_remaining and post_steps > max_post_steps:
            return False
        return True

    def add_noise(self, original_samples: torch.LongTensor, attention_mask: torch.LongTensor, *, prompt_length: int,
                  block_length: int, mask_token_id: int, generator: torch.Generator | None = None):
        """Training-time block masking: in each block after the prompt, a rate p ~ U(0, 1) per row, each valid
        position masked with probability p; the complementary view masks the other valid positions.
        Returns (noisy, noisy_rev, masked, masked_rev), as the stock scheduler does."""
        B, L = original_samples.shape
        dev = original_samples.device
        gen = generator if generator is not None else _default_generator(dev)
        valid = attention_mask.to(device=dev, dtype=torch.bool)
        masked = torch.zeros_like(original_samples, dtype=torch.bool)
        for s in range(prompt_length, L, block_length):
            e = min(L, s + block_length)
            rate = cat.uniform((B, 1), gen, dtype=torch.float64).to(dev)
            masked[:, s:e] = (cat.uniform((B, e - s), gen, dtype=torch.float64).to(dev) < rate) & valid[:, s:e]
        masked_rev = ~masked & valid
        masked_rev[:, :prompt_length] = False
        fill = torch.full_like(original_samples, mask_token_id)
        return (torch.where(masked, fill, original_samples), torch.where(masked_rev, fill, original_samples),
                masked, masked_rev)


__all__ = ["FirstHittingBlockScheduler", "FirstHittingBlockSchedulerOutput"]
