"""The real SmolLM2-135M-Instruct: batched greedy output token-identical to HF transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetpd import LLM, SamplingParams

QUESTIONS = [
    "hi",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, for a curious ten year old who likes science.",
    "List three prime numbers.",
    "Summarise the plot of Romeo and Juliet. Mention the families, the city where it happens, how the two "
    "lovers meet, and how the story ends, in no more than four sentences.",
]
MAX_TOKENS = 24


@pytest.mark.slow
def test_greedy_tokens_match_hf(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    llm = LLM(str(smollm2_dir), max_num_batched_tokens=64)  # small budget: prompts are chunked
    prompts = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ours = llm.engine.tokenizer.encode_chat(messages)  # type: ignore[union-attr]
        theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert ours == list(theirs), "hetpd's tokenizer + chat template must match HF's"
        prompts.append(ours)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths"

    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=hf_tokenizer.pad_token_id,
            )[0, len(prompt):].tolist()
        assert list(output.token_ids) == reference, hf_tokenizer.decode(prompt)
    assert "Paris" in outputs[1].text
