import json

import pytest
import torch
from torch import nn

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.evaluation.speed import (
    Spread,
    benchmark_speed,
    compare_speed,
    greedy_decode,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    parse_shapes,
)
from prunekit.report.speed import speed_table
from tests.conftest import make_tiny_model

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 3


class ZeroAttention(nn.Module):
    """Stands in for a pruned attention block: contributes nothing and never touches the cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def _analytical_kv_bytes(layers_with_attention: int, element_bytes: int) -> int:
    return 2 * layers_with_attention * KV_HEADS * HEAD_DIM * element_bytes


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_is_analytical(family, dtype):
    model = make_tiny_model(family, kv_heads=KV_HEADS, layers=LAYERS).to(dtype)
    element_bytes = torch.finfo(dtype).bits // 8
    assert kv_cache_bytes_per_token(model, tokens=12, batch=2) == _analytical_kv_bytes(LAYERS, element_bytes)


@pytest.mark.parametrize("removed", [[0], [1], [0, 2], [0, 1, 2]])
def test_kv_bytes_skip_layers_without_attention(removed):
    model = make_tiny_model("llama", kv_heads=KV_HEADS, layers=LAYERS)
    for index in removed:
        model.model.layers[index].self_attn = ZeroAttention()
    expected = _analytical_kv_bytes(LAYERS - len(removed), 4)
    assert kv_cache_bytes_per_token(model, tokens=10) == expected


def test_kv_cache_bytes_of_legacy_tuples_and_empty_entries():
    key = torch.zeros(1, 2, 5, 16)
    legacy = ((key, key.clone()), None, (torch.empty(0), torch.empty(0)))
    assert kv_cache_bytes(legacy) == 2 * key.numel() * 4
    assert kv_cache_bytes(((key, key),)) == key.numel() * 4  # the same tensor twice counts once


def _reference_greedy(model, prompt, new_tokens):
    """No cache at all: rerun the whole sequence for every token."""
    ids = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, prompt.shape[1]:]


@pytest.mark.parametrize("removed", [[], [0]])
def test_greedy_decode_matches_uncached_reference(removed):
    model = make_tiny_model("llama", kv_heads=KV_HEADS, layers=LAYERS)
    for index in removed:
        model.model.layers[index].self_attn = ZeroAttention()
    prompt = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    generated, seconds = greedy_decode(model, prompt, 7)
    assert generated.shape == (1, 7) and seconds > 0
    assert torch.equal(generated, _reference_greedy(model, prompt, 7))


@pytest.mark.parametrize(
    "text,expected",
    [("1x128", [(1, 128)]), ("1x128,4X512", [(1, 128), (4, 512)]), (" 2 x 8 , 1x4 ", [(2, 8), (1, 4)])],
)
def test_parse_shapes(text, expected):
    assert parse_shapes(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "1x", "x128", "ax2", "1*128", "1x128,", "0x8", "2x0", "1x2x3", "-1x8"])
def test_parse_shapes_rejects_malformed(text):
    with pytest.raises(PrunekitError, match="--shapes"):
        parse_shapes(text)


def test_spread_orders_and_keeps_runs():
    spread = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (spread.minimum, spread.median, spread.maximum) == (1.0, 2.5, 10.0)
    assert spread.q1 <= spread.median <= spread.q3 and spread.runs == [3.0, 1.0, 2.0, 10.0]
    assert Spread.of([4.0]).q1 == Spread.of([4.0]).q3 == 4.0


def test_benchmark_speed_on_tiny_model():
    model = make_tiny_model("llama", kv_heads=KV_HEADS, layers=LAYERS)
    result = benchmark_speed(model, [(1, 8), (2, 16)], decode_tokens=4, repeats=2, warmup=1, label="tiny")
    assert [r.shape for r in result.prefill] == ["1x8", "2x16"]
    for spread in [r.tokens_per_second for r in result.prefill] + [result.decode.tokens_per_second]:
        assert len(spread.runs) == 2 and all(value > 0 for value in spread.runs)
    assert result.parameters == sum(p.numel() for p in model.parameters())
    assert result.weight_bytes == 4 * result.parameters
    assert result.kv_bytes_per_token == _analytical_kv_bytes(LAYERS, 4)
    assert result.peak_memory_bytes is None or result.peak_memory_bytes >= 0
    assert result.machine["torch_threads"] == torch.get_num_threads()
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["decode"]["new_tokens"] == 4 and payload["memory_method"]


def test_compare_and_table():
    dense = benchmark_speed(make_tiny_model("llama"), [(1, 8)], decode_tokens=None, repeats=1, warmup=0)
    pruned_model = make_tiny_model("llama")
    pruned_model.model.layers[1].self_attn = ZeroAttention()
    pruned = benchmark_speed(pruned_model, [(1, 8)], decode_tokens=None, repeats=1, warmup=0)
    ratios = compare_speed(pruned, dense)
    assert ratios["kv_bytes_per_token"] == pytest.approx(2 / 3)
    assert ratios["parameters"] < 1 and ratios["prefill_tokens_per_second"]["1x8"] > 0
    assert ratios["decode_tokens_per_second"] is None
    headers, rows = speed_table([pruned, dense], ratios)
    assert len(rows) == 3 and rows[-1][0] == "ratio" and all(len(row) == len(headers) for row in rows)


@pytest.mark.parametrize("bad", [{"repeats": 0}, {"warmup": -1}])
def test_benchmark_rejects_bad_counts(bad):
    with pytest.raises(PrunekitError):
        benchmark_speed(make_tiny_model("llama"), [(1, 4)], decode_tokens=None, **bad)


def test_shapes_beyond_context_are_an_error():
    with pytest.raises(PrunekitError, match="context"):
        benchmark_speed(make_tiny_model("llama"), [(1, 513)], decode_tokens=None, repeats=1)


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["bench", "--shapes", "1x"], "--shapes item '1x'"),
        (["bench", "--shapes", "4by512"], "is not BATCHxLENGTH"),
        (["bench", "--decode-tokens", "1"], "--decode-tokens"),
        (["bench", "--repeats", "0"], "--repeats"),
    ],
)
def test_cli_bad_input_one_line_exit_2(capsys, argv, pattern):
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and pattern in lines[0]


def test_cli_bench_vs_writes_json(tmp_path, tiny_tokenizer, capsys):
    directory = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(directory), "--vs", str(directory), "--shapes", "1x8,2x8", "--repeats", "1",
            "--decode-tokens", "3", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "prefill 2x8 tok/s" in text and "ratio" in text
    report = json.loads(out.read_text())
    assert len(report["models"]) == 2 and report["ratios"]["parameters"] == 1.0
