"""Neuron commands and loading without the Neuron SDK: arguments, refusals, one-sentence errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from transformers import GenerationConfig

from engine.neuron import cli
from engine.neuron.plan import read_config
from engine.neuron.progress import stage
from engine.neuron.sdk import NeuronError, missing_modules
from service.config import GenerationSettings, ModelSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
# The Neuron commands through a real argparse parser, as `chatbot` registers them.
ENTRY = (
    "import argparse, sys; from engine.neuron import cli; "
    "p = argparse.ArgumentParser(prog='chatbot'); cli.register(p.add_subparsers(dest='command', required=True)); "
    "a = p.parse_args(); sys.exit(a.handler(a))"
)
no_sdk = pytest.mark.skipif(not missing_modules(), reason="the Neuron SDK is installed here")


@pytest.fixture(autouse=True)
def restore_logging():
    """export and push set up the JSON log handler for the process; keep that out of other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbot")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def chatbot(*argv: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"PYTHONPATH": str(ROOT)} | env
    return subprocess.run([sys.executable, "-c", ENTRY, *argv], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)


def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]  # JSON log lines aside
    assert len(lines) == 1, stderr
    assert lines[0].startswith("chatbot: ")
    return lines[0]


# --- arguments ---------------------------------------------------------------------------------


def test_export_takes_num_cores_as_an_alias_of_cores():
    args = parser().parse_args(["export", "m", "out", "--batch-size", "2", "--sequence-length", "1024", "--num-cores", "8"])
    assert (args.cores, args.batch_size, args.sequence_length, args.output_dir) == (8, 2, 1024, Path("out"))
    assert args.handler is cli.export_command
    assert parser().parse_args(["plan", "m", "--num-cores", "4"]).cores == 4


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "m", "out", "--batch-size", "1", "--sequence-length", "1024"],  # no cores
        ["export", "m", "out", "--batch-size", "1", "--cores", "2"],  # no sequence length
        ["export", "m", "out", "--batch-size", "0", "--sequence-length", "1024", "--cores", "2"],
        ["plan", "m", "--cores", "3"],
        ["plan", "m", "--instance", "inf2.96xlarge"],
        ["push", "out", "--repo-id", "no-slash"],
    ],
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(argv)
    assert exited.value.code == 2
    assert "usage: chatbot" in capsys.readouterr().err


# --- plan ----------------------------------------------------------------------------------------


def test_plan_prints_the_arithmetic_and_exits_0_when_it_fits():
    done = chatbot("plan", "llama-2-13b", "--sequence-length", "4096")
    assert done.returncode == 0, done.stderr
    assert "verdict: fits on 4 NeuronCore(s)" in done.stdout
    assert "= 26.03 GB" in done.stdout and done.stderr == ""


def test_plan_refuses_with_the_arithmetic_shown_and_exits_1():
    done = chatbot("plan", "llama-2-70b", "--instance", "inf2.24xlarge")
    assert done.returncode == 1
    assert "137.95 GB" in done.stdout  # the weights line is shown with the refusal
    assert "refused: llama-2-70b does not fit inf2.24xlarge" in one_sentence(done.stderr)


def test_plan_of_an_unknown_name_is_one_sentence():
    done = chatbot("plan", "llama-3-8b")
    assert done.returncode == 1 and done.stdout == ""
    assert "neither a folder, a config.json, a bundled config" in one_sentence(done.stderr)


# --- export --------------------------------------------------------------------------------------


@no_sdk
def test_export_without_the_sdk_fails_at_once_with_one_sentence(tmp_path):
    started = time.monotonic()
    done = chatbot("export", "meta-llama/Llama-2-13b-chat-hf", str(tmp_path / "out"),
                   "--batch-size", "1", "--sequence-length", "4096", "--num-cores", "8")
    assert done.returncode == 1
    message = one_sentence(done.stderr)
    assert "export needs the AWS Neuron SDK" in message
    assert "torch_neuronx" in message and "neuronx_distributed" in message
    assert "Neuron DLAMI" in message and "optimum-neuron[neuronx]" in message
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 30  # no Hub lookups, no model loading


@pytest.fixture
def sdk_present(monkeypatch):
    """Pretend the SDK is here: what export checks before it imports optimum.neuron."""
    from engine.neuron import export

    monkeypatch.setattr(export, "require_sdk", lambda action: None)
    monkeypatch.setattr(export, "local_checkpoint", lambda model: pytest.fail("got past the checks to the download"))


def checkpoint(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(read_config(name)[0]))
    return folder


def export_args(model, output_dir, cores: str) -> argparse.Namespace:
    return parser().parse_args(["export", str(model), str(output_dir), "--batch-size", "1", "--sequence-length", "4096", "--cores", cores])


def test_export_runs_the_plan_first_and_refuses_what_does_not_fit(sdk_present, tmp_path, capsys):
    args = export_args(checkpoint(tmp_path, "llama-2-13b"), tmp_path / "out", cores="2")
    assert args.handler(args) == 1
    out, err = capsys.readouterr()
    assert "14.69 GB" in out  # the 2-core row of the arithmetic
    assert "refused:" in one_sentence(err) and "4 cores would fit" in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_folder_before_compiling(sdk_present, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    args = export_args(checkpoint(tmp_path, "llama-2-7b"), out, cores="2")
    assert args.handler(args) == 1
    assert "already exists and is not an empty folder" in one_sentence(capsys.readouterr().err)


def test_export_refuses_a_bundled_config_name(sdk_present, tmp_path, capsys):
    args = export_args("llama-2-7b", tmp_path / "out", cores="2")
    assert args.handler(args) == 1
    assert "bundled config for `chatbot plan` only" in one_sentence(capsys.readouterr().err)


class FakeOptimumNeuron:
    """Records how the code drives optimum.neuron's NeuronModelForCausalLM (which needs the SDK to run)."""

    def __init__(self, compiled_shape: dict | None = None):
        self.calls: list[tuple] = []
        self.compiled_shape = compiled_shape or {}
        fake = self

        class Model:
            neuron_config = SimpleNamespace(on_device_sampling=True, **self.compiled_shape)
            generation_config = GenerationConfig(eos_token_id=2)

            def save_pretrained(self, path):
                fake.calls.append(("save_pretrained", path))

        class NeuronModelForCausalLM:
            @staticmethod
            def get_neuron_config(model, **kwargs):
                fake.calls.append(("get_neuron_config", model, kwargs))
                return "neuron-config"

            @staticmethod
            def export(model, neuron_config, **kwargs):
                fake.calls.append(("export", model, neuron_config, kwargs))
                return Model()

            @staticmethod
            def from_pretrained(model):
                fake.calls.append(("from_pretrained", model))
                return Model()

        class AutoTokenizer:
            @staticmethod
            def from_pretrained(path):
                fake.calls.append(("tokenizer", str(path)))
                return SimpleNamespace(eos_token_id=2, pad_token_id=None, save_pretrained=lambda out: fake.calls.append(("save_tokenizer", out)))

        self.module = SimpleNamespace(NeuronModelForCausalLM=NeuronModelForCausalLM)
        self.AutoTokenizer = AutoTokenizer


def test_export_compiles_with_the_planned_shape_then_saves_model_and_tokenizer(monkeypatch, tmp_path, capsys):
    import transformers

    from engine.neuron import export

    fake = FakeOptimumNeuron()
    monkeypatch.setitem(sys.modules, "optimum.neuron", fake.module)
    monkeypatch.setattr(transformers, "AutoTokenizer", fake.AutoTokenizer)
    monkeypatch.setattr(export, "require_sdk", lambda action: None)
    source = checkpoint(tmp_path, "llama-2-13b")
    out = tmp_path / "compiled"
    args = export_args(source, out, cores="8")
    assert args.handler(args) == 0
    assert fake.calls == [
        ("get_neuron_config", str(source), {"batch_size": 1, "sequence_length": 4096, "tensor_parallel_size": 8, "instance_type": "inf2"}),
        ("export", str(source), "neuron-config", {"load_weights": False}),
        ("save_pretrained", str(out)),
        ("tokenizer", str(source)),
        ("save_tokenizer", str(out)),
    ]
    assert "tensor_parallel_size: 8" in capsys.readouterr().out


def test_backend_load_checks_the_compiled_shape_before_loading(monkeypatch, tmp_path):
    import engine.serving.neuron_engine as neuron

    fake = FakeOptimumNeuron({"batch_size": 2, "sequence_length": 1024, "tp_degree": 4})
    monkeypatch.setitem(sys.modules, "optimum.neuron", fake.module)
    monkeypatch.setattr(neuron, "AutoTokenizer", fake.AutoTokenizer)
    monkeypatch.setattr(neuron, "require_sdk", lambda action: None)
    folder = compiled_model_dir(tmp_path, batch_size=2, sequence_length=1024, tp_degree=4)
    settings = ModelSettings(backend="neuron", id=str(folder), batch_size=2, sequence_length=1024, max_prompt_tokens=512, tensor_parallel_size=4)
    with pytest.raises(NeuronError, match="model.sequence_length is 2048 but"):
        neuron.NeuronEngine.load(settings.model_copy(update={"sequence_length": 2048}), GenerationSettings())
    assert fake.calls == []  # refused before anything was loaded
    engine = neuron.NeuronEngine.load(settings, GenerationSettings())
    assert fake.calls == [("tokenizer", str(folder)), ("from_pretrained", str(folder))]
    assert (engine.batch_size, engine.sequence_length, engine.end_ids) == (2, 1024, frozenset({2}))


# --- push ----------------------------------------------------------------------------------------


def compiled_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "llama-2-13b-chat-neuron"
    folder.mkdir()
    for name in ("config.json", "neuron_config.json", "model.pt"):
        (folder / name).write_text("{}")
    return folder


def test_push_without_hf_token_names_the_variable(tmp_path):
    done = chatbot("push", str(compiled_folder(tmp_path)))
    assert done.returncode == 1
    assert "HF_TOKEN environment variable" in one_sentence(done.stderr)


def test_push_of_a_folder_that_was_not_exported(tmp_path):
    done = chatbot("push", str(tmp_path), HF_TOKEN="hf_" + "x" * 30)
    assert done.returncode == 1
    message = one_sentence(done.stderr)
    assert "is not a compiled model folder (no config.json, neuron_config.json, model.pt)" in message
    assert "hf_xxx" not in done.stderr + done.stdout


class FakeHub:
    """Stands in for huggingface_hub.HfApi; records what push asks of the Hub."""

    instances: list[FakeHub] = []

    def __init__(self, token=None, fail: Exception | None = None):
        self.token, self.calls, self.fail = token, [], fail
        FakeHub.instances.append(self)

    def whoami(self):
        if self.fail:
            raise self.fail
        return {"name": "alice"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return SimpleNamespace(oid="abc123")


def test_push_uploads_to_the_users_namespace_privately_and_never_shows_the_token(monkeypatch, tmp_path, capsys):
    from engine.neuron import push

    token = "hf_secret_token_value_123456"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(push, "HfApi", FakeHub)
    FakeHub.instances.clear()
    folder = compiled_folder(tmp_path)
    assert cli.push_command(parser().parse_args(["push", str(folder)])) == 0
    hub = FakeHub.instances[-1]
    assert hub.token == token
    assert hub.calls[0] == ("create_repo", "alice/llama-2-13b-chat-neuron", {"private": True, "exist_ok": True})
    assert hub.calls[1][1] == "alice/llama-2-13b-chat-neuron" and Path(hub.calls[1][2]["folder_path"]) == folder
    out, err = capsys.readouterr()
    assert "https://huggingface.co/alice/llama-2-13b-chat-neuron" in out
    assert '"msg": "upload: done in' in err and '"msg": "uploaded"' in err  # the JSON logs went to stderr
    assert token not in out + err


def test_push_to_an_explicit_repo_and_a_hub_failure_is_one_sentence(monkeypatch, tmp_path, capsys):
    from engine.neuron import push

    monkeypatch.setenv("HF_TOKEN", "hf_" + "y" * 30)
    monkeypatch.setattr(push, "HfApi", lambda token: FakeHub(token, fail=ConnectionError("Name or service not known\nmore")))
    folder = compiled_folder(tmp_path)
    assert cli.push_command(parser().parse_args(["push", str(folder)])) == 1
    assert "cannot look up the HF_TOKEN user on the Hugging Face Hub (Name or service not known)" in one_sentence(capsys.readouterr().err)

    monkeypatch.setattr(push, "HfApi", FakeHub)
    FakeHub.instances.clear()
    assert cli.push_command(parser().parse_args(["push", str(folder), "--repo-id", "my-org/llama"])) == 0
    assert FakeHub.instances[-1].calls[0][1] == "my-org/llama"


# --- progress -------------------------------------------------------------------------------------


def test_a_long_stage_logs_a_heartbeat_and_its_elapsed_time(caplog):
    with caplog.at_level(logging.INFO, logger="engine.neuron.progress"):
        with stage("compile", heartbeat_s=0.05, model="m"):
            time.sleep(0.28)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "compile: started"
    assert sum("compile: still running, 0:00:00 elapsed" == m for m in messages) >= 3
    assert messages[-1] == "compile: done in 0:00:00"
    assert caplog.records[-1].stage == "compile" and caplog.records[-1].elapsed_s >= 0.28


def test_a_failed_stage_says_so_and_raises(caplog):
    with caplog.at_level(logging.INFO, logger="engine.neuron.progress"), pytest.raises(RuntimeError):
        with stage("save"):
            raise RuntimeError("disk full")
    assert caplog.records[-1].getMessage().startswith("save: failed after")


# --- backend ---------------------------------------------------------------------------------------


@no_sdk
def test_backend_load_without_the_sdk_gives_the_clear_message():
    from engine.serving import load_engine

    with pytest.raises(NeuronError, match=r"^the neuron backend needs the AWS Neuron SDK, which is not installed here \(missing"):
        load_engine(Settings(model=ModelSettings(backend="neuron", id="/models/compiled")))


def compiled_model_dir(tmp_path: Path, **shape) -> Path:
    (tmp_path / "neuron_config.json").write_text(json.dumps({"batch_size": 1, "sequence_length": 2048, "tp_degree": 2} | shape))
    return tmp_path


def test_a_compiled_shape_other_than_the_settings_is_refused(tmp_path):
    from engine.serving.neuron_engine import check_shape, compiled_shape

    folder = compiled_model_dir(tmp_path, batch_size=4, tp_degree=8)
    settings = ModelSettings(backend="neuron", id=str(folder), batch_size=1, sequence_length=2048, tensor_parallel_size=2)
    with pytest.raises(NeuronError) as raised:
        check_shape(settings, compiled_shape(str(folder)))
    assert str(raised.value) == (
        f"model.batch_size is 1 but {folder} was compiled with 4; "
        f"model.tensor_parallel_size is 2 but {folder} was compiled with 8: "
        "set config.yaml to the compiled values, or export the model again with yours"
    )
    check_shape(settings.model_copy(update={"batch_size": 4, "tensor_parallel_size": 8}), compiled_shape(str(folder)))


def test_a_folder_that_was_not_compiled_is_refused(tmp_path):
    from engine.serving.neuron_engine import compiled_shape

    with pytest.raises(NeuronError, match="has no neuron_config.json: it is not a model compiled by `chatbot export`"):
        compiled_shape(str(tmp_path))


# --- config.py's Neuron rules -----------------------------------------------------------------------


def neuron_settings(model: dict | None = None, **generation) -> Settings:
    return Settings.model_validate({"model": {"backend": "neuron", **(model or {})}, "generation": generation})


def test_repetition_penalty_is_refused_on_neuron_even_when_greedy():
    with pytest.raises(ValidationError, match="repetition_penalty must be 1.0 with the neuron backend"):
        neuron_settings(do_sample=False, repetition_penalty=1.2)


def test_tensor_parallel_size_must_be_an_inf2_degree():
    with pytest.raises(ValidationError, match=r"model.tensor_parallel_size must be one of 1, 2, 4, 8, 12, 24 with the neuron backend, got 3"):
        neuron_settings({"tensor_parallel_size": 3})


def test_top_k_must_suit_the_on_device_sampler():
    with pytest.raises(ValidationError, match=r"generation.top_k must be between 1 and 256 when sampling with the neuron backend, got 0"):
        neuron_settings(do_sample=True, top_k=0)
