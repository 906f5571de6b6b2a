"""One request's beam search, stepped by the continuous-batching engine one token at a time.

``generate`` runs beam search over a static batch (``GenerationMixin._beam_search``): it keeps,
per prompt, the running beams, their scores and the best finished hypotheses, and after each
forward reorders the cache rows to the beams that survived. The engine needs the same search
for one request whose beams are rows of its shared running batch, joined and left at any
step. So this class holds ``_beam_search``'s state for a batch of one and runs each step
through generate's own helpers (``_get_top_k_continuations``,
``_get_running_beams_for_next_iteration``, ``_update_finished_beams``,
``_check_early_stop_heuristic``, ``_beam_search_has_unfinished_sequences``) with the logits
processors and stopping criteria ``generate`` builds for that request. What is written here is
only the loop body that ties them together (``_beam_search`` is one method over a static
batch, with no step to call), and the row bookkeeping the engine needs: which running row
each surviving beam continues from (``step``'s return), so the engine can reorder that
request's rows of the shared cache.

Two differences in how the work is done, not in its result: ``generate`` prefills the prompt
once per beam (identical rows, all but the first scored -1e9 so the first step draws from one
beam); the engine prefills it once and reads the first step's logits for every beam from that
row, which is the same computation. And a sampled search (``do_sample`` with beams) draws its
candidates from the request's own generator, where generate's helper draws from the global
one (which every thread of the process shares); the helper then orders and gathers exactly
those candidates (``_draw``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["BeamSearch"]


class BeamSearch:
    """The state of one request's beam search (``_beam_search``'s running tensors for a batch of
    one) and its step.

    ``model`` is the base model (generate's helpers are its methods), ``config`` the request's
    ``GenerationConfig`` as generate prepares it (``num_beams``, ``max_length``, the special
    token tensors, ``length_penalty``, ``early_stopping``, ``do_sample``), ``processors`` and
    ``stopping`` the lists generate builds from it, ``head`` generate's input_ids for this
    request (a causal LM's prompt, an encoder-decoder's decoder start token) and ``rng`` the
    request's generator for a sampled search.
    """

    def __init__(
        self,
        model: Any,
        config: Any,
        processors: Any,
        stopping: Any,
        head: Sequence[int],
        rng: torch.Generator | None,
        device: torch.device,
    ) -> None:
        self.model, self.config = model, config
        self.processors, self.stopping, self.rng = processors, stopping, rng
        self.size = int(config.num_beams)
        self.prompt_len = self.cur_len = len(head)
        eos = config._eos_token_tensor
        pad = config._pad_token_tensor
        # generate's own initialisation (``_beam_search`` step 3), for batch_size 1
        self.keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * self.size
        self.top_mask = torch.cat(
            [torch.ones(self.size, dtype=torch.bool), torch.zeros(self.keep - self.size,
                                                                  dtype=torch.bool)]
        ).to(device)  # fmt: skip
        fill = pad or eos[0] if eos is not None else -1
        length = int(config.max_length)
        self.running = torch.full((1, self.size, length), int(fill), dtype=torch.int64,
                                  device=device)  # fmt: skip
        self.running[:, :, : self.prompt_len] = torch.tensor(list(head), device=device)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((1, self.size), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((1, self.size), -1e9, dtype=torch.float, device=device)
        self.finished = torch.zeros((1, self.size), dtype=torch.bool, device=device)
        self.open = torch.ones((1, 1), dtype=torch.bool, device=device)
        self.running_indices = torch.full((1, self.size, length - self.prompt_len), -1,
                                          dtype=torch.int32, device=device)  # fmt: skip
        self.indices = self.running_indices.clone()
        self.done = False
        self.last_tokens: list[int] = []  # each running beam's newest token (fed next step)

    def step(self, logits: torch.Tensor) -> list[int]:
        """Score one step: ``logits`` are the next-token logits of the request's running rows
        (``[beams, vocab]``; ``[1, vocab]`` after the prefill, which every beam shares). Returns,
        for each beam of the next step, the row it continues (its cache row to copy); ``done``
        is set when the search has ended, and ``tokens`` then holds its best sequence."""
        m, cur = self.model, self.cur_len
        if logits.shape[0] != self.size:
            # the prefilled row, as every beam: only at the first step
            assert logits.shape[0] == 1 and cur == self.prompt_len, (logits.shape, cur)
            logits = logits.expand(self.size, -1)
        flat = self.running[0, :, :cur]
        log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
        log_probs = self.processors(flat, log_probs)
        log_probs = (log_probs + self.running_scores[0, :, None]).reshape(1, -1)
        if self.config.do_sample:
            log_probs = self._draw(log_probs)
        top_scores, top_sequences, top_indices = m._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=self.running,
            running_beam_indices=self.running_indices, cur_len=cur,
            decoder_prompt_len=self.prompt_len, do_sample=False, beams_to_keep=self.keep,
            num_beams=self.size, batch_size=1,
        )  # fmt: skip
        hits = self.stopping(top_sequences[0, :, : cur + 1], None).view(1, self.keep)
        self.running, self.running_scores, self.running_indices = (
            m._get_running_beams_for_next_iteration(
                topk_log_probs=top_scores, topk_running_sequences=top_sequences,
                topk_running_beam_indices=top_indices, next_token_hits_stopping_criteria=hits,
                num_beams=self.size,
            )
        )  # fmt: skip
        self.sequences, self.scores, self.indices, self.finished = m._update_finished_beams(
            sequences=self.sequences, topk_running_sequences=top_sequences,
            beam_scores=self.scores, topk_log_probs=top_scores, beam_indices=self.indices,
            topk_running_beam_indices=top_indices, is_early_stop_heuristic_unsatisfied=self.open,
            is_sent_finished=self.finished, next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top_mask, num_beams=self.size, cur_len=cur,
            decoder_prompt_len=self.prompt_len, length_penalty=self.config.length_penalty,
            early_stopping=self.config.early_stopping,
        )  # fmt: skip
        parents = self.running_indices[0, :, cur - self.prompt_len].long()
        self.cur_len = cur + 1
        self.open = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.open, running_beam_scores=self.running_scores,
            beam_scores=self.scores, is_sent_finished=self.finished, cur_len=self.cur_len,
            max_length=self.config.max_length, decoder_prompt_len=self.prompt_len,
            early_stopping=self.config.early_stopping, length_penalty=self.config.length_penalty,
        )  # fmt: skip
        going = m._beam_search_has_unfinished_sequences(
            self.open, self.finished, hits, self.config.early_stopping
        )
        # one device-to-host copy per step: parents, newest tokens, whether it goes on
        host = torch.cat([parents, self.running[0, :, cur], going.view(1).long()]).tolist()
        self.last_tokens = host[self.size : 2 * self.size]
        self.done = not host[-1]
        return host[: self.size]

    def _draw(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Sample the step's candidates as generate's helper does (``keep`` of them, without
        replacement, by the softmax of the scores) but from the request's generator, and
        leave only them scored: the helper's top-k then takes exactly those, ordered by score
        as its sampling branch orders them."""
        probs = torch.nn.functional.softmax(log_probs, dim=-1)
        drawn = torch.multinomial(probs, num_samples=self.keep, generator=self.rng)
        kept = torch.full_like(log_probs, -float("inf"))
        return kept.scatter_(1, drawn, log_probs.gather(1, drawn))

    @property
    def tokens(self) -> list[int]:
        """The best finished sequence's tokens after the head, as ``generate`` returns them
        (cut to the generated length, which holds any EOS and padding after it)."""
        generated = int((self.indices[0, 0] + 1).bool().sum())
        return self.sequences[0, 0, self.prompt_len : self.prompt_len + generated].tolist()
