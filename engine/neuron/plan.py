"""Sizing plan: will a model fit on Inferentia2 NeuronCores, and on how many? Arithmetic on config.json only.

Memory is in decimal GB (10^9 bytes), as AWS quotes it: an Inferentia2 chip has 32 GB of HBM
shared by its 2 NeuronCores, so 16 GB per core. A share of it is kept free for what the plan
does not count (activations, the compiled graphs, runtime buffers).

The per-core figures follow how optimum-neuron 0.4.5 shards a Llama-style decoder across
`t` cores (models/inference/backend/modules/attention/gqa.py): query heads are padded up to a
multiple of t; key/value heads are kept when t divides them, replicated up to t when they
divide t, and otherwise expanded to one per query head. Weights and KV cache are then split
evenly across the t cores; only the RMSNorm weights (under 0.01 %) are replicated, and the
vocabulary padding to a multiple of t (fewer than t rows) is left out.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from engine.neuron.sdk import NeuronError, hub_errors
from service.config import NEURON_TP_DEGREES as TP_DEGREES  # the degrees inf2 offers

GB = 10**9
CHIP_MEMORY_BYTES = 32 * GB
CORES_PER_CHIP = 2
CORE_MEMORY_BYTES = CHIP_MEMORY_BYTES // CORES_PER_CHIP
# A planning margin, not a measured figure: leaves 2.4 GB per core for activations and runtime.
HEADROOM = 0.15

INSTANCE_CORES = {"inf2.xlarge": 2, "inf2.8xlarge": 2, "inf2.24xlarge": 12, "inf2.48xlarge": 24}
# The tensor-parallel degrees inf2 instances are used with (powers of two, then whole instances).
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

CONFIG_DIR = Path(__file__).parent / "configs"


class PlanError(NeuronError):
    """The config cannot be read or planned."""


class PlanRefused(PlanError):
    """The model does not fit; carries the plan so that its arithmetic can be shown."""

    def __init__(self, plan: Plan):
        super().__init__(f"{plan.model} {plan.verdict}")
        self.plan = plan


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    max_positions: int
    dtype: str | None  # as config.json states it; None when it does not

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        if "num_local_experts" in config or "num_experts" in config:
            raise PlanError("this plan only sizes dense decoders; the config describes a mixture-of-experts model")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(
                hidden_size=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_positions=int(config["max_position_embeddings"]),
                dtype=config.get("torch_dtype") or config.get("dtype"),
            )
        except KeyError as missing:
            raise PlanError(f"config.json has no {missing.args[0]}: it does not describe a Llama-style decoder") from None


@dataclass(frozen=True)
class ParameterCount:
    embeddings: int
    attention: int
    mlp: int
    norms: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.norms + self.lm_head


@dataclass(frozen=True)
class CoreLoad:
    """What each of `cores` NeuronCores holds."""

    cores: int
    q_heads: int  # after padding to a multiple of cores
    kv_heads: int  # after replication
    weight_bytes: int  # per core
    kv_cache_bytes: int  # per core
    fits: bool

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class Plan:
    model: str
    source: str
    shape: ModelShape
    dtype: str
    batch_size: int
    sequence_length: int
    parameters: ParameterCount
    weight_bytes: int
    kv_cache_bytes: int
    usable_core_bytes: int
    instance: str | None  # None: any inf2 size
    max_cores: int
    loads: tuple[CoreLoad, ...]  # one per tensor-parallel degree the instance offers
    requested_cores: int | None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def load(self, cores: int) -> CoreLoad:
        return next(load for load in self.loads if load.cores == cores)

    @property
    def smallest_fit(self) -> int | None:
        return next((load.cores for load in self.loads if load.fits), None)

    @property
    def cores(self) -> int | None:
        """The cores asked for, or else the fewest that fit; None when none fits."""
        return self.requested_cores if self.requested_cores is not None else self.smallest_fit

    @property
    def fits(self) -> bool:
        return self.cores is not None and self.load(self.cores).fits

    @property
    def verdict(self) -> str:
        where = self.instance or "any inf2 instance"
        if self.fits:
            return (
                f"fits on {self.cores} NeuronCore(s) ({gb(self.load(self.cores).total_bytes)} of {gb(self.usable_core_bytes)} "
                f"usable per core); smallest instance: {smallest_instance(self.cores)}"
            )
        if self.requested_cores is not None and self.smallest_fit is not None:
            return (
                f"does not fit on {self.requested_cores} NeuronCore(s) "
                f"({gb(self.load(self.requested_cores).total_bytes)} per core > {gb(self.usable_core_bytes)} usable); "
                f"{self.smallest_fit} cores would fit"
            )
        return (
            f"does not fit {where} ({self.max_cores} NeuronCores at most): even on {self.loads[-1].cores} cores each needs "
            f"{gb(self.loads[-1].total_bytes)} > {gb(self.usable_core_bytes)} usable"
        )


def gb(size: int) -> str:
    return f"{size / GB:.2f} GB"


def smallest_instance(cores: int) -> str:
    return next(name for name, available in INSTANCE_CORES.items() if available >= cores)


def bundled_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def read_config(model: str) -> tuple[dict, str]:
    """config.json of `model` (a folder, a config.json, a bundled name, or a Hub id) and where it was read."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{model} has no config.json")
    elif not path.is_file() and model in bundled_configs():
        path = CONFIG_DIR / f"{model}.json"
    elif not path.is_file():
        path = Path(_download_config(model))
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, ValueError) as error:
        raise PlanError(f"cannot read {path}: {error}") from None


def _download_config(model: str) -> str:
    if model.count("/") != 1:
        names = ", ".join(bundled_configs())
        raise PlanError(f"{model} is neither a folder, a config.json, a bundled config ({names}) nor a Hub id like org/name")
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return cached
    offline = f"pass a local folder or config.json instead, or one of: {', '.join(bundled_configs())}"
    if not constants.HF_HUB_OFFLINE and not _reachable(constants.ENDPOINT):
        raise PlanError(f"cannot fetch config.json of {model}: the Hugging Face Hub ({constants.ENDPOINT}) is not reachable from here; {offline}")
    with hub_errors(f"fetch config.json of {model} from the Hugging Face Hub", offline):
        return hf_hub_download(model, "config.json")


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """One TCP connection, so that an offline machine fails in seconds, not after the Hub client's minute of retries."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the client try
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def count_parameters(shape: ModelShape, q_heads: int | None = None, kv_heads: int | None = None) -> ParameterCount:
    """Parameters of a bias-free Llama-style decoder, optionally with padded/replicated attention heads."""
    q_heads = q_heads or shape.heads
    kv_heads = kv_heads or shape.kv_heads
    embeddings = shape.vocab_size * shape.hidden_size
    # q and o projections per query head, k and v per key/value head
    attention = shape.layers * shape.hidden_size * shape.head_dim * (2 * q_heads + 2 * kv_heads)
    mlp = shape.layers * 3 * shape.hidden_size * shape.intermediate_size  # gate, up, down
    norms = (2 * shape.layers + 1) * shape.hidden_size  # two per layer, one final
    lm_head = 0 if shape.tied_embeddings else embeddings
    return ParameterCount(embeddings, attention, mlp, norms, lm_head)


def kv_cache_bytes(shape: ModelShape, sequence_length: int, batch_size: int, dtype_bytes: int, kv_heads: int | None = None) -> int:
    """layers x KV heads x head dim x 2 (K and V) x sequence length x batch x bytes per value."""
    kv_heads = kv_heads or shape.kv_heads
    return shape.layers * kv_heads * shape.head_dim * 2 * sequence_length * batch_size * dtype_bytes


def sharded_heads(shape: ModelShape, cores: int) -> tuple[int, int]:
    """(query heads, key/value heads) once optimum-neuron has made them shardable over `cores`."""
    q_heads = math.ceil(shape.heads / cores) * cores
    if shape.kv_heads == shape.heads:
        return q_heads, q_heads
    if shape.kv_heads % cores == 0:
        return q_heads, shape.kv_heads
    if cores % shape.kv_heads == 0:
        return q_heads, cores
    return q_heads, q_heads


def core_load(shape: ModelShape, cores: int, sequence_length: int, batch_size: int, dtype_bytes: int, usable: int) -> CoreLoad:
    q_heads, kv_heads = sharded_heads(shape, cores)
    params = count_parameters(shape, q_heads, kv_heads)
    weights = ((params.total - params.norms) // cores + params.norms) * dtype_bytes
    kv = kv_cache_bytes(shape, sequence_length, batch_size, dtype_bytes, kv_heads) // cores
    return CoreLoad(cores, q_heads, kv_heads, weights, kv, fits=weights + kv <= usable)


def make_plan(
    config: dict,
    *,
    model: str,
    source: str = "",
    batch_size: int = 1,
    sequence_length: int | None = None,
    instance: str | None = None,
    cores: int | None = None,
    dtype: str | None = None,
    headroom: float = HEADROOM,
) -> Plan:
    shape = ModelShape.from_config(config)
    # optimum-neuron compiles in the checkpoint's dtype; transformers assumes float32 when unset
    dtype = dtype or shape.dtype or "float32"
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {dtype} is not one of {', '.join(DTYPE_BYTES)}")
    # optimum-neuron's own default: the model's context, capped at 4096
    sequence_length = sequence_length or min(shape.max_positions, 4096)
    if sequence_length > shape.max_positions:
        raise PlanError(f"sequence length {sequence_length} exceeds the model's context of {shape.max_positions} tokens")
    if batch_size < 1 or sequence_length < 1:
        raise PlanError("batch size and sequence length must be at least 1")
    if instance is not None and instance not in INSTANCE_CORES:
        raise PlanError(f"unknown instance {instance}: one of {', '.join(INSTANCE_CORES)}")
    max_cores = INSTANCE_CORES[instance] if instance else max(INSTANCE_CORES.values())
    if cores is not None and cores not in TP_DEGREES:
        raise PlanError(f"{cores} cores is not a tensor-parallel degree used on inf2: one of {', '.join(map(str, TP_DEGREES))}")
    if cores is not None and cores > max_cores:
        raise PlanError(f"{cores} cores asked for, but {instance} has {max_cores} NeuronCores")

    width = DTYPE_BYTES[dtype]
    usable = int(CORE_MEMORY_BYTES * (1 - headroom))
    parameters = count_parameters(shape)
    loads = tuple(core_load(shape, t, sequence_length, batch_size, width, usable) for t in TP_DEGREES if t <= max_cores)
    return Plan(
        model=model,
        source=source,
        shape=shape,
        dtype=dtype,
        batch_size=batch_size,
        sequence_length=sequence_length,
        parameters=parameters,
        weight_bytes=parameters.total * width,
        kv_cache_bytes=kv_cache_bytes(shape, sequence_length, batch_size, width),
        usable_core_bytes=usable,
        instance=instance,
        max_cores=max_cores,
        loads=loads,
        requested_cores=cores,
    )


def format_plan(plan: Plan) -> str:
    s, p, width = plan.shape, plan.parameters, plan.dtype_bytes
    row = "  {:<11} {:<52} = {:>15,}"
    lines = [
        f"Plan for {plan.model}" + (f" ({plan.source})" if plan.source and plan.source != plan.model else ""),
        f"shape: hidden {s.hidden_size}, {s.layers} layers, {s.heads} attention heads, {s.kv_heads} KV heads, "
        f"head dim {s.head_dim}, intermediate {s.intermediate_size}, vocab {s.vocab_size}, "
        f"lm_head {'tied to embeddings' if s.tied_embeddings else 'untied'}",
        "parameters:",
        row.format("embeddings", f"{s.vocab_size} x {s.hidden_size}", p.embeddings),
        row.format("attention", f"{s.layers} x {s.hidden_size} x {s.head_dim} x (2x{s.heads} q/o + 2x{s.kv_heads} k/v)", p.attention),
        row.format("mlp", f"{s.layers} x 3 x {s.hidden_size} x {s.intermediate_size}", p.mlp),
        row.format("norms", f"(2 x {s.layers} + 1) x {s.hidden_size}", p.norms),
        row.format("lm_head", "tied" if s.tied_embeddings else f"{s.vocab_size} x {s.hidden_size}", p.lm_head),
        row.format("total", f"({p.total / 1e9:.2f} B)", p.total),
        "memory (GB = 10^9 bytes):",
        f"  weights     {p.total:,} x {width} bytes ({plan.dtype}) = {gb(plan.weight_bytes)}",
        f"  KV cache    {s.layers} layers x {s.kv_heads} KV heads x {s.head_dim} head dim x 2 (K,V) x {plan.sequence_length} tokens"
        f" x batch {plan.batch_size} x {width} bytes = {gb(plan.kv_cache_bytes)}",
        f"  total       {gb(plan.weight_bytes)} + {gb(plan.kv_cache_bytes)} = {gb(plan.total_bytes)}",
        f"  per core    {CHIP_MEMORY_BYTES // GB} GB HBM per Inferentia2 chip / {CORES_PER_CHIP} cores = {gb(CORE_MEMORY_BYTES)},"
        f" minus {1 - plan.usable_core_bytes / CORE_MEMORY_BYTES:.0%} headroom = {gb(plan.usable_core_bytes)} usable",
        f"per NeuronCore at each tensor-parallel degree ({plan.instance or 'any inf2 instance'}: up to {plan.max_cores} cores;"
        " heads padded/replicated as optimum-neuron shards them):",
        "  cores  q heads  kv heads     weights    KV cache       total  fits",
    ]
    for load in plan.loads:
        lines.append(
            f"  {load.cores:>5}  {load.q_heads:>7}  {load.kv_heads:>8}  {gb(load.weight_bytes):>10}  {gb(load.kv_cache_bytes):>10}"
            f"  {gb(load.total_bytes):>10}  {'yes' if load.fits else 'no'}"
        )
    lines.append(f"verdict: {plan.verdict}")
    return "\n".join(lines)
