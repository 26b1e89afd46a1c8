"""Issue 7 in one device call: the real parts of EnvPipe on a real GPU, with its clocks left alone.

    python3 benchmarks/gpu_validation/run.py --out "$OUT" [--model llama-1b --seq-len 1024 ...]

Parts (each one recorded in results.json as it finishes; a failed part does not stop the next):

1. ``envpipe-agent --backend nvml --read-only``; ``envpipe status --json`` shows the card.
2. the agent's energy window vs the integral of NVML power samples over a known matmul load (energy_probe.py).
3. ``envpipe train --type baseline --scheduling 1f1b --stages 1`` on the GPU with that agent: per-unit
   CUDA-event timings, energy per iteration, phase-event count at the agent.
4. one rank in-process (engine_rank.py) against a second, event-recording agent (recording_agent.py):
   the lag of every phase event behind the device reaching its boundary, and their order; stock
   PipelineEngine vs EnvpipeEngine, alternating; synchronise calls per thread.
5. ``envpipe profile`` with one candidate clock (the card's own) and ``envpipe simulate --profile``:
   predicted iteration time and energy against part 3's measurement.

Without a CUDA GPU every part that can still run does (sim agent, CPU ranks, llama-tiny), labelled a CPU
smoke run: those numbers say the script works, nothing about a GPU. Never changes clocks, power limits or
modes: the agents are read-only and nothing here calls a setter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from analysis import expected_events, goal, match_events, relative_error, stats

REPO = HERE.parent.parent


class Driver:
    """Holds the output folder, the log, the environment of the subprocesses and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="ep-val-"))
        self.log_path = self.out / "driver.log"
        self.deadline_s = time.monotonic() + args.budget_s
        self.on_gpu = _cuda_available()
        self.results: dict[str, Any] = {
            "issue": 7, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": "gpu" if self.on_gpu else "cpu smoke run (no CUDA GPU: numbers say nothing about a GPU)",
            "args": vars(args), "host": {"python": platform.python_version(), "machine": platform.machine(),
                                         "cpus": os.cpu_count()},
            "parts": {},
        }
        self.env = self._make_env()

    def _make_env(self) -> dict[str, str]:
        """PATH gets shims for ``envpipe`` / ``envpipe-agent`` that run the package from the tree."""
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        for name, module in (("envpipe", "envpipe_cli.main"), ("envpipe-agent", "envpipe_agent.main")):
            shim = bin_dir / name
            shim.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
            shim.chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        env = dict(os.environ, PATH=path, PYTHONUNBUFFERED="1", COLUMNS="200", TOKENIZERS_PARALLELISM="false")
        if self.args.tf32:
            env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1"  # fp32 matmuls on tensor cores (TF32)
        return env

    # -- bookkeeping -----------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        with self.log_path.open("a") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log(f"== {text}")

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def remaining_s(self, reserve_s: float = 0.0) -> float:
        return max(5.0, self.deadline_s - time.monotonic() - reserve_s)

    def part(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one part; its result (or its error) goes into results.json at once."""
        self.say(f"part {key}: start")
        start = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one device call must bring back every part it can
            self.log(traceback.format_exc())
            value = {"error": f"{type(exc).__name__}: {exc}"}
        value["elapsed_s"] = round(time.monotonic() - start, 1)
        self.results["parts"][key] = value
        self.save()
        error = f" (error: {value['error']})" if "error" in value else ""
        self.say(f"part {key}: done in {value['elapsed_s']} s{error}")
        return value

    def run(self, cmd: list[str], timeout_s: float, label: str) -> subprocess.CompletedProcess:
        """A command with its output in the log; raises on a non-zero exit, naming the command."""
        self.log(f"$ {' '.join(cmd)}")
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, check=False,
                              timeout=min(timeout_s, self.remaining_s(30.0)))
        self.log(proc.stdout)
        self.log(proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{label} exited with {proc.returncode}: {' | '.join(tail)}")
        return proc


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def nvml_loads() -> bool:
    """Whether NVML initialises here (a driver, or the tests' fake library)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # noqa: BLE001 - no library, no driver: the answer is no
        return False


class AgentProcess:
    """An agent subprocess with its sockets in ``runtime_dir``; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, cmd: list[str], runtime_dir: Path, driver: Driver) -> None:
        from envpipe_agent.client import AgentClient, AgentUnavailable

        self.endpoint = f"ipc://{runtime_dir / 'control.sock'}"
        driver.log(f"$ {' '.join(cmd)}")
        with (driver.out / "agent.log").open("ab") as log:
            self.process = subprocess.Popen(cmd, env=driver.env, cwd=REPO, stdout=log, stderr=log)
        client = AgentClient(self.endpoint, job_id="gpu-validation-probe", rank=-1, timeout_s=0.5)
        deadline_s = time.monotonic() + 30.0
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"agent exited with {self.process.returncode} (see agent.log)")
                try:
                    self.info = client.hello()
                    return
                except AgentUnavailable:
                    if time.monotonic() > deadline_s:
                        self.stop()
                        raise RuntimeError("agent did not answer within 30 s (see agent.log)") from None
        finally:
            client.close()

    def status(self) -> dict[str, Any]:
        from envpipe_agent.client import AgentClient

        client = AgentClient(self.endpoint, job_id="gpu-validation-status", rank=-1)
        try:
            return client.status()
        finally:
            client.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def agent_flags(backend: str, runtime_dir: Path) -> list[str]:
    flags = ["--config", "", "--backend", backend, "--runtime-dir", str(runtime_dir)]
    return flags + (["--read-only"] if backend == "nvml" else [])


# -- parts -------------------------------------------------------------------------------------------------
def part_device(d: Driver) -> dict[str, Any]:
    """What the machine is (read-only queries only)."""
    out: dict[str, Any] = {"on_gpu": d.on_gpu}
    query = "name,uuid,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,pstate"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                              text=True, timeout=30, check=False)
        out["nvidia_smi"] = proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["nvidia_smi"] = f"unavailable: {exc}"
    for module in ("torch", "deepspeed", "transformers", "zmq", "pynvml"):
        try:
            out[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - report what is missing, go on
            out[module] = f"unavailable: {type(exc).__name__}"
    return out


def part_status(d: Driver, agent: AgentProcess) -> dict[str, Any]:
    """``envpipe status --json`` against the agent, and the checks of deliverable 1."""
    proc = d.run(["envpipe", "status", "--json", "--endpoint", agent.endpoint], 30, "envpipe status --json")
    status = json.loads(proc.stdout)
    table = d.run(["envpipe", "status", "--endpoint", agent.endpoint], 30, "envpipe status").stdout
    gpu, info = status["gpus"][0], agent.info.gpus[0]
    checks = {
        "backend nvml, read-only": status["backend"] == "nvml" and bool(status["read_only"]),
        "real card (not simulated)": not status["simulated"],
        "UUID": str(gpu["uuid"]).startswith("GPU-"), "name": bool(gpu["name"]),
        # status counts them (agents since issue 7); hello lists them
        "110 supported SM clocks": gpu.get("supported_clocks", 110) == 110 == len(info.clocks_mhz),
        "power > 0 W": (gpu["power_w"] or 0) > 0, "energy counter > 0 J": (gpu["energy_j"] or 0) > 0,
    }
    return {"status": status, "status_table": table, "supported_clocks_mhz": list(info.clocks_mhz),
            "checks": checks, "goal": goal("status shows the real card (checks failed)",
                                           sum(not ok for ok in checks.values()), 0, kind="le")}


def part_energy(d: Driver, agent: AgentProcess) -> dict[str, Any]:
    from energy_probe import run_energy_part

    loads = [d.args.load_s, max(1.0, d.args.load_s / 2.5)]
    return run_energy_part(agent.endpoint, agent.info.gpus[0].uuid, d.on_gpu, loads)


def _shape_flags(d: Driver) -> list[str]:
    a = d.args
    flags = ["--stages", "1", "--micro-batches", str(a.micro_batches), "--micro-batch-size",
             str(a.micro_batch_size), "--seq-len", str(a.seq_len), "--model", a.model,
             "--device", "cuda" if d.on_gpu else "cpu"]
    return flags + (["--num-gpus", "1"] if d.on_gpu else [])


def _gpu_events(agent: AgentProcess) -> int:
    return int(agent.status()["gpus"][0]["events"])


def _ds_block(d: Driver, name: str, options: dict[str, Any]) -> Path:
    """A DeepSpeed JSON whose "envpipe" block sets ``options`` and the energy window length."""
    path = d.tmp / name
    path.write_text(json.dumps({"envpipe": {"min_window_s": d.args.min_window_s, **options}}))
    return path


def part_train(d: Driver, agent: AgentProcess) -> dict[str, Any]:
    """``envpipe train`` (type baseline, 1f1b, one stage) with the agent; events counted at the agent."""
    report_path = d.out / "train_report.json"
    ds_path = _ds_block(d, "train-ds.json", {})
    events_before = _gpu_events(agent)
    d.run(["envpipe", "train", "--type", "baseline", "--scheduling", "1f1b", *_shape_flags(d),
           "--steps", str(d.args.steps), "--agent", agent.endpoint, "--report", str(report_path),
           "--deepspeed-config", str(ds_path)], d.args.part_timeout_s, "envpipe train")
    time.sleep(0.5)
    received = _gpu_events(agent) - events_before
    report = json.loads(report_path.read_text())
    summary, config = report["summary"], report["config"]
    iterations = summary["optimizer_steps"]  # every step of the run, planning included
    expected = 4 * d.args.micro_batches * iterations  # begin + end of F and B per micro-batch
    spans = report["last_iteration"]
    # Type baseline: the at-plan steps run the baseline's schedule and clocks, so the difference between the
    # at-plan window and the baseline window is measurement error.
    at_plan = summary["at_plan"]
    if at_plan is None:
        raise RuntimeError(f"envpipe train ended while planning ({summary['planning_steps']} steps): raise --steps")
    repeat = relative_error(at_plan["energy_j_per_iteration"], summary["baseline"]["energy_j_per_iteration"])
    unit_ms = {kind: stats(s["end_ms"] - s["start_ms"] for s in spans if s["unit"].startswith(kind))
               for kind in "FB"}
    return {
        "energy_source": report.get("energy_source"), "energy_label": summary.get("energy_label"),
        "agent": report.get("agent"), "iterations": iterations,
        "steady": summary["at_plan"], "baseline": summary["baseline"],
        "last_iteration_unit_ms": unit_ms, "last_iteration": spans,
        "events": {"expected": expected, "received_by_agent": received},
        "min_window_s": config["min_window_s"],
        "goal": goal("phase events received minus expected", received - expected, 0),
        "goal_repeat": goal("energy/it of two identical windows (at plan vs baseline)", repeat, 0.02),
    }


def part_profile(d: Driver, agent: AgentProcess, train: dict[str, Any]) -> dict[str, Any]:
    """Profile at the card's own clock, simulate from it, compare with part 3's measurement."""
    ds_path = _ds_block(d, "profile-ds.json", {"profile_clocks": 1, "profile_steps": d.args.profile_steps})
    profile_path = d.out / "profile.json"
    d.run(["envpipe", "profile", *_shape_flags(d), "--agent", agent.endpoint, "--deepspeed-config",
           str(ds_path), "-o", str(profile_path)], d.args.part_timeout_s, "envpipe profile")
    sim_cmd = ["envpipe", "simulate", "--profile", str(profile_path), "--stages", "1", "--micro-batches",
               str(d.args.micro_batches), "--type", "baseline", "--scheduling", "1f1b", "--reconfig", "default",
               "--json"]
    predicted = json.loads(d.run(sim_cmd, 60, "envpipe simulate").stdout)
    out: dict[str, Any] = {"profile": json.loads(profile_path.read_text()), "simulate": predicted,
                           "simulate_command": " ".join(sim_cmd)}
    steady = train.get("steady")
    if steady is None:
        out["error"] = "part 3 has no measurement to compare with"
        return out
    time_err = relative_error(predicted["iteration_time_s"] * 1e3, steady["iteration_ms"])
    energy_err = relative_error(predicted["energy_j"], steady["energy_j_per_iteration"])
    out.update(measured={"iteration_ms": steady["iteration_ms"],
                         "energy_j": steady["energy_j_per_iteration"]},
               predicted={"iteration_ms": predicted["iteration_time_s"] * 1e3,
                          "energy_j": predicted["energy_j"]},
               relative_error={"iteration_time": time_err, "energy": energy_err},
               goal=goal("simulate --profile vs measured (worst of time, energy)",
                         max(abs(time_err), abs(energy_err)), 0.10))
    return out


def part_engine(d: Driver, backend: str) -> dict[str, Any]:
    """engine_rank.py against a recording agent; events matched to device boundaries."""
    runtime_dir = d.tmp / "rec"
    runtime_dir.mkdir()
    record_path = d.tmp / "events.json"
    agent = AgentProcess([sys.executable, str(HERE / "recording_agent.py"), str(record_path), "--",
                          *agent_flags(backend, runtime_dir)], runtime_dir, d)
    engine_path = d.out / "engine.json"
    a = d.args
    try:
        d.run([sys.executable, str(HERE / "engine_rank.py"), "--agent", agent.endpoint,
               "--out", str(engine_path), "--model", a.model, "--micro-batches", str(a.micro_batches),
               "--micro-batch-size", str(a.micro_batch_size), "--seq-len", str(a.seq_len),
               "--steps", str(a.overhead_steps),
               "--lag-iterations", str(a.lag_iterations)], a.part_timeout_s, "engine_rank.py")
    finally:
        agent.stop()
    engine = json.loads(engine_path.read_text())
    records = json.loads(record_path.read_text())["events"]
    return summarise_engine(engine, records)


def summarise_engine(engine: dict[str, Any], records: list[list[Any]]) -> dict[str, Any]:
    """Lag and order of the lag phase's events, overhead ratio, synchronise counts, goals."""
    client = engine["client"]
    mine = [(ns, unit, kind) for ns, lease, unit, kind in records if lease == client["lease_id"]]
    out: dict[str, Any] = {"events_sent": client["events_sent"], "events_dropped": client["events_dropped"],
                           "events_received_for_lease": len(mine)}
    lag = engine.get("lag", {})
    if "spans" in lag:
        order = [[unit for unit, _, _ in spans] for spans in lag["spans"]]
        expected = expected_events(order)
        boundary = {}
        for k, spans in enumerate(lag["spans"]):
            origin_ns = lag["calibration_ns"][k][0]
            for unit, start_ms, end_ms in spans:
                boundary[(k, unit, "begin")] = origin_ns + round(start_ms * 1e6)
                boundary[(k, unit, "end")] = origin_ns + round(end_ms * 1e6)
        stretch = mine[lag["events_sent_before"]:lag["events_sent_after"]]
        match = match_events(expected, stretch, boundary)
        out["lag"] = {"expected": match.expected, "received": match.received, "in_order": match.in_order,
                      "first_mismatch": match.first_mismatch, "lag_ms": stats(match.lags_ms),
                      "lags_ms": [round(x, 4) for x in match.lags_ms],
                      "calibration_width_us": lag["calibration_width_us"]}
        out["goal_events"] = goal("lag-phase events out of order or missing (0 = all in order)",
                                  0 if match.in_order else 1, 0, kind="le")
    else:
        out["lag"] = lag
    overhead = engine.get("overhead", {})
    if "ratio_envpipe_over_stock" in overhead:
        out["overhead"] = {k: v for k, v in overhead.items() if k != "times_ms"}
        out["goal_overhead"] = goal("median step EnvpipeEngine / stock PipelineEngine",
                                    overhead["ratio_envpipe_over_stock"], 1.01, kind="le")
    else:
        out["overhead"] = overhead
    out["profiler"] = prof = engine.get("profiler", {})
    if "envpipe_device_wide" in prof:
        extra = prof["envpipe_device_wide"] - prof["stock_device_wide"]
        out["sync_calls_by_thread"] = label_threads(prof)
        out["goal_sync"] = goal("device-wide syncs: EnvpipeEngine minus stock (profiler)", extra, 0,
                                kind="le")
    out["engine_meta"] = {k: v for k, v in engine.items() if k not in ("lag", "overhead", "profiler")}
    return out


def label_threads(prof: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """Per engine, synchronising calls per thread named main / notifier / other (tid)."""
    names = {str(t): "main" for t in prof.get("main_tids", [])}
    names.update({str(t): "notifier" for t in prof.get("notifier_tids", [])})
    return {engine: {names.get(tid, f"other ({tid})"): calls for tid, calls in prof[engine].items()}
            for engine in ("stock", "envpipe")}


# -- main --------------------------------------------------------------------------------------------------
def goals_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal line found in the parts, with its part."""
    rows = []
    for key, part in results["parts"].items():
        for name, value in part.items():
            if name.startswith("goal") and isinstance(value, dict):
                rows.append({"part": key, **value})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every part, print the goals table, write results.json under --out."""
    d = Driver(parse_args(argv))
    d.say(f"mode: {d.results['mode']}")
    d.part("0_device", lambda: part_device(d))
    wanted = d.args.agent_backend
    backend = "nvml" if wanted == "nvml" or (wanted == "auto" and nvml_loads()) else "sim"
    d.results["agent_backend"] = backend
    runtime_dir = d.tmp / "agent"
    runtime_dir.mkdir()
    agent = None
    try:
        agent = AgentProcess(["envpipe-agent", *agent_flags(backend, runtime_dir)], runtime_dir, d)
    except Exception as exc:  # noqa: BLE001 - nothing else can run without an agent; say why
        d.results["parts"]["1_status"] = {"error": f"agent did not start: {exc}"}
        d.save()
    if agent is not None:
        try:
            d.part("1_status", lambda: part_status(d, agent))
            if backend == "nvml":
                d.part("2_energy", lambda: part_energy(d, agent))
            else:
                d.results["parts"]["2_energy"] = {"skipped": "no NVML here: nothing real to integrate"}
            if "engine" in d.args.parts:
                d.part("4_engine", lambda: part_engine(d, backend))
            train = d.part("3_train", lambda: part_train(d, agent))
            d.part("5_profile", lambda: part_profile(d, agent, train))
        finally:
            d.results["agent_exit_code"] = agent.stop()
    d.results["goals"] = goals_table(d.results)
    d.save()
    print_goals(d.results)
    return 0


def print_goals(results: dict[str, Any]) -> None:
    print(f"\nGPU validation ({results['mode']}), {results['date_utc']}")
    for row in results["goals"]:
        value = row["value"] if not isinstance(row["value"], float) else f"{row['value']:.4f}"
        print(f"  [{'met' if row['met'] else 'MISSED'}] part {row['part']}: {row['goal']}: {value} "
              f"({'|x|' if row['kind'] == 'abs_le' else 'x'} <= {row['limit']})")
    for key, part in results["parts"].items():
        if "error" in part:
            print(f"  [ERROR] part {key}: {part['error']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", default=os.environ.get("OUT", "gpu-validation-out"), help="results folder (default $OUT)")
    add("--model", default=None, help="Llama preset (default llama-1b on GPU, llama-tiny on CPU)")
    add("--micro-batches", type=int, default=4)
    add("--micro-batch-size", type=int, default=None, help="default 2 (GPU), 2 (CPU)")
    add("--seq-len", type=int, default=None, help="default 1024 (GPU), 64 (CPU)")
    add("--steps", type=int, default=300, help="optimizer steps of envpipe train (planning included)")
    add("--profile-steps", type=int, default=10)
    add("--overhead-steps", type=int, default=40, help="timed steps of each engine")
    add("--lag-iterations", type=int, default=5)
    add("--load-s", type=float, default=5.0, help="matmul load of the long energy window")
    add("--min-window-s", type=float, default=None, help="envpipe's min_window_s (default 10 GPU, 1 CPU)")
    add("--agent-backend", choices=("auto", "nvml", "sim"), default="auto")
    add("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls in the ranks")
    add("--parts", default="engine", help="'engine' to run part 4, '' to skip it")
    add("--budget-s", type=float, default=560.0, help="wall-clock budget of the whole run")
    add("--part-timeout-s", type=float, default=240.0)
    args = parser.parse_args(argv)
    on_gpu = _cuda_available()
    args.model = args.model or ("llama-1b" if on_gpu else "llama-tiny")
    args.micro_batch_size = args.micro_batch_size or 2
    args.seq_len = args.seq_len or (1024 if on_gpu else 64)
    # The H100's counter moves every ~100 ms and the agent samples it every 100 ms: a window edge is
    # uncertain by up to ~0.2 s at full power, so 1 s windows (envpipe's default) err by up to ~20 %.
    args.min_window_s = args.min_window_s if args.min_window_s is not None else (10.0 if on_gpu else 1.0)
    return args


if __name__ == "__main__":
    sys.exit(main())
