"""Two tiny model families with their own tokenizers, for the cross-tokenizer drafter's tests.

Each family is a byte-level BPE tokenizer trained here (no download) on a different sample of one
small synthetic corpus, with a different vocabulary size, so the two split text differently; and
a tiny Llama trained for a few seconds on the corpus in its own tokens. Both models learn the
same text, so the drafter's greedy continuations often agree with the target's: drafts really
get accepted and the translation path is exercised, not only the verifier's correction.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "the café owner", "日本の猫", "a naïve bird"]
VERBS = ["sees", "likes", "eats", "greets", "paints", "follows"]
OBJECTS = ["the red ball", "a small fish", "the moon", "some bread", "an apple", "the 🙂 sign"]
SEPARATORS = [". ", ".  ", "!\n", ".\t", ", and ", ".\n\n"]
# prompts for the tests: multi-byte characters, runs of spaces, tabs and blank lines
PROMPTS = ["the cat sees", "日本の猫 likes the", "a naïve bird  paints\t", "my friend greets the café owner.\n\n",
           "the 🙂 sign", "a dog eats some bread,   and"]


def corpus(seed: int, sentences: int = 600) -> str:
    rng = random.Random(seed)
    return "".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(SEPARATORS)}"
                   for _ in range(sentences))


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator([text[i:i + 200] for i in range(0, len(text), 200)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def train_lm(tokenizer, text: str, *, seed: int, hidden: int, layers: int, steps: int = 150) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=rng)
        batch = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels itself
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def build(root: Path) -> dict[str, Path]:
    """Save {"target", "drafter"} as ordinary model folders (weights + tokenizer)."""
    text = corpus(0)
    families = {
        "target": (train_tokenizer(corpus(1), 420), dict(seed=1, hidden=64, layers=2)),
        "drafter": (train_tokenizer(corpus(2), 330), dict(seed=2, hidden=48, layers=1)),
    }
    paths = {}
    for name, (tokenizer, settings) in families.items():
        model = train_lm(tokenizer, text, **settings)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths
