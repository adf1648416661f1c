"""Helpers of the engine tests: decoder loading, transformers references, `run_engine`, which drives the
engine step by step and keeps every text delta, and beam search and scoring through it (fixtures:
engine_fixtures.py; the tiny model: tiny_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shared.sampling import SamplingParams
from shared.tokenizer import TextTokenizer
from workers.cpu.decoder import INT8Decoder
from workers.engine.decoder import Decoder
from workers.engine.engine import Engine
from workers.engine.groups import RowGroup
from workers.engine.sequence import FinishReason, Sequence, Update
from workers.features.beam import BeamCandidate, BeamGroup, BeamSearch
from workers.features.scoring import ScoreGroup
from workers.gpu.decoder import CUDADecoder

ROOT = Path(__file__).resolve().parent.parent
REAL_WEIGHTS = ROOT / "weights"

TINY_PROMPTS = (
    "The history of the Roman Empire",
    "Héllo wörld 😀, ça va? 日本語も",
    "def f(x):\n    return x * 2\n\nprint(f(3))",
    "a",
)
TINY_CHAT = "Hi there, how are you?"

REAL_CHAT = ("What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.")
REAL_RAW = ("The history of the Roman Empire", "def fibonacci(n):\n", "Once upon a time, in a small village")
REAL_NEW_TOKENS = 64

BEAM_CHAT = [{"role": "user", "content": "What is the capital of France?"}]
BEAM_RAW = "The three primary colors are"
"""The beam search tests' prompts."""

MAX_STEPS = 5000
"""run_engine fails rather than loops forever when the engine stops making progress."""


def tiny_prompts(tokenizer: TextTokenizer) -> list[list[int]]:
    """Raw prompts of different lengths (one of them a single token) and a chat-templated one."""
    return [tokenizer.encode(text) for text in TINY_PROMPTS] + [
        tokenizer.encode_chat([{"role": "user", "content": TINY_CHAT}])]


def load_fp32(folder: Path, max_batch_size: int = 8, max_seq_len: int = 256) -> CUDADecoder:
    """The GPU pool's decoder running fp32 on the CPU."""
    return CUDADecoder(device="cpu", max_batch_size=max_batch_size, max_seq_len=max_seq_len).load_weights(folder)


def load_int8(folder: Path, max_batch_size: int = 8, max_seq_len: int = 256, compile_decode: bool = False,
              residual: bool = False) -> INT8Decoder:
    """The CPU pool's decoder, from the `int8/` folder the weights command writes."""
    decoder = INT8Decoder(max_batch_size=max_batch_size, max_seq_len=max_seq_len, compile_decode=compile_decode,
                          residual=residual)
    return decoder.load_quantized_weights(folder / "int8")


@dataclass
class Result:
    """What a client of one sequence saw: its updates in order, its token ids and how it ended."""

    ids: list[int]
    updates: list[Update]
    finish_reason: FinishReason | None
    output_text: str

    @property
    def deltas(self) -> list[str]:
        """The text of each update."""
        return [update.text for update in self.updates]

    @property
    def text(self) -> str:
        """The streamed text: every delta, concatenated."""
        return "".join(self.deltas)


def run_engine(decoder: Decoder, tokenizer: TextTokenizer, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams], *, eos_token_ids=None, prefill_chunk: int = 256,
               after_step=None, groups: list[RowGroup] = ()) -> list[Result]:
    """Run all prompts through one Engine until every sequence ends; `after_step(engine, step)` may intervene.
    `groups` (beam searches, scoring) are added after the prompts and run beside them."""
    eos = tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids
    engine = Engine(decoder, tokenizer.backend, eos, prefill_chunk=prefill_chunk)
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    sequences = [Sequence(str(i), ids, p, tokenizer.backend) for i, (ids, p) in enumerate(zip(prompts, per_prompt))]
    for sequence in [*sequences, *groups]:
        engine.add(sequence)
    updates: dict[str, list[Update]] = {s.id: [] for s in [*sequences, *groups]}
    step = 0
    while engine.has_work:
        for update in engine.step():
            updates[update.sequence.id].append(update)
        step += 1
        assert step < MAX_STEPS, "the engine stopped making progress"
        if after_step is not None:
            after_step(engine, step)
    return [Result(s.output_ids, updates[s.id], s.finish_reason, s.output_text) for s in sequences]


def beam_group(decoder: Decoder, prompt_ids: list[int], width: int, max_new_tokens: int, length_penalty: float = 1.0,
               eos_token_ids=(), name: str = "beam") -> BeamGroup:
    """A beam search of `prompt_ids` for `decoder`'s engine."""
    search = BeamSearch(width, max_new_tokens, length_penalty, eos_token_ids, device=decoder.device)
    return BeamGroup(name, prompt_ids, search, decoder.max_seq_len)


def beam_search(decoder: Decoder, tokenizer: TextTokenizer, prompt_ids: list[int], width: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_token_ids=(), **run_options) -> list[BeamCandidate]:
    """A beam search through an Engine (`run_engine`'s options: prompts beside it, the prefill chunk...)."""
    group = beam_group(decoder, prompt_ids, width, max_new_tokens, length_penalty, eos_token_ids)
    run_beside(decoder, tokenizer, group, **run_options)
    return group.results()


def score_candidates(decoder: Decoder, tokenizer: TextTokenizer, prompt_ids: list[int], candidates: list[list[int]],
                     length_penalty: float = 1.0, **run_options) -> list[float]:
    """Candidate scores through an Engine (`run_engine`'s options)."""
    group = ScoreGroup("score", prompt_ids, candidates, decoder.max_seq_len)
    run_beside(decoder, tokenizer, group, **run_options)
    return group.scores(length_penalty)


def run_beside(decoder: Decoder, tokenizer: TextTokenizer, group: RowGroup, beside: list[list[int]] = (),
               max_tokens: int = 8, **options) -> list[Result]:
    """Run `group` to its end beside greedy sequences of the `beside` prompts; their results."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    results = run_engine(decoder, tokenizer, list(beside), params, groups=[group], **options)
    assert group.finish_reason == FinishReason.DONE, group.error
    return results


def hf_beams(model, prompt_ids: list[int], width: int, max_new_tokens: int, eos: list[int],
             length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
    """transformers' returned sequences (after the prompt, cut after their first EOS) and sequences_scores."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
                         do_sample=False, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                         early_stopping=False, eos_token_id=eos, pad_token_id=eos[0],
                         output_scores=True, return_dict_in_generate=True)
    if width == 1:  # transformers then decodes greedily and reports per-step logits, not a sequence score
        steps = torch.stack(out.scores, dim=1).log_softmax(-1)  # [1, steps, V]
        chosen = out.sequences[:, len(prompt_ids):]
        logprob = steps.gather(-1, chosen[..., None]).sum().item()
        return [(chosen[0].tolist(), logprob / chosen.shape[1] ** length_penalty)]
    beams = []
    for row, score in zip(out.sequences[:, len(prompt_ids):].tolist(), out.sequences_scores.tolist()):
        ends = [i for i, token in enumerate(row) if token in eos]  # finished shorter rows are padded with EOS
        beams.append((row[: ends[0] + 1] if ends else row, score))
    return beams


def assert_same_beams(ours, theirs, abs_tolerance: float = 1e-4) -> None:
    """Our candidates have transformers' tokens and (up to rounding) scores, in its order."""
    assert [c.token_ids for c in ours] == [ids for ids, _ in theirs]
    assert [c.score for c in ours] == pytest.approx([score for _, score in theirs], abs=abs_tolerance)


def greedy(decoder: Decoder, tokenizer: TextTokenizer, prompts: list[list[int]], max_tokens: int,
           **kwargs) -> list[list[int]]:
    """Greedy output ids of the prompts, decoded together."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [r.ids for r in run_engine(decoder, tokenizer, prompts, params, **kwargs)]


def greedy_alone(decoder: Decoder, tokenizer: TextTokenizer, prompts: list[list[int]], max_tokens: int,
                 **kwargs) -> list[list[int]]:
    """Greedy output ids of each prompt decoded on its own."""
    return [greedy(decoder, tokenizer, [ids], max_tokens, **kwargs)[0] for ids in prompts]


def transformers_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: list[int],
                        **generate_kwargs) -> list[int]:
    """transformers' greedy `generate()` output after the prompt, up to and including its first EOS."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_ids, pad_token_id=eos_token_ids[0],
                             **generate_kwargs)
    tokens = out[0, len(prompt_ids):].tolist()
    ends = [i for i, token in enumerate(tokens) if token in eos_token_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def load_transformers(folder: Path):
    """transformers' own Llama in fp32 from a prepared folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


class ScriptedDecoder(Decoder):
    """Answers every prompt with `script` and then EOS (one-hot logits): known token ids through the engine.

    The engine's own sampling, detokenisation, stop and slot logic all run; only the model is scripted.
    """

    def __init__(self, script: list[int], vocab_size: int, eos_token_id: int, max_batch_size: int = 4):
        super().__init__(max_batch_size=max_batch_size, max_seq_len=4096)
        self.script, self.vocab_size, self.eos_token_id = script, vocab_size, eos_token_id
        self.prompt_lengths: dict[int, int] = {}  # slot -> prompt length, to know each row's output index

    def _logits(self, output_index: int) -> torch.Tensor:
        token = self.script[output_index] if output_index < len(self.script) else self.eos_token_id
        logits = torch.zeros(self.vocab_size)
        logits[token] = 1.0
        return logits

    def prefill(self, slot: int, tokens: list[int], start: int = 0) -> torch.Tensor:
        self.prompt_lengths[slot] = start + len(tokens)
        return self._logits(0)

    def prefill_many(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        for offset, prompt in enumerate(prompts):
            self.prompt_lengths[first_slot + offset] = len(prompt)
        return torch.stack([self._logits(0) for _ in prompts])

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        return torch.stack([self._logits(position - self.prompt_lengths[slot] + 1)
                            for slot, position in enumerate(positions)])

    def move_slot(self, source: int, target: int, length: int) -> None:
        self.prompt_lengths[target] = self.prompt_lengths[source]
