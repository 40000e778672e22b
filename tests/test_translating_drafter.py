"""A drafter with its own tokenizer (workers/translating_drafter.py).

The two tokenizers are byte-level BPEs trained in tests/xtok_models.py on different samples with
different vocabulary sizes (420 and 330 entries; they split "the café owner" differently), each
with a tiny Llama trained on the same synthetic text. Greedy output through real sockets must be
token-identical to the target alone, for prompts with multi-byte characters and runs of
whitespace; sampled output must keep the target's distribution.
"""

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest
import pytest_asyncio
import torch
from scipy.stats import chisquare
from transformers import AutoTokenizer

from pipeline.client import DrafterClient
from pipeline.config import LimitsConfig, load_config
from pipeline.models import load_causal_lm
from pipeline.protocol import Propose, Sampling
from pipeline.reference import greedy_reference
from tests.conftest import make_stack
from tests.test_target import reference_top_p
from tests.xtok_models import PROMPTS, build
from workers.drafts import draft_generator, settle
from workers.target import TargetVerifier
from workers.translating_drafter import TranslatingDrafter, byte_table, complete_utf8, tokenizers_to_translate


@pytest.fixture(scope="module")
def xtok(tmp_path_factory):
    torch.set_num_threads(1)
    paths = build(tmp_path_factory.mktemp("xtok"))
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in paths.items()}
    return SimpleNamespace(paths=paths, tok=tokenizers, target=load_causal_lm(str(paths["target"])),
                           drafter=load_causal_lm(str(paths["drafter"])))


def test_the_two_tokenizers_really_differ_and_both_keep_exact_bytes(xtok):
    target, drafter = xtok.tok["target"], xtok.tok["drafter"]
    assert target.get_vocab() != drafter.get_vocab()
    assert sum(target.tokenize(text) != drafter.tokenize(text) for text in PROMPTS) >= len(PROMPTS) - 1
    for text in PROMPTS:
        for tok in (target, drafter):
            table = byte_table(tok)
            assert b"".join(table[i] for i in tok.encode(text, add_special_tokens=False)) == text.encode()
    assert complete_utf8("日".encode()[:2]) == 0 and complete_utf8("a日".encode()) == 4 and complete_utf8(b"ab") == 2


def test_a_draft_ending_inside_a_target_token_continues_with_the_continuation_alone(xtok):
    strategy = TranslatingDrafter(xtok.drafter, xtok.tok["drafter"], xtok.tok["target"])
    tok = xtok.tok["target"]
    committed = tok.encode("the café own", add_special_tokens=False)
    assert "Ġowner" in tok.tokenize("the café owner greets")  # the joined text's token straddles the end
    ids = strategy.to_target(committed, "er greets the moon 日".encode()[:-1])  # ends inside 日
    assert tok.decode(ids) == "er greets the moon "  # the incomplete character is dropped
    assert tok.convert_ids_to_tokens(ids)[:2] == ["er", "Ġgreets"]
    # where a boundary falls at the committed end, the window's encoding gives the continuation
    committed = tok.encode("the café owner", add_special_tokens=False)
    assert tok.decode(strategy.to_target(committed, " greets the moon".encode())) == " greets the moon"
    assert strategy.to_target(committed, b"") == []


def test_the_drafter_cache_follows_the_committed_text_through_rejections(xtok):
    """Random verdicts (accept a prefix, then a foreign token): after each proposal the drafter's
    cache holds exactly its fed ids, and their bytes start with the committed bytes; drafts from
    the rolled-back state equal drafts from a fresh state."""
    strategy = TranslatingDrafter(xtok.drafter, xtok.tok["drafter"], xtok.tok["target"])
    tok = xtok.tok["target"]
    rng = torch.Generator().manual_seed(0)
    state = strategy.new_state()
    committed = tok.encode(PROMPTS[2], add_special_tokens=False)
    same = 0
    for _ in range(25):
        draft = strategy.propose(state, committed, 4, Sampling(), None)
        assert state.cache.get_seq_length() == len(state.fed)
        fed = b"".join(strategy.draft_bytes[i] for i in state.fed)
        usable = bytes(state.text[:complete_utf8(state.text)])
        assert fed[:len(usable)] == usable
        fresh = strategy.propose(strategy.new_state(), committed, 4, Sampling(), None)
        same += fresh.tokens == draft.tokens
        accepted = int(torch.randint(0, len(draft.tokens) + 1, (), generator=rng))
        committed += draft.tokens[:accepted] + [int(torch.randint(0, len(tok), (), generator=rng))]
    assert same >= 23  # a re-encoded boundary may rarely split otherwise than one encoding of it all


def test_translation_is_chosen_by_comparing_vocabularies(xtok, tiny_models):
    def cfg(model, translate=None):
        return SimpleNamespace(model=str(model), translate=translate)

    target = str(xtok.paths["target"])
    assert tokenizers_to_translate(cfg(xtok.paths["drafter"]), target) is not None
    assert tokenizers_to_translate(cfg(xtok.paths["target"]), target) is None  # same vocabulary
    assert tokenizers_to_translate(cfg(xtok.paths["target"], True), target) is not None  # forced
    assert tokenizers_to_translate(cfg(xtok.paths["drafter"], False), target) is None  # forbidden
    assert tokenizers_to_translate(cfg(tiny_models["small"]), target) is None  # no tokenizer: shares the target's
    with pytest.raises(ValueError):
        tokenizers_to_translate(cfg(tiny_models["small"], True), target)
    config = load_config(None, ["drafters.x.translate=true", "drafters.y.kind=\"ngram\""])
    assert config.drafter("x").translate is True and config.drafter("y").translate is None


# --- through real sockets ---------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, xtok):
    drafters = {
        # detected by vocabulary; a fixed γ so that a seed reproduces its output (with adaptive
        # lengths the draft, hence the acceptance draws, follow the broker's timing-based row cost)
        "xtok": {"kind": "model", "model": str(xtok.paths["drafter"]), "gamma": 4, "adaptive": False},
        # the target's own model forced through the translation: every byte must survive it
        "twin": {"kind": "model", "model": str(xtok.paths["target"]), "gamma": 4, "translate": True},
    }
    s = make_stack(tmp_path_factory.mktemp("xstack"), xtok.paths["target"], drafters, **{"broker__max_wait_ms": 10.0})
    async with s:
        yield s


@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_through_sockets_is_token_identical_to_the_target_alone(stack, xtok):
    """Multi-byte characters (é, ï, 日本, 🙂) and runs of spaces, tabs and blank lines in the
    prompts, where the two tokenizers put their boundaries differently."""
    tok = xtok.tok["target"]
    prompts = [tok.encode(text, add_special_tokens=False) for text in PROMPTS]
    clients = {n: DrafterClient(stack.config.drafter(n).client) for n in ("xtok", "twin")}
    try:
        results = await asyncio.gather(*[clients[n].complete(p, 40, stop_ids=[])
                                         for p in prompts for n in ("xtok", "twin")])
        figures = {n: await c.stats() for n, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()
    expected = [greedy_reference(xtok.target, p, 40) for p in prompts for _ in ("xtok", "twin")]
    assert [r.tokens for r in results] == expected
    # drafts in the drafter's own tokens really were translated and accepted
    assert figures["xtok"]["proposed"] > 50 and figures["xtok"]["acceptance_rate"] > 0.3, figures["xtok"]
    assert figures["twin"]["acceptance_rate"] > 0.9, figures["twin"]


@pytest.mark.asyncio(loop_scope="module")
async def test_sampling_through_sockets_runs_and_is_reproducible_per_seed(stack, xtok):
    prompt = xtok.tok["target"].encode(PROMPTS[1], add_special_tokens=False)
    client = DrafterClient(stack.config.drafter("xtok").client)
    try:
        runs = [await client.complete(prompt, 24, temperature=0.9, top_p=0.95, seed=s) for s in (5, 5, 6)]
    finally:
        client.close()
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 24
    assert runs[0].stats["proposed"] > 0


# --- the sampling distribution ----------------------------------------------------------------

def test_sampling_keeps_the_target_distribution(xtok):
    """Two-token continuations sampled through the translating drafter (ids only: q = 1) against
    the exact joint distribution of the target (temperature 0.8, top-p 0.9), by chi-square over
    the pairs with an expected count of at least 5 (the rest pooled in one cell).

    Power: 2,000 sessions, 23 distinct pairs seen. The same counts are also tested against the
    joint distribution of the target at temperature 1.0 (a plausible bug: a temperature lost on
    the way), 0.060 from the true joint in total variation; that alternative must be rejected at
    p < 1e-3 (measured: p = 0.79 for the truth, 2.9e-7 for the alternative), so a bias of that
    size cannot pass unseen."""
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=0)
    strategy = TranslatingDrafter(xtok.drafter, xtok.tok["drafter"], xtok.tok["target"], top_k=4)
    prompt = xtok.tok["target"].encode("the cat", add_special_tokens=False)
    counts = Counter(_sample_pairs(xtok.target, strategy, prompt, sampling, sessions=2000))
    truth, wrong = (_joint(xtok.target, prompt, t, 0.9) for t in (0.8, 1.0))
    assert set(counts) <= set(truth), "a pair the target can never produce"
    p_true, p_wrong = _chi2(counts, truth), _chi2(counts, wrong)
    distance = sum(abs(truth.get(k, 0) - wrong.get(k, 0)) for k in set(truth) | set(wrong)) / 2
    assert p_true > 1e-3, p_true
    assert p_wrong < 1e-3, (p_wrong, distance)


def _joint(target, prompt, temperature, top_p) -> dict[tuple[int, int], float]:
    with torch.inference_mode():
        first = reference_top_p(target(torch.tensor([prompt])).logits[0, -1].tolist(), temperature, top_p)
        joint = {}
        for a, pa in enumerate(first):
            if pa > 0:
                second = reference_top_p(target(torch.tensor([prompt + [a]])).logits[0, -1].tolist(), temperature, top_p)
                joint.update({(a, b): pa * pb for b, pb in enumerate(second) if pb > 0})
    return joint


def _chi2(counts: Counter, joint: dict) -> float:
    n = sum(counts.values())
    big = [k for k, p in joint.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    expected = [joint[k] * n for k in big] + [n * (1 - sum(joint[k] for k in big))]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed, expected).pvalue)


def _sample_pairs(target, strategy, prompt, sampling, sessions, batch=500):
    pairs = []
    for start in range(0, sessions, batch):
        ver = TargetVerifier(target, max_sessions=batch, limits=LimitsConfig())
        runs = {f"s{seed}": [list(prompt), strategy.new_state(), draft_generator(seed),
                             Sampling(sampling.temperature, sampling.top_p, seed)] for seed in range(start, start + batch)}
        rounds = 0
        while any(len(r[0]) < len(prompt) + 2 for r in runs.values()):
            items = []
            for sid, (hist, state, gen, smp) in runs.items():
                if len(hist) < len(prompt) + 2:
                    draft = strategy.propose(state, hist, 2, smp, gen)
                    assert not draft.q_ids  # ids only: the verifier takes q = 1 on each
                    items.append((sid, draft, Propose(sid, rounds, len(hist), draft.tokens, history=list(hist) if rounds == 0 else None,
                                                      temperature=smp.temperature, top_p=smp.top_p, seed=smp.seed)))
            for (sid, draft, _), verdict in zip(items, ver.verify_batch([i for _, _, i in items])):
                assert not verdict.error, verdict
                hist, state = runs[sid][0], runs[sid][1]
                settle(strategy, state, len(hist), verdict)
                hist += draft.tokens[: verdict.accepted] + [verdict.token]
            rounds += 1
        pairs += [tuple(hist[len(prompt):len(prompt) + 2]) for hist, *_ in runs.values()]
    return pairs


def test_the_bench_drafts_through_the_translation_for_a_class_of_another_family(xtok):
    from bench.profiles import PROFILES, DrafterChoice, qwen_setup
    from bench.run import model_strategy
    from workers.drafts import ModelDrafter

    target = str(xtok.paths["target"])
    assert isinstance(model_strategy(DrafterChoice(str(xtok.paths["drafter"]), 4), xtok.drafter, target), TranslatingDrafter)
    assert isinstance(model_strategy(DrafterChoice(target, 4), xtok.target, target), ModelDrafter)
    setup = qwen_setup({"target": "t", "drafter": "d"})
    assert "pi5-smollm2" in setup.fleet and setup.drafters["pi5-smollm2"].model == "smollm2"
    assert all(name in PROFILES for name in setup.fleet)


def test_the_default_targets_real_tokenizer_keeps_exact_bytes_even_when_not_utf8():
    """SmolLM2's own tokenizer (the default target's package): every id has its exact bytes, and
    bytes that are not UTF-8 (a model may emit half a character) encode byte by byte."""
    from pipeline.models import load_tokenizer
    from workers.translating_drafter import ByteEncoder

    tok = load_tokenizer("smollm2")
    table = byte_table(tok)
    encode = ByteEncoder(tok, table)
    for data in ["naïve café — 日本語 🙂\t\t  x\n\n".encode(), "<|im_start|>user\nhi<|im_end|>".encode(),
                 "日本".encode()[:4] + b" ok \x80"]:
        ids = encode(data)
        assert b"".join(table[i] for i in ids) == data
    assert b"".join(table[i] for i in encode(b"a\xffb")) == b"ab"  # no token holds 0xFF: skipped
    assert encode("<|im_end|>".encode()) == [tok.convert_tokens_to_ids("<|im_end|>")]
