"""The inf2 sizing plan: parameter counts, bytes, KV cache, per-core fit, refusals, and the shown arithmetic."""

from __future__ import annotations

import json

import pytest

from engine.neuron import plan as planning
from engine.neuron.plan import (
    GB,
    ModelShape,
    PlanError,
    count_parameters,
    format_plan,
    kv_cache_bytes,
    make_plan,
    read_config,
    sharded_heads,
)


def config(name: str) -> dict:
    return read_config(name)[0]


def shape(name: str) -> ModelShape:
    return ModelShape.from_config(config(name))


@pytest.mark.parametrize(
    ("name", "published"),
    [("llama-2-7b", 6.74e9), ("llama-2-13b", 13.02e9), ("llama-2-70b", 68.98e9)],
)
def test_parameter_counts_match_the_published_sizes(name, published):
    total = count_parameters(shape(name)).total
    assert abs(total - published) / published < 0.01, f"{name}: {total:,}"


def test_parameter_count_by_hand_for_7b():
    p = count_parameters(shape("llama-2-7b"))
    assert p.embeddings == 32000 * 4096
    assert p.attention == 32 * 4 * 4096 * 4096  # q, k, v, o: all 4096 x 4096 without GQA
    assert p.mlp == 32 * 3 * 4096 * 11008
    assert p.norms == (2 * 32 + 1) * 4096
    assert p.lm_head == p.embeddings
    assert p.total == 6_738_415_616


def test_gqa_shrinks_only_the_key_value_projections():
    p = count_parameters(shape("llama-2-70b"))
    per_layer_q_o = 2 * 8192 * 8192
    per_layer_k_v = 2 * 8192 * 8 * 128
    assert p.attention == 80 * (per_layer_q_o + per_layer_k_v)


def test_tied_embeddings_have_no_separate_lm_head():
    tied = ModelShape.from_config({**config("llama-2-7b"), "tie_word_embeddings": True})
    untied = shape("llama-2-7b")
    assert count_parameters(tied).lm_head == 0
    assert count_parameters(untied).total - count_parameters(tied).total == 32000 * 4096


def test_kv_cache_bytes_on_a_hand_computed_case():
    small = ModelShape(
        hidden_size=64, layers=2, heads=8, kv_heads=4, head_dim=8, intermediate_size=128,
        vocab_size=100, tied_embeddings=False, max_positions=64, dtype="float16",
    )
    # 2 layers x 4 KV heads x 8 head dim x 2 (K and V) x 16 tokens x batch 3 x 2 bytes
    assert kv_cache_bytes(small, sequence_length=16, batch_size=3, dtype_bytes=2) == 12_288
    assert kv_cache_bytes(shape("llama-2-13b"), 4096, 1, 2) == 40 * 40 * 128 * 2 * 4096 * 2 == 3_355_443_200


def test_weight_bytes_follow_the_dtype():
    fp16 = make_plan(config("llama-2-7b"), model="7b")
    fp32 = make_plan(config("llama-2-7b"), model="7b", dtype="float32")
    assert fp16.dtype == "float16"  # from config.json
    assert fp32.weight_bytes == 2 * fp16.weight_bytes == 4 * fp16.parameters.total


def test_13b_fp16_does_not_fit_one_core():
    plan = make_plan(config("llama-2-13b"), model="llama-2-13b", sequence_length=4096, cores=1)
    assert 25.9 * GB < plan.weight_bytes < 26.1 * GB
    assert plan.weight_bytes > 16 * GB  # more than a NeuronCore has at all, headroom aside
    assert not plan.fits
    assert "does not fit on 1 NeuronCore(s)" in plan.verdict
    assert "4 cores would fit" in plan.verdict


def test_13b_at_4096_tokens_fits_four_cores_at_least():
    plan = make_plan(config("llama-2-13b"), model="llama-2-13b", sequence_length=4096, batch_size=1)
    # 2 cores: (26.03 + 3.36) / 2 = 14.69 GB > 13.6 GB usable; 4 cores: 7.35 GB
    assert not plan.load(2).fits
    assert plan.cores == 4 and plan.fits
    assert plan.load(4).total_bytes == pytest.approx((plan.weight_bytes + plan.kv_cache_bytes) / 4, rel=1e-4)
    assert "smallest instance: inf2.24xlarge" in plan.verdict


def test_7b_fits_the_two_cores_of_an_inf2_xlarge():
    plan = make_plan(config("llama-2-7b"), model="llama-2-7b", sequence_length=4096, instance="inf2.xlarge")
    assert plan.cores == 2 and plan.fits
    assert [load.cores for load in plan.loads] == [1, 2]


def test_70b_needs_a_48xlarge_and_is_refused_on_smaller_instances():
    anywhere = make_plan(config("llama-2-70b"), model="llama-2-70b")
    assert anywhere.cores == 24 and anywhere.fits
    refused = make_plan(config("llama-2-70b"), model="llama-2-70b", instance="inf2.24xlarge")
    assert not refused.fits and refused.cores is None
    assert refused.verdict.startswith("does not fit inf2.24xlarge (12 NeuronCores at most)")


def test_heads_are_padded_and_replicated_as_optimum_neuron_shards_them():
    assert sharded_heads(shape("llama-2-13b"), 8) == (40, 40)
    assert sharded_heads(shape("llama-2-13b"), 24) == (48, 48)  # 40 -> 48 query heads, MHA keeps K/V = Q
    assert sharded_heads(shape("llama-2-70b"), 8) == (64, 8)
    assert sharded_heads(shape("llama-2-70b"), 24) == (72, 24)  # 8 K/V heads replicated to one per core
    assert sharded_heads(shape("llama-2-70b"), 12) == (72, 72)  # 12 is no multiple of 8: converted to MHA


def test_larger_batch_and_context_grow_only_the_kv_cache():
    base = make_plan(config("llama-2-13b"), model="13b", sequence_length=2048, batch_size=1)
    big = make_plan(config("llama-2-13b"), model="13b", sequence_length=4096, batch_size=4)
    assert big.weight_bytes == base.weight_bytes
    assert big.kv_cache_bytes == 8 * base.kv_cache_bytes


def test_the_output_shows_the_arithmetic():
    text = format_plan(make_plan(config("llama-2-13b"), model="llama-2-13b", sequence_length=4096))
    assert "13,015,864,320 x 2 bytes (float16) = 26.03 GB" in text
    assert "40 layers x 40 KV heads x 128 head dim x 2 (K,V) x 4096 tokens x batch 1 x 2 bytes = 3.36 GB" in text
    assert "32 GB HBM per Inferentia2 chip / 2 cores = 16.00 GB, minus 15% headroom = 13.60 GB usable" in text
    assert "40 x 3 x 5120 x 13824" in text
    rows = {line.split()[0]: line.split()[-1] for line in text.splitlines() if line.strip()[:2].strip().isdigit()}
    assert rows["1"] == "no" and rows["2"] == "no" and rows["4"] == "yes"
    assert text.splitlines()[-1] == f"verdict: {make_plan(config('llama-2-13b'), model='llama-2-13b').verdict}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sequence_length": 8192}, "exceeds the model's context of 4096"),
        ({"cores": 3}, "3 cores is not a tensor-parallel degree"),
        ({"cores": 12, "instance": "inf2.8xlarge"}, "inf2.8xlarge has 2 NeuronCores"),
        ({"instance": "inf2.96xlarge"}, "unknown instance inf2.96xlarge"),
        ({"dtype": "int8"}, "dtype int8 is not one of"),
        ({"batch_size": 0}, "at least 1"),
    ],
)
def test_impossible_requests_are_refused(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(config("llama-2-7b"), model="7b", **kwargs)


def test_mixture_of_experts_and_foreign_configs_are_refused():
    with pytest.raises(PlanError, match="mixture-of-experts"):
        ModelShape.from_config({**config("llama-2-7b"), "num_local_experts": 8})
    with pytest.raises(PlanError, match="no intermediate_size"):
        ModelShape.from_config({k: v for k, v in config("llama-2-7b").items() if k != "intermediate_size"})


def test_read_config_from_a_folder_a_file_and_a_bundled_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config("llama-2-7b")))
    assert read_config(str(tmp_path))[0] == read_config(str(tmp_path / "config.json"))[0] == config("llama-2-7b")
    assert read_config("llama-2-7b")[1].endswith("configs/llama-2-7b.json")


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(PlanError, match="has no config.json"):
        read_config(str(tmp_path))


def test_names_that_are_nothing_are_refused():
    with pytest.raises(PlanError, match="neither a folder, a config.json, a bundled config"):
        read_config("llama-2-9b")


def test_a_hub_id_offline_fails_with_one_sentence(monkeypatch):
    monkeypatch.setattr(planning, "_reachable", lambda url, timeout_s=3.0: False)
    with pytest.raises(PlanError) as raised:
        read_config("some-org/never-cached-model")
    message = str(raised.value)
    assert message.startswith("cannot fetch config.json of some-org/never-cached-model")
    assert "\n" not in message
