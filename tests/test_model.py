"""model.py: KV-cache sampling equals full recomputation, per-row stopping, scoring of padded batches, tokenizer."""
import random

import pytest
import torch
import torch.nn.functional as F

from model import (EOS, GPT, PAD, VOCAB_SIZE, GPTConfig, completion_logits, completion_logits_shared, decode, encode,
                   generate, n_params)

PROMPT_LENS = (1, 4, 9, 2)
MAX_NEW = 12


def tiny_gpt(seed=0):
    """A random 1-layer GPT with large weights (so its next-token distribution depends sharply on the context)
    and a bias towards EOS (so rows stop at different lengths)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" not in name:
                p.normal_(std=0.3)
        e = m.wte.weight[EOS]
        m.ln_f.bias.copy_(4.0 * e / e.norm() ** 2)  # adds 4 to EOS's logit
    return m.eval()


def prompts(seed=0, lens=PROMPT_LENS):
    rng = random.Random(seed)
    ok = [t for t in range(1, VOCAB_SIZE) if t != EOS]
    return [[rng.choice(ok) for _ in range(n)] for n in lens]


def sample(model, use_cache, temperature=1.0, n=3, seed=5):
    return generate(model, prompts(), n, MAX_NEW, temperature, torch.Generator().manual_seed(seed), use_cache=use_cache)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_kv_cache_gives_the_same_tokens_as_recomputation(temperature):
    """Under the same generator seed, use_cache=True and use_cache=False sample the same tokens and log-probs."""
    model = tiny_gpt()
    (c1, lp1), (c2, lp2) = sample(model, True, temperature), sample(model, False, temperature)
    assert c1 == c2
    for a, b in zip(lp1, lp2):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    assert len({len(c) for c in c1}) > 2  # rows of several lengths: the per-row stopping is exercised


def test_every_row_stops_at_its_own_eos():
    """Each completion has EOS only as its last token, or is cut at max_new_tokens; some stop early, some are cut."""
    comps, logps = sample(tiny_gpt(), True, n=4)
    assert len(comps) == len(PROMPT_LENS) * 4
    for c, lp in zip(comps, logps):
        assert EOS not in c[:-1] and len(lp) == len(c) and 1 <= len(c) <= MAX_NEW
        assert c[-1] == EOS or len(c) == MAX_NEW
    assert any(c[-1] == EOS and len(c) < MAX_NEW for c in comps) and any(c[-1] != EOS for c in comps)


def test_rows_of_a_group_sample_their_own_tokens():
    """At temperature 1 the G rows of one prompt differ (each draws its own first token); greedy rows are equal."""
    G = 8
    comps, _ = generate(tiny_gpt(), prompts(), G, MAX_NEW, 1.0, torch.Generator().manual_seed(0))
    for i in range(len(PROMPT_LENS)):
        group = comps[i * G : (i + 1) * G]
        assert len({c[0] for c in group}) > 1
    greedy, _ = generate(tiny_gpt(), prompts(), G, MAX_NEW, 0.0)
    for i in range(len(PROMPT_LENS)):
        assert all(c == greedy[i * G] for c in greedy[i * G : (i + 1) * G])


def test_sampler_logprobs_match_scoring_each_row_alone():
    """The log-probs generate reports for a left-padded batch equal those of each prompt scored alone."""
    model = tiny_gpt()
    comps, logps = sample(model, True, n=2)
    ps = prompts()
    with torch.no_grad():
        for k, (c, lp) in enumerate(zip(comps, logps)):
            logits, targets = completion_logits(model, [ps[k // 2]], [c], "cpu")
            want = F.log_softmax(logits[0], -1).gather(1, targets[0][:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(lp), want, atol=1e-4, rtol=1e-4)


def test_greedy_follows_the_argmax():
    """temperature 0 picks the most likely next token at every step."""
    model = tiny_gpt()
    comps, _ = generate(model, prompts(), 1, MAX_NEW, 0.0)
    with torch.no_grad():
        for p, c in zip(prompts(), comps):
            logits, _ = completion_logits(model, [p], [c], "cpu")
            assert logits[0].argmax(-1).tolist() == c


def test_completion_logits_of_a_padded_batch_equal_each_alone():
    """Scoring right-padded sequences of different lengths in one batch gives each row's solo logits."""
    model = tiny_gpt()
    rng = random.Random(3)
    prefixes = [[rng.randrange(1, 256) for _ in range(n)] for n in (3, 7, 1, 5)]
    comps = [[rng.randrange(1, 256) for _ in range(n)] for n in (4, 1, 6, 2)]
    with torch.no_grad():
        logits, targets = completion_logits(model, prefixes, comps, "cpu")
        assert logits.shape == (4, 6, VOCAB_SIZE) and targets.shape == (4, 6)
        for i, (p, c) in enumerate(zip(prefixes, comps)):
            solo, solo_t = completion_logits(model, [p], [c], "cpu")
            torch.testing.assert_close(logits[i, : len(c)], solo[0], atol=1e-5, rtol=1e-5)
            assert targets[i, : len(c)].tolist() == c and (targets[i, len(c):] == -1).all()


def test_tokenizer_round_trips_ascii_one_token_per_byte():
    """Any ASCII string (control characters included) encodes to one token per character and decodes back."""
    rng = random.Random(0)
    for _ in range(300):
        s = "".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 60)))
        ids = encode(s)
        assert decode(ids) == s and ids == [ord(ch) for ch in s]
    assert encode("A48:dagab>") == list(b"A48:dagab>") and encode("\n") == [EOS] and encode("\x00") == [PAD]


def test_tokenizer_round_trips_utf8():
    """Non-ASCII text is split into its UTF-8 bytes and decodes back."""
    s = "é→漢字🙂"
    assert len(encode(s)) == len(s.encode()) and decode(encode(s)) == s


def test_shared_prefix_scoring_equals_scoring_each_row():
    """The teacher's path: prefixes that repeat (a group's shared context) run once; the logits match the full
    forward."""
    model, rng = tiny_gpt(), random.Random(3)
    distinct = [[rng.randrange(1, VOCAB_SIZE) for _ in range(n)] for n in (1, 7, 19)]
    prefixes = [distinct[i % 3] for i in range(9)]
    completions = [[rng.randrange(1, VOCAB_SIZE) for _ in range(rng.choice((1, 2, 6, 11)))] for _ in range(9)]
    a, ta = completion_logits(model, prefixes, completions, "cpu")
    b, tb = completion_logits_shared(model, prefixes, completions, "cpu")
    assert torch.equal(ta, tb) and a.shape == b.shape
    torch.testing.assert_close(a[ta >= 0], b[tb >= 0], atol=1e-4, rtol=1e-4)
    one = completion_logits_shared(model, prefixes[:2], [[5], [6]], "cpu")[0]  # one-token completions: the prefill
    torch.testing.assert_close(one, completion_logits(model, prefixes[:2], [[5], [6]], "cpu")[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [GPTConfig(64, 1, 2, 32), GPTConfig(256, 3, 4, 128), GPTConfig(16, 2, 1, 8),
                                 GPTConfig(8, 4, 6, 36)], ids=str)
def test_n_params_is_the_parameter_count_of_the_built_model(cfg):
    """config.check_fit sizes a model before building it: n_params(cfg) is what GPT(cfg) holds (the head is tied)."""
    assert n_params(cfg) == sum(p.numel() for p in GPT(cfg).parameters())
