"""A tiny model where the answer is known: some KV groups and FFN channels are made exactly useless (their output
weights are zero, kept at zero while the model is trained briefly on a copy task), so every other unit matters."""

from __future__ import annotations

import torch

from prunekit.data.windows import TokenWindows
from tests.conftest import make_tiny_model

USELESS_GROUP = 2  # in every layer, of 3 KV groups
USELESS_CHANNELS = 4  # the first 4 of 12 channels in every layer
VOCAB_USED = 64
_CHAIN = torch.randperm(VOCAB_USED, generator=torch.Generator().manual_seed(123)) + 3  # next token of a chain


def copy_task(count: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    """First halves follow a fixed random permutation from a random start (next token = f(token): a lookup the tied
    embeddings cannot do alone), repeated as second halves (a copy: attention)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(3, 3 + VOCAB_USED, (count,), generator=generator)]
    for _ in range(length // 2 - 1):
        tokens.append(_CHAIN[tokens[-1] - 3])
    first = torch.stack(tokens, dim=1)
    return torch.cat([first, first], dim=1)


def _zero_useless(model) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            dh, g = 16, 2
            columns = slice(USELESS_GROUP * g * dh, (USELESS_GROUP + 1) * g * dh)
            layer.self_attn.o_proj.weight[:, columns] = 0.0
            layer.mlp.down_proj.weight[:, :USELESS_CHANNELS] = 0.0


def model_with_useless_units(steps: int = 300, seed: int = 0):
    """A 3-layer llama (hidden 96, 6 heads, 3 KV groups, 12 channels, tied embeddings) trained on the copy task,
    the useless units kept at zero."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the tests' single-thread fixture; tiny matmuls
    try:
        return _trained(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _trained(steps: int, seed: int):
    model = make_tiny_model("llama", 6, 3, layers=3, seed=seed, hidden_size=96, intermediate_size=12,
                            tie_word_embeddings=True)
    _zero_useless(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = copy_task(16, seed=1000 + step)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _zero_useless(model)
    return model.eval()


@torch.no_grad()
def own_samples(model, count: int = 96, length: int = 32, seed: int = 7) -> torch.Tensor:
    """Sequences sampled from the model itself: on them the dense model is the best model in expectation, so
    removing any unit that changes its output raises the expected loss (by the KL divergence), and removing a
    useless one changes nothing. (On the training task a half-trained unit can be harmful, which blurs the test.)"""
    generator = torch.Generator().manual_seed(seed)
    ids = copy_task(count, length, seed)[:, :1]
    for _ in range(length - 1):
        probabilities = torch.softmax(model(ids).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
    return ids


def calibration(model, count: int = 96, seed: int = 7) -> TokenWindows:
    ids = own_samples(model, count, seed=seed)
    return TokenWindows(ids, "own-samples", "calibration", ids.shape[1], "none", "random", seed, ids.numel())
