"""Prompts: the user message inside the model's chat template, and a clear error without one."""

import pytest

from rlkv import tasks
from rlkv.tasks.base import MATH_INSTRUCTION, Example

EXAMPLE = Example(id="x-0", question="What is 6 times 7?", answer="42")


def test_math_prompt_is_question_then_r1_instruction_in_the_chat_template(tiny_tokenizer):
    prompt = tasks.get("gsm8k").prompt(EXAMPLE, tiny_tokenizer)
    assert prompt == f"<|user|>What is 6 times 7?\n{MATH_INSTRUCTION}<|end|><|assistant|>"
    assert MATH_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_tokenizer_without_chat_template_is_a_clear_error(tokenizer_without_template):
    with pytest.raises(ValueError, match=r"tokenizer 'tiny-test' has no chat template.*require"):
        tasks.get("math500").prompt(EXAMPLE, tokenizer_without_template)


def test_mbpp_prompt_names_the_function_and_shows_the_asserts(data_dir, tiny_tokenizer):
    example = tasks.get("mbpp").load(data_dir, limit=1)[0]
    prompt = tasks.get("mbpp").prompt(example, tiny_tokenizer)
    assert "`remove_Occ`" in prompt and "```python" in prompt
    assert all(test in prompt for test in example.meta["tests"])
    assert example.question in prompt and "\\boxed" not in prompt


def test_arith_prompt_carries_the_problem(tiny_tokenizer):
    example = tasks.get("arith").load(limit=1)[0]
    assert tasks.get("arith").prompt(example, tiny_tokenizer).startswith(f"<|user|>{example.question}\n")


@pytest.mark.real_model
def test_prompt_with_the_real_smollm2_chat_template(smollm2_tokenizer):
    prompt = tasks.get("aime24").prompt(EXAMPLE, smollm2_tokenizer)
    assert "<|im_start|>user\nWhat is 6 times 7?\n" + MATH_INSTRUCTION + "<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
