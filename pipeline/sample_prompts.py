"""Sample prompts for the demo: chat questions and prose openings of different kinds, so that
drafters see easy (repetitive, factual) and hard (open-ended) continuations."""

SAMPLE_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "List the first ten prime numbers, separated by commas.",
    "Write a short poem about the sea at night.",
    "Explain in two sentences what a hash table is.",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "Give three tips for writing clear Python code.",
    "Count from one to twenty in words.",
    "Describe the water cycle to a ten-year-old.",
    "What are the three primary colors? Explain briefly.",
    "Write a haiku about autumn leaves.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Why is the sky blue? Keep it short.",
]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
