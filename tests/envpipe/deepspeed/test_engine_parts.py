"""Single-process tests of the engine's parts: IR translation, partitioning, data, timing, events, DVFS stretch."""

from __future__ import annotations

import json
import logging
import time

import pytest

from envpipe.errors import ConfigError, ScheduleError
from envpipe.ir import schedule_from_text
from envpipe.schedules import get_schedule


# -- translate -----------------------------------------------------------------------------------------
def _names(instructions) -> list[str]:
    out = []
    for ins in instructions:
        name = type(ins).__name__
        out.append(f"{name}({ins.buffer_id})" if hasattr(ins, "buffer_id") else name)
    return out


def test_translate_1f1b_first_stage_loads_before_each_forward_and_ends_with_the_step():
    from envpipe.deepspeed.translate import translate

    names = _names(translate(get_schedule("1f1b", 2, 2), 0))
    assert names == [
        "LoadMicroBatch(0)",
        "RunForward(0)",
        "SendActivationIR(0)",
        "LoadMicroBatch(1)",
        "RunForward(1)",
        "RecvGradIR(0)",
        "SendActivationIR(1)",
        "RunBackward(0)",
        "RecvGradIR(1)",
        "RunBackward(1)",
        "DrainSends",
        "ReduceTiedGrads",
        "ReduceGrads",
        "OptimizerStep",
    ]


def test_translate_keeps_async_sends_and_their_waits():
    from envpipe.deepspeed.translate import SendGradIR, WaitSendIR, translate

    schedule = get_schedule("ours", 4, 8, [1, 2, 0, 0])
    instructions = translate(schedule, 1)
    sends = [i for i in instructions if isinstance(i, SendGradIR)]
    waits = [i for i in instructions if isinstance(i, WaitSendIR)]
    assert all(s.asynchronous for s in sends) and len(sends) == 8
    assert sorted(w.buffer_id for w in waits if w.kind == "SG") == list(range(8))


def test_translate_middle_stage_does_not_load_data():
    from envpipe.deepspeed.translate import translate

    names = _names(translate(get_schedule("1f1b", 3, 2), 1))
    assert not any(n.startswith("LoadMicroBatch") for n in names)


@pytest.mark.parametrize(
    ("text", "stage", "message"),
    [
        ("r0: 0RA0 0F0 0B0\nr1: 1F0 1B0", 0, "no previous stage"),
        ("r0: 0F0 0B0\nr1: 1F0 1SA0 1B0", 1, "no next stage"),
        ("r0: 0F0 0SA0 0wSA0 0B0\nr1: 1RA0 1F0 1B0", 0, "not sent asynchronously"),
    ],
)
def test_translate_rejects_actions_the_stage_cannot_run(text, stage, message):
    from envpipe.deepspeed.translate import translate

    with pytest.raises(ScheduleError, match=message):
        translate(schedule_from_text(text), stage)


def test_unit_names_follow_program_order():
    from envpipe.deepspeed.translate import unit_names

    schedule = get_schedule("ours", 2, 4, [2, 0])
    assert unit_names(schedule, 0) == ["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]
    assert unit_names(schedule, 0) == [a.unit for a in schedule.units(0)]


# -- models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "stages", "parts"),
    [
        (4, 4, [0, 2, 3, 4, 7]),
        (4, 2, [0, 3, 7]),
        (5, 2, [0, 4, 8]),
        (32, 4, [0, 9, 17, 25, 35]),
    ],
)
def test_balanced_parts_spread_decoder_layers_evenly(layers, stages, parts):
    from envpipe.models.llama import balanced_parts

    assert balanced_parts(layers, stages) == parts


def test_balanced_parts_refuses_more_stages_than_layers():
    from envpipe.models.llama import balanced_parts

    with pytest.raises(ConfigError, match="cannot fill 8 stages"):
        balanced_parts(4, 8)


def test_load_config_presets_and_errors(tmp_path):
    from envpipe.models.llama import load_config

    tiny = load_config("tiny")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.vocab_size) == (64, 4, 256)
    assert tiny._attn_implementation == "sdpa"  # causal with mask=None
    assert load_config("7b").hidden_size == 4096
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="only Llama"):
        load_config(str(tmp_path))


def test_hf_prefixes_map_pipe_layers_to_state_dict_names():
    from envpipe.models.llama import layer_hf_prefixes, load_config

    config = load_config("llama-tiny")
    assert layer_hf_prefixes(config) == [
        "model.",
        "model.layers.0.",
        "model.layers.1.",
        "model.layers.2.",
        "model.layers.3.",
        "model.",
        "",
    ]


# -- data ----------------------------------------------------------------------------------------------
def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_synthetic_batches_are_deterministic_per_data_parallel_index():
    import torch

    from envpipe.data import batches

    def make(dp_index):
        return batches(None, vocab_size=256, micro_batch_size=2, seq_len=8, dp_index=dp_index, dp_size=2)

    a, b, other = _take(make(0), 3), _take(make(0), 3), _take(make(1), 3)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], other[0][0])
    ids, labels = a[0]
    assert ids.shape == (2, 8) and torch.equal(ids, labels) and int(ids.max()) < 256


def test_text_and_jsonl_files_tokenise_byte_level(tmp_path):
    from envpipe.data import batches

    (tmp_path / "a.txt").write_text("abcdefgh" * 4)
    ids, _ = next(batches(tmp_path / "a.txt", vocab_size=256, micro_batch_size=2, seq_len=8))
    assert ids[0].tolist() == list(b"abcdefgh")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "x" * 40}) + "\n\n" + json.dumps({"text": "y" * 40}) + "\n"
    )
    ids, _ = next(
        batches(tmp_path / "b.jsonl", vocab_size=256, micro_batch_size=1, seq_len=16, dp_index=1, dp_size=2)
    )
    assert ids[0].tolist() == list(b"x" * 16)  # sequence 1 of the stream goes to data-parallel index 1


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("bad.jsonl", "{not json\n", {}, "is not JSON"),
        ("bad2.jsonl", '{"body": "x"}\n', {}, 'needs a string "text"'),
        ("short.txt", "abc", {}, "fewer than one micro-batch"),
        ("small.txt", "abcdefgh" * 8, {"vocab_size": 64}, "vocab_size >= 256"),
        ("data.csv", "a,b\n", {}, "must end in .txt, .jsonl or .bin"),
    ],
)
def test_bad_data_files_say_what_is_wrong(tmp_path, name, content, kwargs, message):
    from envpipe.data import batches

    (tmp_path / name).write_text(content)
    args = {"vocab_size": 256, "micro_batch_size": 2, "seq_len": 8} | kwargs
    with pytest.raises(ConfigError, match=message):
        next(batches(tmp_path / name, **args))


# -- timing, events, DVFS emulation --------------------------------------------------------------------
def test_cpu_timer_spans_are_ms_from_iteration_start():
    from envpipe.deepspeed.timing import CpuUnitTimer

    timer = CpuUnitTimer()
    timer.start_iteration()
    timer.begin("F0")
    time.sleep(0.01)
    timer.end("F0", 1410)
    (span,) = timer.spans(stage=1)
    assert (span.stage, span.unit, span.clock_mhz) == (1, "F0", 1410)
    assert 0 <= span.start_ms < span.end_ms and span.end_ms - span.start_ms >= 9.0


class _FakeAgent:
    def __init__(self):
        self.calls = []

    def phase(self, unit, event, clock_mhz=0):
        self.calls.append((unit, event, clock_mhz))


class _Marker:
    """Stands in for a CUDA event: ``synchronize`` returns once the 'device' reached it."""

    def __init__(self, log, name, delay_s=0.0):
        self.log, self.name, self.delay_s = log, name, delay_s

    def synchronize(self):
        time.sleep(self.delay_s)
        self.log.append(("reached", self.name))


def test_cuda_notifier_sends_each_event_after_its_marker_in_order():
    from envpipe.deepspeed.events import CudaEventNotifier

    agent, log = _FakeAgent(), []
    agent.phase = lambda unit, event, clock: log.append(("sent", f"{unit}:{event}@{clock}"))
    notifier = CudaEventNotifier(agent)
    t0 = time.perf_counter()
    notifier.send("F0", "begin", 1200, _Marker(log, "F0b", 0.05))
    notifier.send("F0", "end", 1200, _Marker(log, "F0e"))
    enqueue_s = time.perf_counter() - t0
    notifier.close()
    assert enqueue_s < 0.02  # the training thread never waits for the device
    assert log == [("reached", "F0b"), ("sent", "F0:begin@1200"), ("reached", "F0e"), ("sent", "F0:end@1200")]


def test_notifiers_for_cpu_and_no_agent():
    from envpipe.deepspeed.events import ImmediateNotifier, NullNotifier, make_notifier

    agent = _FakeAgent()
    notifier = make_notifier(agent, on_gpu=False)
    assert isinstance(notifier, ImmediateNotifier)
    notifier.send("B3", "begin", 990)
    assert agent.calls == [("B3", "begin", 990)]
    assert isinstance(make_notifier(None, on_gpu=True), NullNotifier)


def test_dvfs_stretch_follows_the_model():
    from envpipe_agent.dvfs import get_model

    from envpipe.deepspeed.dvfs_emulation import DvfsStretcher

    stretcher = DvfsStretcher("central", max_clock_mhz=1980)
    assert stretcher.ratio(1980) == 1.0 and stretcher.ratio(None) == 1.0
    assert stretcher.ratio(990) == pytest.approx(get_model("central").time_ratio(0.5))
    t0 = time.perf_counter()
    stretcher.stretch_cpu(0.02, 990)  # 20 ms at the top clock → ~33 ms at half clock: sleeps ~13 ms
    assert time.perf_counter() - t0 >= 0.012  # no upper bound: a loaded machine may sleep longer
    with pytest.raises(ConfigError, match="top clock"):
        DvfsStretcher("central", max_clock_mhz=0)


def test_dvfs_stretch_of_a_short_unit_ends_on_time():
    # A 2 ms unit at 1650 MHz owes ~0.26 ms; time.sleep alone overshot that by ~0.1 ms (+40 %).
    from envpipe.deepspeed.dvfs_emulation import DvfsStretcher

    stretcher = DvfsStretcher("central", max_clock_mhz=1980)
    over_ms = []
    for _ in range(50):
        t0 = time.perf_counter()
        extra_s = stretcher.stretch_cpu(0.002, 1650)
        over_ms.append((time.perf_counter() - t0 - extra_s) * 1e3)
    assert 0.2e-3 < extra_s < 0.4e-3
    assert min(over_ms) >= 0.0
    assert sorted(over_ms)[len(over_ms) // 2] < 0.03  # median overshoot under 30 us


def test_connect_agent_without_an_agent_warns_and_trains_on(caplog):
    from envpipe.deepspeed import connect_agent

    class Gone:
        def hello(self):
            raise TimeoutError("no reply in 2 s")

    with caplog.at_level(logging.WARNING, logger="envpipe.deepspeed"):
        assert connect_agent(Gone(), 0) == (None, None)
    assert "training goes on" in caplog.text
    assert connect_agent(None, 0) == (None, None)


def test_transport_failures_become_one_clear_error():
    from envpipe.deepspeed.engine import _peer_errors
    from envpipe.deepspeed.p2p import PeerLostError

    lost = "stage 2: train_batch failed .*Connection closed by peer"
    with pytest.raises(PeerLostError, match=lost), _peer_errors(2, "train_batch"):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    # a bug is not a dead peer: passed through
    with pytest.raises(RuntimeError, match="shape mismatch"), _peer_errors(2, "train_batch"):
        raise RuntimeError("shape mismatch")


def test_files_use_the_model_directory_tokenizer_when_it_has_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from envpipe.data import batches

    vocab = {"[UNK]": 0, "red": 1, "green": 2, "blue": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    (tmp_path / "colours.txt").write_text("red green blue purple " * 4)
    ids, _ = next(
        batches(
            tmp_path / "colours.txt",
            vocab_size=8,
            micro_batch_size=1,
            seq_len=8,
            model_dir=tmp_path / "model",
        )
    )
    assert ids[0].tolist() == [1, 2, 3, 0, 1, 2, 3, 0]  # word-level ids, not bytes


def test_gpu_stretch_learns_compute_time_and_the_achieved_spin_rate():
    from envpipe.deepspeed.dvfs_emulation import DvfsStretcher

    stretcher = DvfsStretcher("central", max_clock_mhz=1980)
    stretcher._spin_cycles = {"F0": 1_000_000, "F1": 3_000_000, "F2": 2_000_000}
    stretcher.observe_gpu([("F0", 10.0, 0.5), ("F1", 12.0, 1.0), ("F2", 11.0, 1.0), ("B0", 20.0, 0.0)])
    assert stretcher._last_ms == {"F0": 10.0, "F1": 12.0, "F2": 11.0, "B0": 20.0}  # compute only, no spin
    assert stretcher._cycles_per_ms == 2_000_000.0  # median of the rates the spins really ran at


def test_initialize_refuses_a_schedule_that_does_not_match_the_config():
    from envpipe.deepspeed import build_engine

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8}
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 but the schedule has 4"):
        build_engine(object(), config, get_schedule("1f1b", 2, 4))


def test_stock_train_schedule_passes_the_stream_model_and_equals_our_1f1b() -> None:
    """DeepSpeed's own TrainSchedule (blocking p2p on one stream per neighbour) cannot hang on NCCL, and our
    ``1f1b`` is exactly its per-stage order."""
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    from envpipe.deepspeed.translate import from_pipe_schedule
    from envpipe.schedules import get_schedule
    from envpipe.streams import check

    for stages in range(2, 6):
        for micro_batches in (stages, 2 * stages + 1):
            stock = from_pipe_schedule(TrainSchedule, stages, micro_batches)
            for transport in ("pair", "link"):
                check(stock, transport)
            assert stock.programs == get_schedule("1f1b", stages, micro_batches).programs
